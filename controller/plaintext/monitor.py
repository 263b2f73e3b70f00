"""TLS plaintext inspection: which processes to probe, and what their writes say.

`PlaintextMonitor` loads ssl_uprobe.bpf.c, attaches its uprobes only to the
processes `plaintext.select` picks (one system-wide probe per library with
`select: all`), follows processes as they start, change and exit, drains the
plaintext ring buffer and hands each write to the content inspector with
its tenant, environment and destination. Findings go to `on_finding`
(analytics.alerts.Finding), bulk-export calls to `on_audit` (BulkAudit).

Picking up new processes: the sched_process_exec tracepoint reports every
exec (a few per second on a node; each costs one ring-buffer record), and
task_newtask every process a probed process forks (a pre-fork server's
workers, a child sent to do the upload); the attach runs on a worker thread at
once, before a typical client has loaded its TLS library. A periodic /proc
rescan (plaintext.rescan_interval_s) catches processes that changed cgroup or
uid without exec and any notice that was lost; selected processes' maps are
re-read every MAPS_RESCAN_S for libssl copies loaded later (dlopen). A TLS
library is any file mapped executable that defines SSL_write/SSL_write_ex,
whatever its name; the sys_exit_mmap tracepoint reports new executable
mappings (of probed processes, or of every process with `select: all`) so a
library loaded later is probed at once, not on the next rescan. A selected
process whose executable is a Go program is probed in it (golang.py:
crypto/tls's Write and Read from the binary's own tables; ssl_go.bpf.c); one
whose tables are gone is kept in `go_processes` with its reason for the
coverage report.

Coverage: the kernel sends each write in chunks with their offsets and adds
every byte it could not deliver to lt_ssl_lost (per connection and reason),
drained here every LOSS_DRAIN_S. Captured and lost bytes are counted per
connection and per process; bytes lost to a flood (the rate limit or a full
ring buffer) by a process talking to a CRM raise `inspection_evaded`, and a
CRM connection whose bytes were mostly unseen is written to the audit log.

Reads (SSL_read/SSL_read_ex returns, issue 14.1) arrive as `read` events of
the same connection and go to the inspector as its `from_crm` stream, where
responses are paired with their requests; the bytes they lose are counted
per connection and direction (lt_ssl_lost's key.dir), never as a write's.

The plaintext of a write or read exists only inside `_on_write`; nothing here
logs, stores or forwards it.
"""

from __future__ import annotations

import ctypes
import fnmatch
import logging
import os
import queue
import re
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leaktap.analytics.alerts import Finding
from leaktap.analytics.plaintext.canary import Canary, CanaryMatcher
from leaktap.analytics.plaintext.fields import FieldPolicy
from leaktap.analytics.plaintext.inspector import (
    FROM_CRM,
    TO_CRM,
    BulkAudit,
    ContentInspector,
    StreamLimits,
    TenantPolicy,
    WriteContext,
)
from leaktap.analytics.plaintext.redact import KeyedHasher, dedup_key
from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.config import DEFAULT_DB, LeaktapConfig
from leaktap.controller.errors import ConfigError, ProbeLoadError
from leaktap.controller.kernel import abi, loader
from leaktap.controller.kernel.loss import LossMonitor
from leaktap.controller.plaintext.events import SslEvent, SslEventDecoder, ssl_stat_names
from leaktap.controller.plaintext.golang import (
    GoBinary,
    GoBinaryFinder,
    go_executable,
    is_go_probe_set,
)
from leaktap.controller.plaintext.libraries import (
    LIBSSL_SONAME,
    SslLibraryFinder,
    find_shared_library,
)
from leaktap.controller.plaintext.procs import (
    PROC,
    Library,
    ProcessInfo,
    ProcessSelector,
    library_at,
    list_pids,
    read_process,
    ssl_libraries,
)
from leaktap.controller.plaintext.sockets import SocketResolver

logger = logging.getLogger(__name__)

MAPS_RESCAN_S = 1.0
# closing a uprobe waits for an RCU grace period (~100 ms each here) and holds up
# attaches meanwhile; detaches wait for this long without exec, exit or mmap
# notices (a job runner's next exec often follows the last one's exit)
DETACH_QUIET_S = 0.5
# ...but no longer than this after the exit: a node that execs every few hundred
# ms is never quiet, and each undetached probe is a kernel perf event kept
DETACH_WAIT_MAX_S = 60.0
# an exit notice's process is looked at again after these delays until it is gone
EXIT_RECHECK_S = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
BINDINGS_MAX = 65536
SECRET_BYTES = 32
SECRET_FILE = "plaintext-hmac.key"
LOSS_DRAIN_S = 1.0
COVERAGE_MAX = 65536  # connections whose captured/lost bytes are followed
PROCESSES_MAX = 4096  # processes whose lost bytes are followed
# lost-byte reasons that mean a flood blinded the probe (an alert), as opposed
# to the middle of one very large write skipped (counted, and the audit's concern)
BLINDING_REASONS = ("rate_limited", "ringbuf_full")
# a CRM connection is reported as mostly unseen once it wrote this much and lost
# more than UNSEEN_SHARE of it
UNSEEN_MIN_BYTES = 64 * 1024
UNSEEN_SHARE = 0.5

REMEDIES = {
    "ssl_loss_ringbuf_full": "the controller fell behind: raise the plaintext ring buffer",
    "ssl_loss_rate_limited": "a process wrote more than plaintext.events_per_second chunks "
    "of plaintext.max_bytes; raise it if that rate is expected",
    "ssl_loss_chunk_bound": "a write longer than the chunks one write may send: its head and "
    "tail are inspected, the middle is counted as lost",
    "ssl_loss_lost_record": "a connection's lost bytes could not be recorded (map full)",
    "ssl_loss_read_user": "plaintext not readable (paged out); the write is seen without content",
    "ssl_loss_bind_event": "a connection's socket binding was lost; its next write retries",
    "ssl_loss_notify": "an exec/fork/exit/mmap notice was lost; the periodic rescan catches up",
    "ssl_loss_bind_giveup": "a memory-BIO write was not followed by a TLS send",
    "ssl_loss_read_unmatched": "an SSL_read returned without its call seen (probed mid-call, "
    "or more threads in SSL_read than plaintext.threads_max): that answer is not paired",
    "ssl_loss_read_length": "SSL_read_ex's byte count was unreadable: that read is unseen",
    "ssl_loss_write_unmatched": "an SSL_write returned without its call seen (probed mid-call, "
    "or more threads in SSL_write than plaintext.threads_max): that write is not inspected",
    "ssl_loss_go_fd": "a Go tls.Conn's socket was not readable from its net.Conn (not TCP, "
    "or a Go struct layout not known): it is learned from the write's send syscall",
    "ssl_loss_go_unmatched": "a Go Read returned without its call seen (probed mid-call, or "
    "more goroutines in Read than plaintext.threads_max): that read is not inspected",
}

OnFinding = Callable[[Finding], None]
OnAudit = Callable[[BulkAudit], None]


@dataclass(slots=True)
class ConnectionCoverage:
    """Plaintext bytes of one TLS connection: delivered by the kernel, or lost and why."""

    tenant: str
    pid: int
    comm: str
    captured: int = 0
    lost: Counter[str] = field(default_factory=Counter)
    crm: tuple[str, str | None] | None = None  # (vendor, instance) once known
    destination: str | None = None
    reported_unseen: bool = False

    @property
    def written(self) -> int:
        return self.captured + sum(self.lost.values())


# lt_ssl_lost key.dir of bytes a process read (enum lt_ssl_dir)
READ_DIRECTION = abi.enums()["lt_ssl_dir"]["LT_SSL_DIR_READ"]


def lost_reason_names() -> list[str]:
    """lt_ssl_lost.bytes[] index -> reason name, e.g. rate_limited."""
    reasons = abi.enums()["lt_ssl_lost_reason"]
    names = [""] * reasons["LT_SSL_LOST_MAX"]
    for member, value in reasons.items():
        if member != "LT_SSL_LOST_MAX":
            names[value] = member.removeprefix("LT_SSL_LOST_").lower()
    return names


def load_or_create_secret(path: Path) -> bytes:
    """The per-install HMAC key; created with mode 0600 when missing."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(SECRET_BYTES))
        logger.info("created the token-hash key %s", path)
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"plaintext.hmac_secret_file: cannot read {path}: {e.strerror}") from e
    if path.stat().st_mode & 0o077:
        logger.warning("%s is readable by other users: chmod 600 it", path)
    if len(data) < 16:
        raise ConfigError(f"plaintext.hmac_secret_file: {path} holds fewer than 16 bytes")
    return data


class _Environments:
    """Environment label of a write: plaintext.environments, the tenant's, the node's."""

    def __init__(self, config: LeaktapConfig) -> None:
        self._rules: list[tuple[re.Pattern[str] | None, frozenset[int], str]] = [
            (re.compile(fnmatch.translate(e.cgroup)) if e.cgroup else None, frozenset(e.uids),
             str(e.label))
            for e in config.plaintext.environments
        ]
        self._tenant: dict[str, str] = {
            t.name: str(t.environment) for t in config.tenants if t.environment}
        self._node: str | None = config.environment

    def label(self, cgroup: str | None, uid: int | None, tenant: str) -> str | None:
        for rx, uids, label in self._rules:
            if (rx is not None and cgroup is not None and rx.match(cgroup)) or (
                    uid is not None and uid in uids):
                return label
        return self._tenant.get(tenant, self._node)


def build_inspector(config: LeaktapConfig, hasher: KeyedHasher,
                    attributor: Attributor) -> ContentInspector:
    pt = config.plaintext
    canaries = CanaryMatcher([
        Canary(c.token, c.tenant or "any", c.record, c.environment) for c in pt.canaries
    ])
    policies = {
        name: TenantPolicy(FieldPolicy(p.encrypted_fields, p.envelope_prefixes),
                           tuple(p.bulk_operations))
        for name, p in pt.tenants.items()
    }

    def resolve_host(host: str) -> tuple[str, str | None] | None:
        crm = attributor.catalogue.lookup(host)
        return (crm.vendor, crm.instance) if crm is not None else None

    return ContentInspector(hasher, canaries, policies, resolve_host,
                            limits=StreamLimits.from_settings(pt.streams))


class PlaintextMonitor:
    """Probes selected processes' OpenSSL writes and inspects them."""

    def __init__(
        self,
        config: LeaktapConfig,
        attributor: Attributor,
        on_finding: OnFinding,
        on_audit: OnAudit,
        *,
        proc: Path = PROC,
        system_library: str | None = None,
        ssl_options: loader.SslOptions | None = None,
    ) -> None:
        self.config = config
        pt = config.plaintext
        self.attributor = attributor
        self.on_finding = on_finding
        self.on_audit = on_audit
        self.proc = proc
        self.select_all = pt.select == "all"
        self.selector = ProcessSelector(pt.select) if not isinstance(pt.select, str) else None
        self.options = ssl_options or loader.SslOptions(
            snap_bytes=pt.max_bytes, events_per_sec=pt.events_per_second,
            mmap_all=self.select_all, pin_root=config.kernel.pin_root or str(loader.PIN_ROOT))
        secret_path = Path(pt.hmac_secret_file) if pt.hmac_secret_file else (
            Path(config.storage.path or DEFAULT_DB).parent / SECRET_FILE)
        self.hasher = KeyedHasher(load_or_create_secret(secret_path))
        self.inspector = build_inspector(config, self.hasher, attributor)
        self.finder = SslLibraryFinder()
        self.go_finder = GoBinaryFinder()
        # selected Go processes and what their executable held (coverage: a reason
        # when it could not be probed, e.g. "go without symbol tables")
        self.go_processes: OrderedDict[int, GoBinary] = OrderedDict()
        self.coverage: OrderedDict[tuple[int, int], ConnectionCoverage] = OrderedDict()
        self.process_lost: OrderedDict[int, Counter[str]] = OrderedDict()
        self._process_crms: OrderedDict[int, tuple[str, str | None]] = OrderedDict()
        self._lost_reasons = lost_reason_names()
        self._last_loss_drain = 0.0
        self.mmap_attach_latency_ms: list[float] = []  # mmap -> probes attached, last 100
        # told of each exec/mmap handled (the coverage report re-judges that process)
        self.on_process_change: Callable[[int], None] | None = None
        self.environments = _Environments(config)
        self.sockets = SocketResolver(proc)
        self._system_library = system_library
        self.probes: loader.SslProbes | None = None
        self.libraries: dict[tuple[int, int], Library] = {}
        self.probed: dict[int, set[tuple[int, int]]] = {}  # pid -> library keys
        self._bindings: OrderedDict[tuple[int, int], int] = OrderedDict()  # (tgid, ssl) -> fd
        self._exes: OrderedDict[int, str] = OrderedDict()  # tgid -> executable path
        self.counters: Counter[str] = Counter()
        self.loss = LossMonitor(prefix="ssl_loss_", remedies=REMEDIES)
        self._lock = threading.RLock()  # probes, probed, libraries
        self._work: queue.Queue[tuple[str, int, int]] = queue.Queue()
        # (pid, library paths, when queued)
        self._detach_queue: queue.Queue[tuple[int, list[str], float]] = queue.Queue()
        self._last_notice_monotonic = 0.0
        self._exit_checks: dict[int, tuple[float, int]] = {}  # pid -> (due, tries), work thread
        self.attach_latency_ms: list[float] = []  # exec -> probes attached, last 100
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_drain_monotonic = 0.0
        self._decoder: SslEventDecoder | None = None
        self._system_key: tuple[int, int] | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        library = self._system_library or find_shared_library(LIBSSL_SONAME)
        self.probes = loader.load_ssl(self.options)
        try:
            self._decoder = SslEventDecoder(self.probes.table("lt_ssl_scratch").sLeaf)
            self.probes.table("lt_ssl_events").open_ring_buffer(self._on_raw)
            if library is not None:
                lib = library_at(library)
                if lib is not None:
                    self.libraries[lib.key] = lib
                    self._system_key = lib.key
                    self.probes.symbols(lib.path)  # read once, before the first exec
            if not self.libraries:
                logger.warning("%s not found: only libssl copies processes map are probed",
                               LIBSSL_SONAME)
            self.loss.check(self.kernel_stats())
            self.rescan()
        except Exception:
            self.probes.close()
            self.probes = None
            raise
        for name, target in (("lt-ssl-drain", self._drain_loop),
                             ("lt-ssl-attach", self._work_loop),
                             ("lt-ssl-detach", self._detach_loop),
                             ("lt-ssl-rescan", self._rescan_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        mode = "every process (select: all)" if self.select_all else (
            f"{len(self.probed)} selected process(es)")
        logger.info("plaintext inspection on %s, %d byte(s) per write", mode,
                    self.options.snap_bytes)

    def stop(self) -> None:
        self._stop.set()
        self._work.put(("stop", 0, 0))
        self._detach_queue.put((-2, [], 0.0))
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        with self._lock:
            if self.probes is not None:
                self._drain(0)
                self.drain_lost()
                self.probes.close()  # detaches every uprobe and tracepoint
                self.probes = None
            self.probed.clear()
        logger.info("plaintext inspection stopped")

    def __enter__(self) -> PlaintextMonitor:
        self.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()

    # -- for the agent and the API ----------------------------------------------

    def add_canary(self, token: str, tenant: str | None, record: str = "canary",
                   environment: str | None = None) -> None:
        """Register a canary at run time (admin API); takes effect on the next write."""
        self.inspector.canaries.add(Canary(token, tenant or "any", record, environment))

    def probed_pids(self) -> dict[int, list[str]]:
        with self._lock:
            return {pid: sorted(self.libraries[k].path for k in keys if k in self.libraries)
                    for pid, keys in self.probed.items()}

    def kernel_stats(self) -> dict[str, int]:
        """lt_ssl_stats by name, summed over CPUs (monotonic)."""
        if self.probes is None:
            return {}
        table = self.probes.table("lt_ssl_stats")
        return {name: sum(int(v) for v in table[table.Key(i)])
                for i, name in enumerate(ssl_stat_names())}

    def stats(self) -> dict[str, int]:
        """Kernel counters plus the controller's (plaintext_* names), for /metrics."""
        out = self.kernel_stats()
        out.update({f"plaintext_{k}": v for k, v in self.counters.items()})
        out.update({f"plaintext_{k}": v for k, v in self.go_finder.counters.items()})
        # the stream inspector's give-ups and losses, by reason
        out.update({f"plaintext_stream_{k}": v for k, v in self.inspector.stats.items()})
        out["plaintext_probed_processes"] = len(self.probed)
        return out

    def check_loss(self) -> dict[str, int]:
        """Log the rise of each loss counter since the last call (the agent's poll)."""
        rises: dict[str, int] = self.loss.check(self.kernel_stats())
        return rises

    def ready(self) -> tuple[bool, str]:
        if self.probes is None:
            return False, "plaintext probes not loaded"
        if time.monotonic() - self.last_drain_monotonic > 5:
            return False, "plaintext ring buffer not drained for 5 s"
        return True, "ok"

    # -- selection and attachment --------------------------------------------------

    def rescan(self) -> None:
        """Probe every process that should be, unprobe the rest (a full /proc pass)."""
        started = time.monotonic()
        if self.select_all:
            self._attach_all()
        else:
            live = set()
            for pid in list_pids(self.proc):
                if pid == os.getpid():
                    continue  # never inspect ourselves (the sinks' own HTTPS)
                info = read_process(pid, self.proc)
                if info is None:
                    continue
                live.add(pid)
                self._reconsider(info)
            for pid in [p for p in self.probed if p not in live]:
                self._unprobe(pid, "gone")
        self.counters["rescans"] += 1
        self.counters["rescan_ms_total"] += int((time.monotonic() - started) * 1000)

    def _attach_all(self, pids: list[int] | None = None) -> bool:
        """select: all: probe every TLS library of `pids` (default: every process)
        for every process; True when a library was newly probed."""
        for pid in list_pids(self.proc) if pids is None else pids:
            for lib in ssl_libraries(pid, self.proc, self.finder):
                self.libraries.setdefault(lib.key, lib)
            go = self._go_library(pid)
            if go is not None:
                self.libraries.setdefault(go.key, go)
        new = False
        with self._lock:
            if self.probes is None:
                return False
            for key, lib in self.libraries.items():
                if (lib.path, -1) not in self.probes.attached:
                    new = self._attach(lib, -1) or new
                    self.probed.setdefault(-1, set()).add(key)
        return new

    def _reconsider(self, info: ProcessInfo) -> bool:
        """Probe or unprobe one process; True when it is (now) probed."""
        assert self.selector is not None
        if self.selector.matches(info):
            self._probe(info.pid)
            return info.pid in self.probed
        if info.pid in self.probed:
            self._unprobe(info.pid, "no longer selected")
        return False

    def _attach(self, lib: Library, pid: int) -> bool:
        assert self.probes is not None
        if is_go_probe_set(lib.addresses) and self.probes.addresses.get(lib.path) != dict(
                lib.addresses):
            # a Go program rebuilt in place (a new inode, the same path) has new
            # addresses: probing it at the old ones would trap mid-instruction (a
            # process still running the old file keeps its probes until it exits)
            self.probes.detach(lib.path, pid)
            self.probes.addresses[lib.path] = dict(lib.addresses)
        elif lib.addresses:  # read with the library test: BCC need not read the ELF again
            self.probes.addresses.setdefault(lib.path, dict(lib.addresses))
        try:
            self.probes.attach(lib.path, pid)
        except ProbeLoadError as e:
            logger.warning("%s", e)
            self.counters["attach_failures"] += 1
            return False
        return True

    def _probe(self, pid: int) -> bool:
        """Attach to the system libssl (before the process maps it, so no write of a
        fresh process escapes) and to every other TLS library it maps; True when a
        library was newly probed."""
        libs = {lib.key: lib for lib in ssl_libraries(pid, self.proc, self.finder)}
        go = self._go_library(pid)
        if go is not None:
            libs[go.key] = go
        with self._lock:
            if self.probes is None:
                return False
            for key, lib in libs.items():
                self.libraries.setdefault(key, lib)
            keys = set(libs)
            if pid not in self.probed and self._system_key is not None:
                keys.add(self._system_key)
            have = self.probed.setdefault(pid, set())
            new = False
            for key in keys - have:
                if self._attach(self.libraries[key], pid):
                    have.add(key)
                    new = True
            if new:
                pids = self.probes.table("lt_ssl_pids")
                pids[pids.Key(pid)] = pids.Leaf(1)
                self.counters["attached"] += 1
                logger.info("probing pid %d (%s)", pid,
                            ", ".join(sorted(self.libraries[k].path for k in have)))
            return new

    def _go_library(self, pid: int) -> Library | None:
        """`pid`'s executable when it is a Go program using crypto/tls (its probe
        points in the Library's addresses); a Go binary that cannot be probed is
        remembered with its reason for the coverage report."""
        lib, found = go_executable(pid, self.proc, self.go_finder)
        if found is not None and (found.uses_tls or found.reason is not None):
            self.go_processes[pid] = found
            self.go_processes.move_to_end(pid)
            if len(self.go_processes) > PROCESSES_MAX:
                self.go_processes.popitem(last=False)
        else:
            self.go_processes.pop(pid, None)  # exec'd something else, or a reused pid
        return lib

    def _unprobe(self, pid: int, why: str) -> None:
        """Forget `pid` at once; its uprobes are closed on the detach thread, because
        closing one waits for an RCU grace period (tens of ms) and attaches must not."""
        with self._lock:
            keys = self.probed.pop(pid, None)
            if keys is None or self.probes is None:
                return
            paths = [self.libraries[key].path for key in keys]
            pids = self.probes.table("lt_ssl_pids")
            try:
                del pids[pids.Key(pid)]
            except KeyError:
                pass  # the exit tracepoint removed it
        self._detach_queue.put((pid, paths, time.monotonic()))
        # a process's last, unfinished messages are inspected as it goes
        self._handle_result(self.inspector.forget_where(
            lambda conn: isinstance(conn, tuple) and conn[0] == pid))
        for b in [b for b in self._bindings if b[0] == pid]:
            self._bindings.pop(b, None)
        self._exes.pop(pid, None)  # a pid reused by another program
        self.counters["detached"] += 1
        logger.info("stopped probing pid %d (%s)", pid, why)

    def _detach_loop(self) -> None:
        while True:
            pid, paths, queued = self._detach_queue.get()
            if pid < -1:
                return
            # an attach waits behind a running detach in the kernel: let fresh
            # processes be probed first (a quiet moment, looked for again before
            # each library's detach), exited ones can wait
            for path in paths:
                self._wait_quiet(queued + DETACH_WAIT_MAX_S)
                probes = self.probes
                if probes is None:
                    break
                probes.detach(path, pid)

    def _wait_quiet(self, deadline: float) -> None:
        while (not self._stop.is_set() and time.monotonic() < deadline
               and time.monotonic() - self._last_notice_monotonic < DETACH_QUIET_S):
            self._stop.wait(DETACH_QUIET_S)

    # -- threads -----------------------------------------------------------------

    def _drain(self, timeout_ms: int) -> None:
        assert self.probes is not None
        if timeout_ms:
            self.probes.bpf.ring_buffer_poll(timeout_ms)
        # chunks sent without a wakeup (ssl_emit batches them) are read by a consume:
        # a poll that timed out reads nothing
        self.probes.bpf.ring_buffer_consume()
        self.last_drain_monotonic = time.monotonic()

    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain(100)
                if time.monotonic() - self._last_loss_drain >= LOSS_DRAIN_S:
                    self._last_loss_drain = time.monotonic()
                    self.drain_lost()
                    self.inspector.expire_exchanges()
            except Exception:  # noqa: BLE001 - keep draining; the error is logged
                logger.exception("draining plaintext events")
                time.sleep(0.1)

    def _work_loop(self) -> None:
        while True:
            try:
                what, pid, ts_ns = self._work.get(timeout=self._next_exit_check())
            except queue.Empty:
                self._recheck_exits()
                continue
            if what == "stop" or self._stop.is_set():
                return
            try:
                if what == "exec":
                    info = read_process(pid, self.proc)
                    if info is not None and self.selector is not None:
                        if self._reconsider(info):
                            latency = (time.monotonic_ns() - ts_ns) / 1e6
                            self.attach_latency_ms = [*self.attach_latency_ms[-99:], latency]
                            logger.debug("pid %d probed %.1f ms after its exec", pid, latency)
                    elif info is None:
                        self._unprobe(pid, "gone")
                elif what == "exit":
                    self._exit_checks[pid] = (time.monotonic(), 0)
                elif what == "mmap":
                    self._on_mapping(pid, ts_ns)
                if what in ("exec", "mmap") and self.on_process_change is not None:
                    self.on_process_change(pid)
                if self._exit_checks:  # due ones too when notices never let get() time out
                    self._recheck_exits()
            except Exception:  # noqa: BLE001 - one process must not stop the others
                logger.exception("handling %s of pid %d", what, pid)

    def _next_exit_check(self) -> float | None:
        """Seconds until the next exit re-check is due (None: none waiting)."""
        if not self._exit_checks:
            return None
        return max(0.0, min(due for due, _ in self._exit_checks.values()) - time.monotonic())

    def _recheck_exits(self) -> None:
        """Unprobe the processes whose exit was reported once they are gone or zombies.
        The notice comes from inside the exit, usually before the process is a zombie:
        it is looked at again after EXIT_RECHECK_S delays, then left to the rescan."""
        now = time.monotonic()
        for pid, (due, tries) in list(self._exit_checks.items()):
            if due > now:
                continue
            info = read_process(pid, self.proc)
            if info is None or info.zombie:
                del self._exit_checks[pid]
                self._unprobe(pid, "exited")
            elif tries < len(EXIT_RECHECK_S):
                self._exit_checks[pid] = (now + EXIT_RECHECK_S[tries], tries + 1)
            else:  # its leader left, its threads did not: the rescan decides
                del self._exit_checks[pid]

    def _on_mapping(self, pid: int, ts_ns: int) -> None:
        """A process mapped a file executable: probe it if it is a TLS library."""
        self.counters["mappings_checked"] += 1
        if self.select_all:
            new = self._attach_all([pid])
        elif pid in self.probed:
            new = self._probe(pid)
        else:
            return
        if new:
            latency = (time.monotonic_ns() - ts_ns) / 1e6
            self.mmap_attach_latency_ms = [*self.mmap_attach_latency_ms[-99:], latency]
            logger.info("a TLS library mapped by pid %d probed %.1f ms after the mmap",
                        pid, latency)

    def _rescan_loop(self) -> None:
        interval = self.config.plaintext.rescan_interval_s
        next_full = time.monotonic() + interval
        while not self._stop.wait(MAPS_RESCAN_S):
            try:
                if time.monotonic() >= next_full:
                    next_full = time.monotonic() + interval
                    self.rescan()
                elif not self.select_all:
                    for pid in list(self.probed):
                        if pid in self.probed:
                            self._probe(pid)  # libssl copies loaded since
            except Exception:  # noqa: BLE001 - keep rescanning; the error is logged
                logger.exception("rescanning processes")

    # -- events ------------------------------------------------------------------

    def _on_raw(self, _ctx: Any, data: int, size: int) -> int:
        assert self._decoder is not None
        try:
            ev = self._decoder.decode(ctypes.string_at(data, size))
        except ValueError as e:
            self.counters["undecodable_events"] += 1
            logger.warning("undecodable plaintext event: %s", e)
            return 0
        try:
            if ev.kind in ("write", "read"):
                self._on_write(ev)
            elif ev.kind == "bind":
                self._remember_binding(ev.tgid, ev.ssl_ptr, ev.fd)
            elif ev.kind in ("exec", "exit", "fork") and not self.select_all:
                self._last_notice_monotonic = time.monotonic()
                # a forked child is judged as a fresh program would be (its probes
                # are per process: none of its parent's fires in its memory)
                what = "exec" if ev.kind == "fork" else ev.kind
                self._work.put((what, ev.tgid, ev.ts_ns))
            elif ev.kind == "mmap":
                self._last_notice_monotonic = time.monotonic()  # attaches first
                self._work.put(("mmap", ev.tgid, ev.ts_ns))
        except Exception:  # noqa: BLE001 - one bad write must not stop the drain
            self.counters["inspection_errors"] += 1
            logger.exception("inspecting a %s event of pid %d", ev.kind, ev.tgid)
        return 0

    def _remember_binding(self, tgid: int, ssl_ptr: int, fd: int) -> None:
        self._bindings[tgid, ssl_ptr] = fd
        self._bindings.move_to_end((tgid, ssl_ptr))
        if len(self._bindings) > BINDINGS_MAX:
            self._bindings.popitem(last=False)

    def _exe(self, tgid: int) -> str:
        """`tgid`'s executable path (cached per process; "" when unreadable)."""
        exe = self._exes.get(tgid)
        if exe is None:
            try:
                exe = os.readlink(self.proc / str(tgid) / "exe")
            except OSError:
                exe = ""
            self._exes[tgid] = exe
            if len(self._exes) > PROCESSES_MAX:
                self._exes.popitem(last=False)
        return exe

    def context(self, ev: SslEvent, direction: str = TO_CRM) -> WriteContext:
        """Tenant, environment and destination of a write (or a read)."""
        a = self.attributor
        fd = ev.fd if ev.fd >= 0 else self._bindings.get((ev.tgid, ev.ssl_ptr), -1)
        ends = self.sockets.resolve(ev.tgid, fd) if fd >= 0 else None
        sni = vendor = instance = destination = None
        src = None
        if ends is not None:
            self.counters["joined_writes"] += 1
            src = ends.local[0]
            sni, dns_names, crm = a.destination(ends.family, ends.local, ends.remote,
                                                cgroup_id=ev.cgroup_id)
            destination = sni or (dns_names[0] if dns_names else
                                  f"{ends.remote[0]}:{ends.remote[1]}")
            if crm is not None:
                vendor, instance = crm.vendor, crm.instance
        else:
            self.counters["unjoined_writes"] += 1
        cgroup = a.cgroups.path(ev.cgroup_id)
        tenant = a.tenants.resolve(cgroup_path=cgroup, uid=ev.uid, src_ip=src, sni=sni)
        return WriteContext(
            conn=(ev.tgid, ev.ssl_ptr), tenant=tenant,
            environment=self.environments.label(cgroup, ev.uid, tenant),
            crm_vendor=vendor, crm_instance=instance, destination=destination,
            pid=ev.tgid, comm=ev.comm, ts=time.time(),
            direction=direction,
            exe=self._exe(ev.tgid),
        )

    def _on_write(self, ev: SslEvent) -> None:
        """One chunk of a write (or a read): [data_off, data_off + len(data)) of req_len
        bytes."""
        if ev.kind == "read":
            self._on_read(ev)
            return
        if ev.data_off == 0:
            self.counters["writes"] += 1
        self.counters["chunks"] += 1
        self.counters["captured_bytes"] += len(ev.data)
        ctx = self.context(ev)
        result = self.inspector.inspect(ctx, ev.data, ev.req_len, offset=ev.data_off)
        self.counters["inspected_writes"] += 1
        cov = self._coverage(ctx)
        cov.captured += len(ev.data)
        if cov.crm is None:
            self._learn_crm(ctx, cov)
        if result.named_instance is not None:
            self._refine_instance(ev, result.named_instance)
        self.counters[f"protocol_{result.protocol.replace('/', '_').replace('.', '_')}"] += 1
        self._handle_result(result)

    def _on_read(self, ev: SslEvent) -> None:
        """One chunk of what a read returned: the connection's from_crm stream."""
        if ev.data_off == 0:
            self.counters["reads"] += 1
        self.counters["read_chunks"] += 1
        self.counters["captured_read_bytes"] += len(ev.data)
        self._handle_result(self.inspector.inspect(self.context(ev, FROM_CRM), ev.data,
                                                   ev.req_len, offset=ev.data_off))

    def _handle_result(self, result: Any) -> None:
        """Deliver an Inspection's audit records and findings."""
        if result.undecodable_headers:
            self.counters["h2_undecodable_header_blocks"] += result.undecodable_headers
        for audit in result.audits:
            self.counters["bulk_calls"] += 1
            self._deliver(self.on_audit, audit)
        for finding in result.findings:
            self.counters[f"finding_{finding.kind}"] += 1
            self._deliver(self.on_finding, finding)

    def _refine_instance(self, ev: SslEvent, named: tuple[str, str]) -> None:
        """A request named the CRM instance behind a shared host: its flow takes it
        (named_by plaintext). Rare: once per connection and instance."""
        fd = ev.fd if ev.fd >= 0 else self._bindings.get((ev.tgid, ev.ssl_ptr), -1)
        ends = self.sockets.resolve(ev.tgid, fd) if fd >= 0 else None
        if ends is not None and self.attributor.refine_instance(
            ends.family, ends.local, ends.remote, named[0], named[1]
        ):
            self.counters["instances_named"] += 1

    # -- coverage: bytes captured and lost ------------------------------------------

    def _coverage(self, ctx: WriteContext) -> ConnectionCoverage:
        key = ctx.conn
        assert isinstance(key, tuple)
        cov = self.coverage.get(key)
        if cov is None:
            cov = self.coverage[key] = ConnectionCoverage(ctx.tenant, ctx.pid, ctx.comm)
            if len(self.coverage) > COVERAGE_MAX:
                self.coverage.popitem(last=False)
                self.counters["coverage_evicted"] += 1
        else:
            self.coverage.move_to_end(key)
        if ctx.destination is not None:
            cov.destination = ctx.destination
        return cov

    def _crm_of(self, ctx: WriteContext) -> tuple[str, str | None] | None:
        """The CRM a connection talks to: its flow's, else the Host its requests named."""
        if ctx.crm_vendor:
            return ctx.crm_vendor, ctx.crm_instance
        host = self.inspector.connection_host(ctx.conn)
        crm = self.attributor.catalogue.lookup(host) if host else None
        return (crm.vendor, crm.instance) if crm is not None else None

    def drain_lost(self) -> int:
        """Take the kernel's per-connection lost bytes (lookup and delete) and account,
        report and alert on them; returns the connections drained."""
        if self.probes is None:
            return 0
        table = self.probes.table("lt_ssl_lost")
        drained = 0
        for key, value in table.items_lookup_and_delete_batch():
            drained += 1
            lost = {name: int(value.bytes[i]) for i, name in enumerate(self._lost_reasons)
                    if value.bytes[i]}
            if lost and int(key.dir) == READ_DIRECTION:
                self._account_read_lost(key.tgid, key.ssl_ptr, value, lost)
            elif lost:
                self._account_lost(key.tgid, key.ssl_ptr, value, lost)
        return drained

    @staticmethod
    def _lost_event(tgid: int, ssl_ptr: int, value: Any) -> SslEvent:
        return SslEvent(kind="lost", ts_ns=0, cgroup_id=int(value.cgroup_id), ssl_ptr=ssl_ptr,
                        req_len=0, data_off=0, pid=tgid, tgid=tgid, uid=int(value.uid),
                        fd=int(value.fd), comm=bytes(value.comm).split(b"\0", 1)[0].decode(
                            "utf-8", "replace"), data=b"")

    def _account_read_lost(self, tgid: int, ssl_ptr: int, value: Any,
                           lost: dict[str, int]) -> None:
        """Bytes of answers the kernel did not deliver: a gap in the from_crm stream
        (its exchanges are cut), counted; no blinding alert (nothing left unseen)."""
        ctx = self.context(self._lost_event(tgid, ssl_ptr, value), FROM_CRM)
        for reason, nbytes in lost.items():
            self.counters[f"uncaptured_read_bytes_{reason}"] += nbytes
            self._handle_result(self.inspector.lost(ctx, nbytes, reason))

    def _account_lost(self, tgid: int, ssl_ptr: int, value: Any, lost: dict[str, int]) -> None:
        ctx = self.context(self._lost_event(tgid, ssl_ptr, value), TO_CRM)
        cov = self._coverage(ctx)
        per_process = self.process_lost.get(tgid)
        if per_process is None:
            per_process = self.process_lost[tgid] = Counter()
            if len(self.process_lost) > PROCESSES_MAX:
                self.process_lost.popitem(last=False)
        else:
            self.process_lost.move_to_end(tgid)
        for reason, nbytes in lost.items():
            self.counters[f"uncaptured_bytes_{reason}"] += nbytes
            cov.lost[reason] += nbytes
            per_process[reason] += nbytes
            self._handle_result(self.inspector.lost(ctx, nbytes, reason))
        if cov.crm is None:
            self._learn_crm(ctx, cov)
        crm = cov.crm or self._process_crms.get(tgid)
        blinded = {r: n for r, n in lost.items() if r in BLINDING_REASONS}
        if blinded and crm is not None:
            self._evaded(ctx, crm, cov.destination, blinded, int(value.writes))
        if crm is not None and not cov.reported_unseen:
            self._report_unseen(ctx, crm, cov)

    def _learn_crm(self, ctx: WriteContext, cov: ConnectionCoverage) -> None:
        """Record the CRM of a connection, and of its process: a flood on one
        connection blinds the process's other connections too."""
        cov.crm = self._crm_of(ctx)
        if cov.crm is not None:
            self._process_crms[ctx.pid] = cov.crm
            self._process_crms.move_to_end(ctx.pid)
            if len(self._process_crms) > PROCESSES_MAX:
                self._process_crms.popitem(last=False)

    def _evaded(self, ctx: WriteContext, crm: tuple[str, str | None], destination: str | None,
                blinded: dict[str, int], writes: int) -> None:
        total = sum(blinded.values())
        reasons = ", ".join(f"{n} B to {r.replace('_', ' ')}" for r, n in sorted(
            blinded.items()))
        lost = ",".join(sorted(blinded))
        finding = Finding(
            kind="inspection_evaded", tenant=ctx.tenant, severity="high",
            summary=(f"{ctx.comm} (pid {ctx.pid}) lost {total} bytes of TLS plaintext in "
                     f"{writes} write(s) uninspected ({reasons}) while talking to "
                     f"{crm[0]}:{crm[1] or '?'}"),
            crm_vendor=crm[0], crm_instance=crm[1], destination=destination,
            # the inspector's stream-side evasions use the same evidence keys
            evidence={"finding": "inspection_evaded", "pid": ctx.pid, "comm": ctx.comm,
                      "source": "kernel", "lost": lost, "lost_bytes": total,
                      "lost_by_reason": blinded, "writes": writes,
                      "process_lost_by_reason": dict(self.process_lost.get(ctx.pid, {}))},
            dedup_key=dedup_key("inspection_evaded", ctx.tenant, ctx.comm, "kernel:" + lost,
                                destination or crm[0]),
        )
        self.counters["finding_inspection_evaded"] += 1
        self._deliver(self.on_finding, finding)

    def _report_unseen(self, ctx: WriteContext, crm: tuple[str, str | None],
                       cov: ConnectionCoverage) -> None:
        written = cov.written
        unseen = written - cov.captured
        if written < UNSEEN_MIN_BYTES or unseen <= written * UNSEEN_SHARE:
            return
        cov.reported_unseen = True
        self.counters["unseen_connections"] += 1
        # an audit row of its own kind: /v1/audit lists it beside the API calls
        self._deliver(self.on_audit, BulkAudit(
            ts=time.time(), tenant=ctx.tenant, crm_vendor=crm[0], crm_instance=crm[1],
            destination=cov.destination, operation="inspection:unseen",
            action=f"{unseen} of {written} bytes unseen ("
                   + ", ".join(f"{r} {n}" for r, n in sorted(cov.lost.items())) + ")",
            method="", path="", request_bytes=written, allowed=False, protocol="tls",
            pid=ctx.pid, comm=ctx.comm))

    def _deliver(self, callback: Callable[[Any], None], item: Any) -> None:
        try:
            callback(item)
        except Exception:  # noqa: BLE001 - a failing sink must not stop inspection
            self.counters["callback_errors"] += 1
            logger.exception("delivering a plaintext %s", type(item).__name__)
