"""Connect-time refusal (bpf/cgroup_connect.bpf.c): loading, attaching, its maps, its ring.

The programs are attached at the root of the cgroup v2 hierarchy, once: they run
for every descendant, and the maps say which cgroups (and uids) belong to which
enforcing tenant and which addresses each is refused. Attaching per tenant cgroup
instead would need a new attachment for every cgroup a glob comes to match; the
map is updated in place, and a cgroup created under a tenant's is that tenant's
in the kernel at once (the program looks up the deepest mapped ancestor).

Tenants matched by source CIDR are not judged at connect (an unbound socket has
no source address yet); their hellos are judged in TC egress.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leaktap.controller.enforcement import cgroup_attach
from leaktap.controller.kernel import loader

logger = logging.getLogger(__name__)

ATTACH_TYPES = loader.CGROUP_ATTACH_TYPES  # connect4 / connect6
PROGRAM_PREFIX = "lt_cg_connect"
MODES = {"monitor": 0, "dry-run": 1, "block": 2}
MODE_NAMES = {v: k for k, v in MODES.items()}


@dataclass(frozen=True, slots=True)
class ConnectEvent:
    """A connect() of an enforcing tenant to a refused address (refused in block mode)."""

    ts_ns: int
    cgroup_id: int
    pid: int
    uid: int
    tenant: int
    mode: str  # block | dry-run
    proto: int
    daddr: str
    dport: int
    rule: int


# (tenant index, AF_INET | AF_INET6, 16 address bytes)
RefusedKey = tuple[int, int, bytes]


class ConnectGuard:
    """The loaded connect programs and the contents of their maps."""

    def __init__(self, cgroup_root: Path, on_event: Callable[[ConnectEvent], None]) -> None:
        self.cgroup_root = cgroup_root
        self.on_event = on_event
        self.probes: Any = None
        self.attached = False
        self.received = 0
        self._cgroups: dict[int, tuple[int, int]] = {}
        self._uids: dict[int, tuple[int, int]] = {}
        self._refused: dict[RefusedKey, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._event_class: Any = None
        self._links_dir = loader.PIN_ROOT / loader.LINKS_DIR
        self._links: dict[str, tuple[Path, int]] = {}  # direction -> (pin, link fd)

    def load(self, pin_root: str) -> None:
        """Compile (in the compiler child) and open the programs; nothing runs yet."""
        self._links_dir = Path(pin_root) / loader.LINKS_DIR
        self.probes = loader.load("connect", loader.KernelOptions(pin=False, pin_root=pin_root))
        self._event_class = self.probes.table("lt_cg_scratch").sLeaf
        self.probes.table("lt_cg_events").open_ring_buffer(self._on_record)

    def attach(self) -> None:
        """Attach both programs to the cgroup root through pinned links: a crashed
        run's programs, still enforcing its last policy, are swapped for these."""
        stale = remove_stale(self.cgroup_root)
        if stale:
            logger.warning("removed %d connect program(s) left on %s by an earlier version",
                           stale, self.cgroup_root)
        suffix = f"-{os.stat(self.cgroup_root).st_ino}"
        # links left on another cgroup root (the configuration changed) are released
        for pin in sorted(self._links_dir.glob("connect*")) if self._links_dir.exists() else ():
            if not pin.name.endswith(suffix):
                logger.warning("releasing connect link %s of another cgroup root", pin)
                cgroup_attach.release_link(pin, -1)
        for direction, attach_type in ATTACH_TYPES.items():
            pin = self._links_dir / f"{direction}{suffix}"
            replaces = pin.exists()
            link = cgroup_attach.attach_link(self.probes.fd(direction), self.cgroup_root,
                                             attach_type, pin)
            self._links[direction] = (pin, link)
            if replaces:
                logger.info("%s: replaced the program an earlier run left in %s", direction, pin)
        self.attached = True
        self._thread = threading.Thread(target=self._drain, name="lt-connect", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Detach (fail open) and release the programs and maps."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.probes is None:
            return
        for direction, (pin, link) in self._links.items():
            if not self.attached:  # as after a crash: the pinned link keeps the program
                os.close(link)
                continue
            try:
                cgroup_attach.release_link(pin, link)
            except Exception as e:  # noqa: BLE001 - keep detaching the other
                logger.error("detaching %s from %s: %s", direction, self.cgroup_root, e)
        self._links.clear()
        self.attached = False
        self.probes.bpf.ring_buffer_consume()
        self.probes.close()
        self.probes = None

    # -- maps ---------------------------------------------------------------------

    def set_tenants(self, cgroups: Mapping[int, tuple[int, str]],
                    uids: Mapping[int, tuple[int, str]]) -> None:
        """cgroup id / uid -> (tenant index, mode); tenant 0 marks a cgroup no tenant
        claims below one that is claimed. New entries first, then stale ones go."""
        self._cgroups = self._sync("lt_cg_tenant", self._cgroups, {
            k: (t, MODES[m]) for k, (t, m) in cgroups.items()})
        self._uids = self._sync("lt_uid_tenant", self._uids, {
            k: (t, MODES[m]) for k, (t, m) in uids.items()})

    def set_refused(self, refused: Mapping[RefusedKey, int]) -> None:
        self._refused = self._sync("lt_refused", self._refused, dict(refused))

    def _sync(self, name: str, old: Mapping[Any, Any], new: dict[Any, Any]) -> dict[Any, Any]:
        table = self.probes.table(name)
        for key, value in new.items():
            if old.get(key) != value:
                table[self._key(table, key)] = self._leaf(table, value)
        for key in old.keys() - new.keys():
            try:
                del table[self._key(table, key)]
            except KeyError:
                pass
        return new

    @staticmethod
    def _key(table: Any, key: Any) -> Any:
        if isinstance(key, tuple):  # lt_refused_key
            k = table.Key()
            k.tenant, k.family = key[0], key[1]
            ctypes.memmove(k.addr, key[2], 16)
            return k
        return table.Key(key)

    @staticmethod
    def _leaf(table: Any, value: Any) -> Any:
        if isinstance(value, tuple):  # struct lt_cg_tenant
            leaf = table.Leaf()
            leaf.tenant, leaf.mode = value
            return leaf
        return table.Leaf(value)

    @property
    def refused_count(self) -> int:
        return len(self._refused)

    def lost(self) -> int:
        """Decisions not reported because the ring was full (they were still enforced)."""
        if self.probes is None:
            return 0
        table = self.probes.table("lt_cg_lost")
        return sum(int(v) for v in table[table.Key(0)])

    # -- ring -------------------------------------------------------------------

    def _drain(self) -> None:
        while not self._stop.is_set():
            self.probes.bpf.ring_buffer_poll(100)

    def _on_record(self, _ctx: Any, data: int, size: int) -> int:
        cls = self._event_class
        raw = ctypes.string_at(data, size).ljust(ctypes.sizeof(cls), b"\0")
        ev = cls.from_buffer_copy(raw)
        family = socket.AF_INET if ev.family == socket.AF_INET else socket.AF_INET6
        addr = bytes(ev.daddr)[: 4 if family == socket.AF_INET else 16]
        event = ConnectEvent(
            ts_ns=int(ev.ts_ns), cgroup_id=int(ev.cgroup_id), pid=int(ev.pid_tgid) >> 32,
            uid=int(ev.uid), tenant=int(ev.tenant), mode=MODE_NAMES.get(int(ev.mode), "block"),
            proto=int(ev.proto), daddr=socket.inet_ntop(family, addr), dport=int(ev.dport),
            rule=int(ev.rule),
        )
        self.received += 1
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 - one bad event must not stop the drain
            logger.exception("handling a connect decision")
        return 0


def remove_stale(cgroup_root: Path) -> int:
    """Detach leaktap connect programs left on the cgroup root (a crashed run's)."""
    return sum(cgroup_attach.detach_by_prefix(cgroup_root, t, PROGRAM_PREFIX)
               for t in ATTACH_TYPES.values())


def attached_here(cgroup_root: Path) -> int:
    """How many leaktap connect programs are attached to the cgroup root (doctor)."""
    return sum(1 for t in ATTACH_TYPES.values()
               for _, name in cgroup_attach.attached_programs(cgroup_root, t)
               if name.startswith(PROGRAM_PREFIX))
