"""The coverage report (issue 13.3): every process that opened a CRM connection in
the last 24 h, its TLS implementation, and whether its plaintext is inspected,
and why not.

The agent's poll hands over each CRM connection's outbound bytes (`observe`,
cheap, under its lock). `refresh` (its own thread, every REFRESH_S) finds the
owner of each new connection by its socket (owners.py), classifies the owner's
TLS stack (tls_class.py) and asks the plaintext monitor whether it probes that
stack in that process; an exec or mmap of a listed process (the monitor's
notices) wakes it at once. A connection whose socket is gone before its owner was
found is reported once per tenant and cgroup without a pid ("exited before the
probe attached"). Bytes count toward `inspected` true or false as the owner
stood when they were sent; bytes seen before the owner was known are counted
when it is.

Bounded: PROCESSES_MAX processes and CONNECTIONS_MAX connections, each kept
RETENTION_S after it was last seen; every eviction is counted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leaktap.controller.plaintext.libraries import SslLibraryFinder
from leaktap.controller.plaintext.owners import Endpoints, SocketOwners
from leaktap.controller.plaintext.procs import PROC, ProcessSelector, read_process
from leaktap.controller.plaintext.tls_class import TLS_CLASSES, UNKNOWN, TlsClassifier
from leaktap.controller.series import OTHER, SeriesCap

logger = logging.getLogger(__name__)

RETENTION_S = 24 * 3600
PROCESSES_MAX = 4096
CONNECTIONS_MAX = 65536
DESTINATIONS_MAX = 32  # per process
# tenant label values of the bytes-by-coverage metric (a tenant may be named by an
# SNI pattern, so by the watched side); later ones count under `other`
TENANT_SERIES_MAX = 1000
REFRESH_S = 2.0
# a connection whose owner was not found in this many scans is reported ownerless
OWNER_TRIES = 2

REASON_INSPECTED = "probed"
REASON_NOT_SELECTED = "not selected"
REASON_DISABLED = "plaintext inspection disabled"
REASON_NOT_YET = "selected, probe not attached yet"
REASON_EXITED = "exited before the probe attached"


@dataclass(slots=True)
class ProcessCoverage:
    pid: int | None
    start: int | None  # /proc/PID/stat starttime: a reused pid is another process
    exe: str | None
    comm: str | None
    tenant: str
    tls: str = UNKNOWN
    inspected: bool = False
    reason: str = REASON_EXITED
    destinations: dict[str, None] = field(default_factory=dict)
    last_seen: float = 0.0
    alive: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "exe": self.exe, "comm": self.comm, "tenant": self.tenant,
                "destinations": list(self.destinations), "tls": self.tls,
                "inspected": self.inspected, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class _Verdict:
    exe: str | None
    comm: str | None
    tls: str
    inspected: bool
    reason: str


@dataclass(slots=True)
class _Connection:
    destination: str  # vendor:instance
    tenant: str
    cgroup: str | None
    last_seen: float
    owner: tuple[int, int | None] | str | None = None  # process key, or the ownerless key
    pending_bytes: int = 0
    tries: int = 0


def _start_time(proc: Path, pid: int) -> int | None:
    try:
        stat = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # the fields after "(comm)": state is field 3, starttime field 22
    fields = stat.rsplit(b")", 1)[-1].split()
    return int(fields[19]) if len(fields) > 19 else None


def _comm(proc: Path, pid: int) -> str | None:
    try:
        return (proc / str(pid) / "comm").read_text().strip() or None
    except OSError:
        return None


class CoverageTracker:
    """Who talks to CRMs, through which TLS stack, and whether it is inspected."""

    def __init__(self, monitor: Any = None, proc: Path = PROC,
                 finder: SslLibraryFinder | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.monitor = monitor  # PlaintextMonitor, or None when plaintext is disabled
        self.proc = proc
        self.clock = clock
        self.owners = SocketOwners(proc)
        self.classifier = TlsClassifier(
            finder or (monitor.finder if monitor is not None else SslLibraryFinder()), proc)
        self._selector: ProcessSelector | None = (
            monitor.selector if monitor is not None else None)
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()  # one refresh at a time (thread, tests, API)
        self._connections: OrderedDict[Endpoints, _Connection] = OrderedDict()
        self._processes: OrderedDict[tuple[int, int | None] | str, ProcessCoverage] = (
            OrderedDict())
        # bytes to CRMs by (tenant, inspected), since start
        self.bytes_by_coverage: Counter[tuple[str, bool]] = Counter()
        self.tenant_series: SeriesCap[str] = SeriesCap(TENANT_SERIES_MAX)
        self.counters: Counter[str] = Counter()
        self._stop = threading.Event()
        self._wake = threading.Event()  # a tracked process exec'd or mapped a file
        # pids listed alive, replaced whole after each refresh: touch() reads it
        # from the monitor's attach thread without taking the lock
        self._listed_pids: frozenset[int] = frozenset()
        self._thread: threading.Thread | None = None
        if monitor is not None:
            monitor.on_process_change = self.touch

    # -- feeding ------------------------------------------------------------------

    def observe(self, family: int, local: tuple[str, int], remote: tuple[str, int],
                vendor: str, instance: str | None, tenant: str, cgroup: str | None,
                bytes_out: int) -> None:
        """A CRM connection sent `bytes_out` more bytes (the agent's poll)."""
        key = (family, local, remote)
        now = self.clock()
        with self._lock:
            conn = self._connections.get(key)
            if conn is None:
                conn = self._connections[key] = _Connection(
                    f"{vendor}:{instance or '?'}", tenant, cgroup, now)
                self.counters["connections_seen"] += 1
                if len(self._connections) > CONNECTIONS_MAX:
                    self._connections.popitem(last=False)
                    self.counters["connections_evicted"] += 1
            else:
                self._connections.move_to_end(key)
                conn.last_seen = now
            owner = self._processes.get(conn.owner) if conn.owner is not None else None
            if owner is None:
                conn.pending_bytes += bytes_out
            else:
                owner.last_seen = now
                self._count(owner, bytes_out)

    # -- refreshing ---------------------------------------------------------------

    def start(self) -> CoverageTracker:
        self._thread = threading.Thread(target=self._loop, name="lt-coverage", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def touch(self, pid: int) -> None:
        """The monitor handled an exec or mmap of `pid`: re-judge now if it is listed
        (a library mapped later, or another program in the same pid)."""
        if pid in self._listed_pids:
            self.counters["process_changes"] += 1
            self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(REFRESH_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - keep refreshing; the error is logged
                logger.exception("refreshing the coverage report")

    def refresh(self) -> None:
        """Find new connections' owners, re-judge live processes, expire old entries.
        The /proc and ELF reading runs outside the lock: `observe` (the agent's poll)
        never waits for it (a 100 MB executable's first reading takes ~0.3 s)."""
        with self._refreshing:
            self._refresh()

    def _refresh(self) -> None:
        with self._lock:
            # in arrival order: who is listed (and labelled) first does not vary
            wanted = [k for k, c in self._connections.items() if c.owner is None]
            listed = [k for k, e in self._processes.items()
                      if e.alive and isinstance(k, tuple)]
        found = self.owners.find(set(wanted))
        owners = {pid: (pid, _start_time(self.proc, pid)) for pid in set(found.values())}
        verdicts = {key: self._assess(*key) for key in {*listed, *owners.values()}}
        with self._lock:
            for key in wanted:
                conn = self._connections.get(key)
                if conn is None:
                    continue
                pid = found.get(key)
                if pid is not None:
                    self._own(conn, owners[pid], verdicts[owners[pid]])
                else:
                    conn.tries += 1
                    if conn.tries >= OWNER_TRIES:
                        self._own_unresolved(conn)
            for pkey in listed:
                entry = self._processes.get(pkey)
                if entry is not None:
                    self._apply(entry, verdicts[pkey])
            self._expire(self.clock() - RETENTION_S)
            self._listed_pids = frozenset(
                e.pid for e in self._processes.values() if e.alive and e.pid is not None)
        self.counters["refreshes"] += 1

    def _own(self, conn: _Connection, key: tuple[int, int | None],
             verdict: _Verdict | None) -> None:
        entry = self._processes.get(key)
        if entry is None:
            exe, comm = (verdict.exe, verdict.comm) if verdict is not None else (None, None)
            entry = ProcessCoverage(key[0], key[1], exe, comm, conn.tenant)
            self._apply(entry, verdict)
            self._add(key, entry)
        self._attach(conn, key, entry)

    def _own_unresolved(self, conn: _Connection) -> None:
        """Its socket closed before an owner scan saw it: one entry per tenant and cgroup."""
        self.counters["connections_ownerless"] += 1
        key = f"ownerless:{conn.tenant}:{conn.cgroup or ''}"
        entry = self._processes.get(key)
        if entry is None:
            entry = ProcessCoverage(None, None, None, None, conn.tenant, alive=False)
            self._add(key, entry)
        self._attach(conn, key, entry)

    def _add(self, key: tuple[int, int | None] | str, entry: ProcessCoverage) -> None:
        self._processes[key] = entry
        if len(self._processes) > PROCESSES_MAX:
            self._processes.popitem(last=False)
            self.counters["processes_evicted"] += 1

    def _attach(self, conn: _Connection, key: tuple[int, int | None] | str,
                entry: ProcessCoverage) -> None:
        conn.owner = key
        entry.last_seen = max(entry.last_seen, conn.last_seen)
        if conn.destination not in entry.destinations:
            if len(entry.destinations) < DESTINATIONS_MAX:
                entry.destinations[conn.destination] = None
            else:
                self.counters["destinations_dropped"] += 1
        self._count(entry, conn.pending_bytes)
        conn.pending_bytes = 0

    def _count(self, entry: ProcessCoverage, nbytes: int) -> None:
        if nbytes:
            tenant = entry.tenant if self.tenant_series.admits(entry.tenant) else OTHER
            self.bytes_by_coverage[tenant, entry.inspected] += nbytes

    def _assess(self, pid: int, start: int | None) -> _Verdict | None:
        """A live process's TLS stack and whether the monitor probes it; None when
        it is gone (or its pid now belongs to another process)."""
        stack = self.classifier.classify(pid)
        if stack is None or _start_time(self.proc, pid) != start:
            return None
        info = read_process(pid, self.proc)
        exe, comm = (info.exe if info else None), _comm(self.proc, pid)
        if stack.reason is not None:
            return _Verdict(exe, comm, stack.tls, False, stack.reason)
        probed = self._probed_files(pid)
        if stack.targets and all(t in probed for t in stack.targets):
            return _Verdict(exe, comm, stack.tls, True, REASON_INSPECTED)
        if self.monitor is None:
            reason = REASON_DISABLED
        elif self._selector is not None and not (
                info is not None and self._selector.matches(info)):
            reason = REASON_NOT_SELECTED
        else:
            reason = REASON_NOT_YET
        return _Verdict(exe, comm, stack.tls, False, reason)

    @staticmethod
    def _apply(entry: ProcessCoverage, verdict: _Verdict | None) -> None:
        if verdict is None:
            # gone: the last judgement stands, unless it was never probed
            entry.alive = False
            if not entry.inspected and entry.reason in (REASON_NOT_YET, REASON_EXITED):
                entry.reason = REASON_EXITED
            return
        entry.tls, entry.inspected, entry.reason = verdict.tls, verdict.inspected, verdict.reason

    def _probed_files(self, pid: int) -> set[tuple[int, int]]:
        """(device, inode) of the files the monitor probes for `pid` (or for all)."""
        if self.monitor is None:
            return set()
        probed = self.monitor.probed_pids()
        files = set()
        for path in {*probed.get(pid, ()), *probed.get(-1, ())}:
            try:
                st = os.stat(path)
            except OSError:
                continue
            files.add((st.st_dev, st.st_ino))
        return files

    def _expire(self, before: float) -> None:
        for key in [k for k, c in self._connections.items() if c.last_seen < before]:
            del self._connections[key]
            self.counters["connections_expired"] += 1
        for pkey in [k for k, e in self._processes.items() if e.last_seen < before]:
            del self._processes[pkey]
            self.counters["processes_expired"] += 1

    # -- reading ------------------------------------------------------------------

    def report(self) -> list[dict[str, Any]]:
        """GET /v1/coverage's processes, most recently seen first."""
        with self._lock:
            entries = sorted(self._processes.values(), key=lambda e: -e.last_seen)
            return [e.as_dict() for e in entries]

    def processes_by_class(self) -> dict[tuple[str, bool], int]:
        """(tls, inspected) -> processes in the report (every class present, zeros too)."""
        out = {(tls, inspected): 0 for tls in TLS_CLASSES for inspected in (True, False)}
        with self._lock:
            for e in self._processes.values():
                out[e.tls, e.inspected] = out.get((e.tls, e.inspected), 0) + 1
        return out

    def stats(self) -> dict[str, int]:
        out = {f"coverage_{k}": v for k, v in self.counters.items()}
        out.update({f"coverage_{k}": v for k, v in self.owners.counters.items()})
        with self._lock:
            out["coverage_processes"] = len(self._processes)
            out["coverage_connections"] = len(self._connections)
        return out

    def summary(self) -> str:
        return summarise(self.report())


def summarise(report: list[dict[str, Any]]) -> str:
    """One line: how many CRM-talking processes are inspected, and why the rest are not."""
    seen = sum(1 for e in report if e["inspected"])
    why = Counter(str(e["reason"]) for e in report if not e["inspected"])
    rest = "; ".join(f"{n} {reason}" for reason, n in why.most_common())
    return f"{seen} of {len(report)} process(es) talking to CRMs inspected" + (
        f" ({rest})" if rest else "")
