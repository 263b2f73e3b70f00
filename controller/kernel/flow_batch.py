"""The flow map drained into columns (issue 16.5: 100,000 flows a second).

lt_flows is taken out BATCH_ENTRIES entries per BPF_MAP_LOOKUP_AND_DELETE_BATCH
into two reused numpy buffers typed from the map's own key and value types (the
ctypes classes BCC or the compile child's manifest derived from the C
declarations), and the CPUs are summed with array operations: no Python object
is made per flow here. Each entry becomes one row of a FlowBatch; the agent
turns rows into objects only for conversations it has not seen before.
Same semantics as maps.MapReader.drain_flows: CPUs without a packet are ignored,
the earliest CPU slot gives first_seen and the uid, the drain time is last_seen.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from leaktap.controller.kernel.maps import FlowCounters, FlowKey, addr_bytes, addr_text
from leaktap.controller.kernel.pinned import libbpf

# entries per batch syscall (the buffers are reused from drain to drain)
BATCH_ENTRIES = 4096
# a conversation's identity in one packet direction, as bytes (FlowBatch.idents):
# endpoints and ports, family and protocol; cgroup and hook left out, as conversation_id does
IDENT = np.dtype([("saddr", "V16"), ("daddr", "V16"), ("sport", "<u2"), ("dport", "<u2"),
                  ("family", "u1"), ("proto", "u1"), ("pad", "<u2")])
U64_MAX = np.iinfo(np.uint64).max

Array = npt.NDArray[Any]


@dataclass(slots=True)
class FlowBatch:
    """Drained flow entries as columns, one row per kernel entry, CPUs summed."""

    cgroup_id: Array  # u64
    family: Array  # u8
    proto: Array  # u8
    dir: Array  # u8
    sport: Array  # u16
    dport: Array  # u16
    saddr: Array  # (n, 16) u8: the key's address bytes (network order)
    daddr: Array
    tx_bytes: Array  # u64
    tx_packets: Array  # u64
    first_seen_ns: Array  # u64
    uid: Array  # u32
    flags: Array  # u32
    now_ns: int  # the drain time: every entry's last_seen_ns

    def __len__(self) -> int:
        return len(self.tx_bytes)

    def rows(self, start: int, stop: int) -> FlowBatch:
        """Rows start..stop, as views (no copy)."""
        return FlowBatch(**{name: getattr(self, name)[start:stop] for name in _COLUMNS},
                         now_ns=self.now_ns)

    def idents(self) -> Array:
        """Each row's conversation identity in its packet direction: (n,) V40 (IDENT)."""
        out = np.zeros(len(self), IDENT)
        out["saddr"] = np.ascontiguousarray(self.saddr).view("V16").ravel()
        out["daddr"] = np.ascontiguousarray(self.daddr).view("V16").ravel()
        out["sport"], out["dport"] = self.sport, self.dport
        out["family"], out["proto"] = self.family, self.proto
        return out.view(f"V{IDENT.itemsize}").ravel()

    def key(self, i: int) -> FlowKey:
        family = int(self.family[i])
        return FlowKey(
            int(self.cgroup_id[i]), family, int(self.proto[i]), int(self.dir[i]),
            addr_text(family, self.saddr[i].tobytes()),
            addr_text(family, self.daddr[i].tobytes()),
            int(self.sport[i]), int(self.dport[i]),
        )

    def counters(self, i: int) -> FlowCounters:
        """Row `i` as the object drain_flows returns (for the rows that need one)."""
        return FlowCounters(self.key(i), int(self.tx_bytes[i]), int(self.tx_packets[i]),
                            int(self.first_seen_ns[i]), self.now_ns, int(self.uid[i]),
                            int(self.flags[i]))

    @classmethod
    def from_counters(cls, flows: list[FlowCounters]) -> FlowBatch:
        """A batch of already-made flow objects (readers without a raw drain, tests)."""
        n = len(flows)
        saddr = np.frombuffer(b"".join(addr_bytes(f.key.src) for f in flows),
                              np.uint8).reshape(n, 16).copy()
        daddr = np.frombuffer(b"".join(addr_bytes(f.key.dst) for f in flows),
                              np.uint8).reshape(n, 16).copy()

        def col(values: list[int], dtype: Any) -> Array:
            return np.array(values, dtype=dtype)

        return cls(
            cgroup_id=col([f.key.cgroup_id for f in flows], np.uint64),
            family=col([f.key.family for f in flows], np.uint8),
            proto=col([f.key.proto for f in flows], np.uint8),
            dir=col([f.key.dir for f in flows], np.uint8),
            sport=col([f.key.sport for f in flows], np.uint16),
            dport=col([f.key.dport for f in flows], np.uint16),
            saddr=saddr, daddr=daddr,
            tx_bytes=col([f.tx_bytes for f in flows], np.uint64),
            tx_packets=col([f.tx_packets for f in flows], np.uint64),
            first_seen_ns=col([f.first_seen_ns for f in flows], np.uint64),
            uid=col([f.uid for f in flows], np.uint32),
            flags=col([f.flags for f in flows], np.uint32),
            now_ns=max((f.last_seen_ns for f in flows), default=time.monotonic_ns()),
        )


def _errno(rc: int) -> int:
    return -rc if rc < 0 else (ctypes.get_errno() or errno.EIO)


class FlowDrain:
    """Drains one flow map (BCC's table or a pinned one: both have map_fd, Key, Leaf),
    then the front cache of established flows when the programs have one
    (kernel/front_cache.py's FrontCache, whose drain takes its idle bank): a flow in
    both is two rows of the batch, which the conversation table adds up."""

    def __init__(self, table: Any, front: Any = None) -> None:
        self.table = table
        self.front = front
        self.key_dtype = np.dtype(table.Key)
        self.leaf_dtype = np.dtype(table.Leaf)  # per-CPU: a (CPUs,) sub-array
        self.chunk = min(BATCH_ENTRIES, max(1, int(table.max_entries)))
        self._keys = np.empty(self.chunk, self.key_dtype)
        self._values = np.empty(self.chunk, self.leaf_dtype)
        token = max(8, self.key_dtype.itemsize)
        self._in = ctypes.create_string_buffer(token)
        self._out = ctypes.create_string_buffer(token)

    def _grow(self, chunk: int) -> None:
        self.chunk = chunk
        self._keys = np.empty(chunk, self.key_dtype)
        self._values = np.empty(chunk, self.leaf_dtype)

    def drain(self) -> FlowBatch:
        """Take every entry out of the map, each atomically with its read."""
        parts = list(self.chunks())
        now_ns = parts[0].now_ns if parts else time.monotonic_ns()
        return _batch([{name: getattr(p, name) for name in _COLUMNS} for p in parts], now_ns)

    def chunks(self) -> Iterator[FlowBatch]:
        """drain() one syscall's entries at a time (then the front cache's): a caller
        folding each in as it comes never holds the whole drain."""
        call = libbpf().bpf_map_lookup_and_delete_batch
        fd = int(self.table.map_fd)
        now_ns = time.monotonic_ns()
        first = True
        while True:
            count = ctypes.c_uint32(self.chunk)
            rc = call(fd, None if first else self._in, self._out,
                      self._keys.ctypes.data_as(ctypes.c_void_p),
                      self._values.ctypes.data_as(ctypes.c_void_p), ctypes.byref(count), None)
            err = _errno(rc) if rc < 0 else 0
            if err == errno.ENOSPC and count.value == 0 and self.chunk < self.table.max_entries:
                self._grow(min(self.chunk * 2, int(self.table.max_entries)))  # a full bucket
                continue
            if err not in (0, errno.ENOENT):
                raise OSError(err, f"batch read of lt_flows: {os.strerror(err)}")
            if count.value:
                yield _batch([_merge_cpus(self._keys[: count.value],
                                          self._values[: count.value])], now_ns)
            if err == errno.ENOENT:
                break
            ctypes.memmove(self._in, self._out, len(self._in))
            first = False
        if self.front is not None:
            cached = self.front.drain()
            if cached:
                yield _batch([_cached_columns(cached)], now_ns)


def _cached_columns(cached: list[Any]) -> dict[str, Array]:
    """Columns of the front cache's flows (CachedFlow: a ctypes lt_flow_key and sums)."""
    def col(attr: str, dtype: Any, of_key: bool = True) -> Array:
        return np.array([int(getattr(f.key if of_key else f, attr)) for f in cached], dtype)

    def addrs(attr: str) -> Array:
        raw = b"".join(bytes(getattr(f.key, attr)) for f in cached)
        return np.frombuffer(raw, np.uint8).reshape(-1, 16).copy()

    return {
        "cgroup_id": col("cgroup_id", np.uint64), "family": col("family", np.uint8),
        "proto": col("proto", np.uint8), "dir": col("dir", np.uint8),
        "sport": col("sport", np.uint16), "dport": col("dport", np.uint16),
        "saddr": addrs("saddr"), "daddr": addrs("daddr"),
        "tx_bytes": col("tx_bytes", np.uint64, False),
        "tx_packets": col("tx_packets", np.uint64, False),
        "first_seen_ns": col("first_seen_ns", np.uint64, False),
        "uid": col("uid", np.uint32, False), "flags": col("flags", np.uint32, False),
    }


def _merge_cpus(keys: Array, values: Array) -> dict[str, Array]:
    """One chunk's columns (copies): CPUs summed, entries without a packet left out."""
    if values.ndim == 1:
        values = values[:, None]
    packets = values["tx_packets"]
    active = packets > 0
    tx_packets = packets.sum(axis=1, dtype=np.uint64)
    kept = tx_packets > 0
    first_all = np.where(active, values["first_seen_ns"], U64_MAX)
    earliest = first_all.argmin(axis=1)
    rows = np.arange(len(values))
    k = keys[kept]
    return {
        "cgroup_id": k["cgroup_id"].astype(np.uint64),
        "family": k["family"].astype(np.uint8), "proto": k["proto"].astype(np.uint8),
        "dir": k["dir"].astype(np.uint8),
        "sport": k["sport"].astype(np.uint16), "dport": k["dport"].astype(np.uint16),
        "saddr": np.ascontiguousarray(k["saddr"]).view(np.uint8).reshape(-1, 16),
        "daddr": np.ascontiguousarray(k["daddr"]).view(np.uint8).reshape(-1, 16),
        "tx_bytes": np.where(active, values["tx_bytes"], 0).sum(axis=1, dtype=np.uint64)[kept],
        "tx_packets": tx_packets[kept],
        "first_seen_ns": first_all[rows, earliest][kept],
        "uid": values["uid"][rows, earliest][kept].astype(np.uint32),
        "flags": np.bitwise_or.reduce(np.where(active, values["flags"], 0), axis=1)[kept]
        .astype(np.uint32),
    }


_COLUMNS = ("cgroup_id", "family", "proto", "dir", "sport", "dport", "saddr", "daddr",
            "tx_bytes", "tx_packets", "first_seen_ns", "uid", "flags")
_EMPTY = {"cgroup_id": np.uint64, "family": np.uint8, "proto": np.uint8, "dir": np.uint8,
          "sport": np.uint16, "dport": np.uint16, "tx_bytes": np.uint64,
          "tx_packets": np.uint64, "first_seen_ns": np.uint64, "uid": np.uint32,
          "flags": np.uint32}


def _batch(parts: list[dict[str, Array]], now_ns: int) -> FlowBatch:
    cols: dict[str, Array] = {}
    for name in _COLUMNS:
        if parts:
            cols[name] = np.concatenate([p[name] for p in parts]) if len(parts) > 1 else (
                parts[0][name])
        elif name in ("saddr", "daddr"):
            cols[name] = np.zeros((0, 16), np.uint8)
        else:
            cols[name] = np.zeros(0, _EMPTY[name])
    return FlowBatch(now_ns=now_ns, **cols)
