"""Draining the kernel's front cache of established flows (bpf/include/lt_fcache.h).

A data packet of an established flow is counted in a cache entry of its CPU's region
of lt_fcache, not in lt_flows nor lt_cgtot. The kernel writes only the bank
lt_fgen[0] & 1 selects, so
the drain flips the generation, waits for an RCU grace period (every program that
read the old generation has returned: TC and XDP programs run inside RCU read-side
sections) and then owns the idle bank alone: it reads the entries, zeroes them, and
adds their egress volume to lt_cgdrained, the per-cgroup totals only user space
writes. Each byte is taken exactly once: by the kernel's fold into lt_flows and
lt_cgtot while its entry's bank is active, or by this drain once it is idle.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import time
from dataclasses import dataclass
from typing import Any

from leaktap.controller.kernel import abi

logger = logging.getLogger(__name__)

# membarrier(2): MEMBARRIER_CMD_GLOBAL waits for synchronize_rcu()
_NR_MEMBARRIER = {"x86_64": 324, "aarch64": 283}
MEMBARRIER_CMD_GLOBAL = 1
# where membarrier is refused (nohz_full): a wait far longer than any TC program
FALLBACK_GRACE_S = 0.05
EGRESS = 0


@dataclass(frozen=True, slots=True)
class CachedFlow:
    """One flow's volume taken from the idle bank, summed over CPUs."""

    key: Any  # the ctypes struct lt_flow_key
    tx_bytes: int
    tx_packets: int
    first_seen_ns: int
    uid: int
    flags: int


def rcu_grace_period() -> None:
    """Return once every BPF program running now has returned."""
    libc = ctypes.CDLL(None, use_errno=True)
    nr = _NR_MEMBARRIER.get(platform.machine())
    if nr is not None and libc.syscall(nr, MEMBARRIER_CMD_GLOBAL, 0, 0) == 0:
        return
    logger.debug("membarrier unavailable (errno %d): waiting %.0f ms instead",
                 ctypes.get_errno(), FALLBACK_GRACE_S * 1e3)
    time.sleep(FALLBACK_GRACE_S)


class FrontCache:
    """The drain of lt_fcache and the per-cgroup volume it has taken (lt_cgdrained)."""

    def __init__(self, probes: Any) -> None:
        self._cache = probes.table("lt_fcache")
        self._gen = probes.table("lt_fgen")
        self._drained = probes.table("lt_cgdrained")
        self.slots = 1 << abi.defines()["LT_FCACHE_BITS"]
        self.flips = 0

    def _bank(self, bank: int) -> dict[int, Any]:
        """{index: entry} of the bank's filled slots, every CPU's region."""
        out = {}
        for key, e in self._cache.items_lookup_batch():
            index = int(getattr(key, "value", key))
            # CPU c's region: [c * 2 * slots, (c + 1) * 2 * slots), bank 1 its second half
            if (index // self.slots) % 2 == bank and e.key.family:
                out[index] = e
        return out

    def drain(self) -> list[CachedFlow]:
        """Take the volume of every entry (nothing when no slot is filled)."""
        zero = self._gen.Key(0)
        gen = int(self._gen[zero].value)
        if not self._bank(gen & 1):
            return []
        self._gen[zero] = self._gen.Leaf(gen + 1)
        self.flips += 1
        rcu_grace_period()
        idle = self._bank(gen & 1)  # copies: the map can be zeroed under them
        flows: dict[bytes, CachedFlow] = {}
        for e in idle.values():
            if not e.packets:
                continue
            raw = bytes(e.key)
            seen = flows.get(raw)
            if seen is None:
                flows[raw] = CachedFlow(type(e.key).from_buffer_copy(raw), int(e.bytes),
                                        int(e.packets), int(e.first_seen_ns), int(e.uid),
                                        int(e.flags))
                continue
            first, uid = seen.first_seen_ns, seen.uid
            if e.first_seen_ns < first:  # the earliest CPU's entry, as lt_flows' drain
                first, uid = int(e.first_seen_ns), int(e.uid)
            flows[raw] = CachedFlow(seen.key, seen.tx_bytes + int(e.bytes),
                                    seen.tx_packets + int(e.packets), first, uid,
                                    seen.flags | int(e.flags))
        # taken out of the map, then counted where cgroup totals live: a crash in
        # between loses this bank's cgroup volume (as one after lt_flows' lookup-and-
        # delete loses its flows), never counts it twice
        for index in idle:
            self._cache[self._cache.Key(index)] = self._cache.Leaf()
        self._add_cgroups(flows.values())
        return list(flows.values())

    def _add_cgroups(self, flows: Any) -> None:
        volume: dict[int, list[int]] = {}
        for f in flows:
            if int(f.key.dir) == EGRESS:
                v = volume.setdefault(int(f.key.cgroup_id), [0, 0])
                v[0] += f.tx_bytes
                v[1] += f.tx_packets
        for cgroup_id, (b, p) in volume.items():
            key = self._drained.Key(cgroup_id)
            try:
                old = self._drained[key]
                b, p = b + int(old.bytes), p + int(old.packets)
            except KeyError:
                pass
            leaf = self._drained.Leaf()
            leaf.bytes, leaf.packets = b, p
            try:
                self._drained[key] = leaf
            except OSError as e:  # full: the bytes stay in lt_totals (unattributed)
                logger.warning("lt_cgdrained: %s; cgroup %d's cached volume is lost", e,
                               cgroup_id)

    def cgroup_totals(self) -> dict[int, tuple[int, int]]:
        """{cgroup id: (bytes, packets)} the drain took out of the cache."""
        out = {}
        for key, v in self._drained.items_lookup_batch():
            out[int(getattr(key, "value", key))] = (int(v.bytes), int(v.packets))
        return out

    def remove_cgroups(self, cgroup_ids: list[int]) -> dict[int, tuple[int, int]]:
        out = {}
        for cgroup_id in cgroup_ids:
            key = self._drained.Key(cgroup_id)
            try:
                v = self._drained[key]
                del self._drained[key]
            except KeyError:
                continue
            out[cgroup_id] = (int(v.bytes), int(v.packets))
        return out
