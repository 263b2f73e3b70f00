"""Reading leaktap's kernel maps: flow drains, totals and loss counters.

Flows are drained with BPF_MAP_LOOKUP_AND_DELETE_BATCH (never items() then
clear(), which loses updates between the two), so whatever is in lt_flows has
not been accounted yet; that is also what makes a restart on pinned maps
lose nothing. Totals and stats are monotonic and only ever read.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from leaktap.controller.errors import ProbeLoadError
from leaktap.controller.kernel import abi
from leaktap.controller.kernel.front_cache import CachedFlow, FrontCache

logger = logging.getLogger(__name__)


def format_addr(family: int, words: Any) -> str:
    """Address from the key's u32[4] (network byte order in memory).

    `words` is the ctypes array itself (its memory is the address bytes) or a
    sequence of four ints as read on this little-endian host."""
    raw = bytes(words) if hasattr(words, "_length_") else b"".join(
        int(w).to_bytes(4, "little") for w in words
    )
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == 6:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return ""


def addr_words(addr: str) -> list[int]:
    """Inverse of format_addr: the u32[4] a key holds for `addr`."""
    packed = ipaddress.ip_address(addr).packed.ljust(16, b"\0")
    return [int.from_bytes(packed[i : i + 4], "little") for i in range(0, 16, 4)]


@dataclass(frozen=True, slots=True)
class FlowKey:
    """A flow in packet direction (src sent the packets counted under it)."""

    cgroup_id: int
    family: int
    proto: int
    dir: int
    src: str
    dst: str
    sport: int
    dport: int

    def reversed(self) -> FlowKey:
        return FlowKey(
            self.cgroup_id, self.family, self.proto, self.dir,
            self.dst, self.src, self.dport, self.sport,
        )


@dataclass(slots=True)
class FlowCounters:
    """One drained flow entry, summed over CPUs."""

    key: FlowKey
    tx_bytes: int
    tx_packets: int
    first_seen_ns: int
    last_seen_ns: int
    uid: int
    flags: int


def key_from_ctypes(k: Any) -> FlowKey:
    return FlowKey(
        cgroup_id=int(k.cgroup_id),
        family=int(k.family),
        proto=int(k.proto),
        dir=int(k.dir),
        # a node talks from few addresses to few CRM endpoints: share the strings
        src=sys.intern(format_addr(k.family, k.saddr)),
        dst=sys.intern(format_addr(k.family, k.daddr)),
        sport=int(k.sport),
        dport=int(k.dport),
    )


def _merge_cpus(key: Any, per_cpu: Any, now_ns: int) -> FlowCounters | None:
    """Sum one entry's per-CPU values; the key is filled in by the caller.

    The kernel does not stamp each packet (a clock read per packet): an entry
    lives at most one drain interval, so the drain time is its last packet."""
    tx_bytes = tx_packets = flags = 0
    first = 0
    uid = 0xFFFFFFFF
    for v in per_cpu:
        if not v.tx_packets:
            continue
        tx_bytes += v.tx_bytes
        tx_packets += v.tx_packets
        flags |= v.flags
        if not first or v.first_seen_ns < first:
            # the earliest slot's owner: each CPU's slot is stamped by its first packet
            first, uid = v.first_seen_ns, v.uid
    if not tx_packets:
        return None
    return FlowCounters(_NO_KEY, tx_bytes, tx_packets, first, now_ns, uid, flags)


_NO_KEY = FlowKey(0, 0, 0, 0, "", "", 0, 0)


def _merge_cached(out: list[FlowCounters], cached: list[CachedFlow], keys: dict[bytes, FlowKey],
                  previous: dict[bytes, FlowKey], now_ns: int) -> None:
    """Add the front cache's flows to the drained ones (same key: one flow)."""
    index = {c.key: c for c in out}
    for f in cached:
        raw = bytes(f.key)
        flow_key = keys.get(raw) or previous.get(raw) or key_from_ctypes(f.key)
        keys[raw] = flow_key
        c = index.get(flow_key)
        if c is None:
            c = index[flow_key] = FlowCounters(flow_key, f.tx_bytes, f.tx_packets,
                                               f.first_seen_ns, now_ns, f.uid, f.flags)
            out.append(c)
            continue
        c.tx_bytes += f.tx_bytes
        c.tx_packets += f.tx_packets
        c.flags |= f.flags
        if f.first_seen_ns and (not c.first_seen_ns or f.first_seen_ns < c.first_seen_ns):
            c.first_seen_ns, c.uid = f.first_seen_ns, f.uid

# enum lt_sni_outcome -> name
SNI_OUTCOMES = {0: "named", 1: "no_name", 2: "malformed", 3: "limit"}
_OUTCOME_NAMES = tuple(SNI_OUTCOMES[i] for i in range(len(SNI_OUTCOMES)))


def addr_text(family: int, raw: bytes) -> str:
    """format_addr of a key's 16 address bytes, interned (a node talks to few addresses)."""
    if family == 4:
        return sys.intern(socket.inet_ntop(socket.AF_INET, raw[:4]))
    if family == 6:
        return sys.intern(socket.inet_ntop(socket.AF_INET6, raw))
    return ""


@dataclass(frozen=True, slots=True)
class KernelName:
    """The kernel's reading of one flow's ClientHello (lt_names): the server name when
    `outcome` is "named"; the same name, or none, as controller/protocols/tls.py reads."""

    key: FlowKey
    name: str | None
    outcome: str  # named | no_name | malformed | limit
    ech: bool
    uid: int
    seq: int  # TCP sequence of the hello's first byte
    ts_ns: int
    ifindex: int


# One kernel reading as drained (MapReader.drain_name_rows): family, proto, src, sport,
# dst, dport, name, outcome, ech, cgroup_id, dir, uid, seq, ts_ns, ifindex (KernelName's
# fields, flat: the agent's poll handles 50,000 a second)
NameRow = tuple[int, int, str, int, str, int, str | None, str, bool, int, int, int, int, int,
                int]


def name_row(name: KernelName) -> NameRow:
    """A KernelName as the NameRow drain_name_rows gives for it (for readers that hold
    objects, such as test doubles)."""
    k = name.key
    return (k.family, k.proto, k.src, k.sport, k.dst, k.dport, name.name, name.outcome,
            name.ech, k.cgroup_id, k.dir, name.uid, name.seq, name.ts_ns, name.ifindex)


# struct lt_flow_key and the head of struct lt_name_rec as bytes (the drain parses
# lt_names chunks without a ctypes object per entry); checked against the types BCC
# derived from the header when a MapReader opens the map
_FLOW_KEY = struct.Struct("=Q16s16sHHBBBx")
_NAME_REC_HEAD = struct.Struct("=QIIIHBB")
_NAME_REC_FIELDS = ("ts_ns", "uid", "ifindex", "seq", "name_len", "outcome", "ech")
_FLOW_KEY_FIELDS = ("cgroup_id", "saddr", "daddr", "sport", "dport", "family", "proto", "dir")
# lt_names entries per batch syscall: 16384 x 328 B of buffers, reused within a drain
NAMES_CHUNK = 16384


def addr_bytes(addr: str) -> bytes:
    """A text address as struct lt_flow_key holds it: 16 bytes, IPv4 in the first 4
    ("": no address, 16 zero bytes); the reverse of addr_text."""
    if not addr:
        return bytes(16)
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET,
                            addr).ljust(16, b"\0")


def _check_layout(ctype: Any, fmt: struct.Struct, fields: tuple[str, ...]) -> None:
    """The struct format's fields sit where the C type has them (ABI drift is a bug)."""
    offset = 0
    for name, code in zip(fields, _format_codes(fmt), strict=True):
        if getattr(ctype, name).offset != offset:
            raise ProbeLoadError(f"{ctype.__name__}.{name} moved: update maps.py's formats")
        offset += struct.calcsize("=" + code)


def _format_codes(fmt: struct.Struct) -> list[str]:
    codes, count = [], ""
    for ch in fmt.format.lstrip("=<>!@"):
        if ch.isdigit():
            count += ch
        elif ch != "x":
            codes.append(count + ch)
            count = ""
    return codes


def _parse_names(keys: Any, values: Any, count: int, out: list[NameRow],
                 addrs: dict[bytes, str], names: dict[bytes, str | None]) -> None:
    """Append the NameRow of each of `count` raw lt_names entries (keys and values as
    the map holds them); `addrs` and `names` cache the texts across calls."""
    append = out.append
    outcomes = _OUTCOME_NAMES
    vsize = len(values) // (len(keys) // _FLOW_KEY.size)
    rec = struct.Struct(f"{_NAME_REC_HEAD.format}{vsize - _NAME_REC_HEAD.size}s")
    for (cgroup, saddr, daddr, sport, dport, family, proto, direction), (
            ts_ns, uid, ifindex, seq, name_len, outcome, ech, raw) in zip(
            _FLOW_KEY.iter_unpack(keys[:count * _FLOW_KEY.size]),
            rec.iter_unpack(values[:count * vsize]), strict=True):
        src = addrs.get(saddr)
        if src is None:
            src = addrs[saddr] = addr_text(family, saddr)
        dst = addrs.get(daddr)
        if dst is None:
            dst = addrs[daddr] = addr_text(family, daddr)
        name = names.get(raw)
        if name is None and raw not in names:
            text = raw[:name_len].decode("ascii", "replace") if name_len else None
            name = names[raw] = sys.intern(text) if text else None
        append((family, proto, src, sport, dst, dport, name,
                outcomes[outcome] if outcome < len(outcomes) else f"unknown_{outcome}",
                ech != 0, cgroup, direction, uid, seq, ts_ns, ifindex))


def _add_totals(out: dict[int, tuple[int, int]], more: dict[int, tuple[int, int]]) -> None:
    """Add `more`'s (bytes, packets) per cgroup to `out`'s."""
    for cgroup_id, (b, p) in more.items():
        b0, p0 = out.get(cgroup_id, (0, 0))
        out[cgroup_id] = (b0 + b, p0 + p)


class MapReader:
    """Reads one loaded program set's maps (see bpf/include/lt_maps.h)."""

    def __init__(self, probes: Any) -> None:
        self._flows = probes.table("lt_flows")
        self._stats = probes.table("lt_stats")
        self._totals = probes.table("lt_totals")
        self._cgtot = probes.table("lt_cgtot")
        self._hello = probes.table("lt_hello")
        self._hello_bufs = probes.table("lt_hello_bufs")
        self._names = probes.table("lt_names")
        _check_layout(self._names.Key, _FLOW_KEY, _FLOW_KEY_FIELDS)
        _check_layout(self._names.Leaf, _NAME_REC_HEAD, _NAME_REC_FIELDS)
        if ctypes.sizeof(self._names.Key) != _FLOW_KEY.size:
            raise ProbeLoadError("lt_flow_key changed size: update maps.py's formats")
        self._stat_names = abi.stat_names()
        self._keys: dict[bytes, FlowKey] = {}
        self._front = FrontCache(probes)

    def drain_flows(self) -> list[FlowCounters]:
        """Atomically take every flow entry out of the map."""
        out = []
        # keys of the previous drain only: flows active now were mostly active
        # then, and memory stays bounded by one drain's flows
        keys: dict[bytes, FlowKey] = {}
        previous = self._keys
        self._keys = keys
        now_ns = time.monotonic_ns()
        for key, per_cpu in self._flows.items_lookup_and_delete_batch():
            merged = _merge_cpus(key, per_cpu, now_ns)
            if merged is None:
                continue
            # long-lived flows come back every drain: format their key once
            raw = bytes(key)
            flow_key = previous.get(raw)
            if flow_key is None:
                flow_key = key_from_ctypes(key)
            keys[raw] = flow_key
            merged.key = flow_key
            out.append(merged)
        # then the front cache (lt_fcache.h): flows whose entries were drained above
        # come back fresh (probed again) after this flip
        cached = self._front.drain()
        if cached:
            _merge_cached(out, cached, keys, previous, now_ns)
        return out

    def drain_names(self) -> list[KernelName]:
        """Take every server name the kernel read since the last drain, as objects."""
        return [KernelName(FlowKey(r[9], r[0], r[1], r[10], r[2], r[4], r[3], r[5]),
                           r[6], r[7], r[8], r[11], r[12], r[13], r[14])
                for r in self.drain_name_rows()]

    def drain_name_rows(self) -> list[NameRow]:
        """Take every server name the kernel read since the last drain, as NameRow tuples:
        NAMES_CHUNK entries per syscall, parsed from the chunk's bytes without an object
        per entry (issue 12: the agent's poll keeps up with 50,000 new flows/s)."""
        out: list[NameRow] = []
        addrs: dict[bytes, str] = {}  # a node talks from and to few addresses
        names: dict[bytes, str | None] = {}  # and to few hosts
        for keys, values, count in self._name_chunks():
            if count:
                _parse_names(keys, values, count, out, addrs, names)
        return out

    def peek_name(self, key: FlowKey) -> NameRow | None:
        """One flow's kernel reading while it waits in lt_names for the next drain (left
        there: the drain still takes and counts it). A plaintext write comes right after
        its hello, before the poll, and must be joined to the name."""
        raw = _FLOW_KEY.pack(key.cgroup_id, addr_bytes(key.src), addr_bytes(key.dst),
                             key.sport, key.dport, key.family, key.proto, key.dir)
        try:
            rec = self._names[self._names.Key.from_buffer_copy(raw)]
        except (KeyError, OSError):
            return None
        out: list[NameRow] = []
        _parse_names(raw, bytes(rec), 1, out, {}, {})
        return out[0]

    def _name_chunks(self) -> Iterator[tuple[Any, Any, int]]:
        """lt_names taken out in raw chunks; BCC's own tables (in-process compile) have no
        raw batches: their entries are turned into the same bytes, one chunk each."""
        chunks = getattr(self._names, "lookup_and_delete_chunks", None)
        if chunks is not None:
            yield from chunks(NAMES_CHUNK)
            return
        for key, rec in self._names.items_lookup_and_delete_batch():
            yield memoryview(bytes(key)), memoryview(bytes(rec)), 1

    def stats(self) -> dict[str, int]:
        """Monotonic counters by reason name, summed over CPUs."""
        out = {}
        for index, name in enumerate(self._stat_names):
            out[name] = sum(int(v) for v in self._stats[self._stats.Key(index)])
        return out

    def totals(self) -> dict[int, tuple[int, int]]:
        """{direction: (bytes, packets)} over every packet seen, parsed or not."""
        out = {}
        for direction in range(len(self._totals)):
            per_cpu = self._totals[self._totals.Key(direction)]
            out[direction] = (sum(v.bytes for v in per_cpu), sum(v.packets for v in per_cpu))
        return out

    def cgroup_totals(self) -> dict[int, tuple[int, int]]:
        """{cgroup id: (bytes, packets)} of egress traffic (never evicted)."""
        out = {}
        for key, per_cpu in self._cgtot.items_lookup_batch():
            # BCC yields a scalar key from its ctypes key array as a plain int
            cgroup_id = int(getattr(key, "value", key))
            out[cgroup_id] = (sum(v.bytes for v in per_cpu), sum(v.packets for v in per_cpu))
        _add_totals(out, self._front.cgroup_totals())  # what the drain took from the cache
        return out

    def remove_cgroups(self, cgroup_ids: list[int]) -> dict[int, tuple[int, int]]:
        """Read, then delete, the totals of cgroups that no longer exist.

        A packet of a dying cgroup's last socket landing between the read and the
        delete is lost; the reaper only removes ids absent for two scans."""
        out = {}
        for cgroup_id in cgroup_ids:
            key = self._cgtot.Key(cgroup_id)
            try:
                per_cpu = self._cgtot[key]
                del self._cgtot[key]
            except KeyError:
                continue
            out[cgroup_id] = (sum(v.bytes for v in per_cpu), sum(v.packets for v in per_cpu))
        _add_totals(out, self._front.remove_cgroups(cgroup_ids))
        return out

    def expire_hellos(self, max_age_ns: int) -> int:
        """Delete followed ClientHellos that never completed (their flow died or
        the rest was lost); lt_hello is not LRU, so nothing else frees them."""
        cutoff = time.monotonic_ns() - max_age_ns
        stale = [k for k, v in self._hello.items() if v.created_ns < cutoff]
        for k in stale:
            for table in (self._hello, self._hello_bufs):  # a buffered hello's bytes too
                try:
                    del table[k]
                except KeyError:
                    pass  # completed meanwhile
        return len(stale)
