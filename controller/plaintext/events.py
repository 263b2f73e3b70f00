"""Decoding lt_ssl_events records (struct lt_ssl_event) into Python objects.

The kernel submits only the filled part of each record (header + cap_len
bytes); the header is decoded from a padded copy with the ctypes class BCC
derives for lt_ssl_scratch (its event() cannot map the __u64-style types).
The plaintext stays in `data` only until the inspector has scanned it.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import Any

from leaktap.controller.kernel import abi


@dataclass(slots=True)
class SslEvent:
    """One record: a chunk of a write, a binding, or an exec/exit/mmap notice."""

    kind: str  # write | read | bind | exec | exit | mmap
    ts_ns: int
    cgroup_id: int
    ssl_ptr: int
    req_len: int  # bytes the application asked to write (a read: bytes it returned)
    data_off: int  # offset of data[0] within the write (mmap: the mapping's address)
    pid: int  # thread
    tgid: int  # process
    uid: int
    fd: int  # -1 when not known yet
    comm: str
    data: bytes

    @property
    def write_ends(self) -> bool:
        """This chunk holds the last byte of its write."""
        return self.data_off + len(self.data) >= self.req_len


def header_format(event_class: Any, stop: str = "data") -> tuple[struct.Struct, list[str]]:
    """A struct.Struct for the fields of a BCC-derived ctypes class before `stop`.

    Derived from the class (itself derived from the C header), never written
    by hand; refused when native alignment would not reproduce its offsets."""
    fmt, names = "@", []
    for name, ctype in event_class._fields_:
        if name == stop:
            break
        length = getattr(ctype, "_length_", None)
        code = f"{length}s" if length else ctype._type_
        fmt += code
        names.append(name)
        if struct.calcsize(fmt) != getattr(event_class, name).offset + ctypes.sizeof(ctype):
            raise ValueError(f"{event_class.__name__}.{name}: layout not reproducible")
    return struct.Struct(fmt), names


class SslEventDecoder:
    """Raw ring-buffer bytes -> SslEvent."""

    def __init__(self, event_class: Any) -> None:
        self._hdr = event_class.data.offset
        # struct.unpack_from reads the header in place: a ctypes from_buffer_copy
        # needs the full padded size and costs more than the rest of the decode
        self._header, names = header_format(event_class)
        if self._header.size != self._hdr:
            raise ValueError("lt_ssl_event header size does not match the data offset")
        self._index = {name: i for i, name in enumerate(names)}
        self._kinds = {
            v: k.removeprefix("LT_SSL_EV_").lower()
            for k, v in abi.enums()["lt_ssl_event_kind"].items()
        }

    def decode(self, raw: bytes) -> SslEvent:
        if len(raw) < self._hdr:
            raise ValueError(f"event of {len(raw)} bytes is shorter than its header")
        f = self._header.unpack_from(raw)
        i = self._index
        cap = min(f[i["cap_len"]], len(raw) - self._hdr)
        kind = f[i["kind"]]
        return SslEvent(
            kind=self._kinds.get(kind, f"unknown_{kind}"),
            ts_ns=f[i["ts_ns"]],
            cgroup_id=f[i["cgroup_id"]],
            ssl_ptr=f[i["ssl_ptr"]],
            req_len=f[i["req_len"]],
            data_off=f[i["data_off"]],
            pid=f[i["pid"]],
            tgid=f[i["tgid"]],
            uid=f[i["uid"]],
            fd=f[i["fd"]],
            comm=f[i["comm"]].split(b"\0", 1)[0].decode("utf-8", "replace"),
            data=raw[self._hdr : self._hdr + cap],
        )


def ssl_stat_names() -> list[str]:
    """lt_ssl_stats index -> exported name, e.g. ssl_loss_ringbuf_full."""
    stats = abi.enums()["lt_ssl_stat"]
    names = [""] * stats["LT_SSL_STAT_MAX"]
    for member, value in stats.items():
        if member != "LT_SSL_STAT_MAX":
            names[value] = "ssl_" + member.removeprefix("LT_SSL_").lower()
    return names
