"""Pinned programs and maps reopened by path, read through libbpf (never bcc).

The resident agent does not compile: a short-lived child (kernel/compile.py)
compiles with BCC, pins every map and program, and describes each map's key
and value the way BCC derived them from the C declarations (its JSON type
descriptions). Here those descriptions become the same ctypes classes BCC
builds, and the tables offer the methods the agent uses on BCC tables
(``items_lookup_and_delete_batch``, ``items_lookup_batch``, ``items``,
``[key]``, ``del``, ``Key``/``Leaf``/``sLeaf``, ``open_ring_buffer``), so the
map readers work unchanged on either.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from leaktap.controller.errors import ProbeLoadError
from leaktap.controller.kernel.testrun import _libbpf

# enum bpf_map_type (UAPI) values the tables below distinguish
MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_PERCPU_ARRAY = 1, 2, 5, 6
MAP_LRU_HASH, MAP_LRU_PERCPU_HASH, MAP_RINGBUF = 9, 10, 27
PERCPU_TYPES = {MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_PERCPU_HASH}
ARRAY_TYPES = {MAP_ARRAY, MAP_PERCPU_ARRAY}
# entries per batch syscall: bounds the drain's buffers whatever max_entries is
BATCH_ENTRIES = 4096

# BCC's names for C scalar types (bcc/__init__.py BPF.str2ctype)
_CTYPES: dict[str, Any] = {
    "_Bool": ctypes.c_bool,
    "char": ctypes.c_char,
    "wchar_t": ctypes.c_wchar,
    "unsigned char": ctypes.c_ubyte,
    "short": ctypes.c_short,
    "unsigned short": ctypes.c_ushort,
    "int": ctypes.c_int,
    "unsigned int": ctypes.c_uint,
    "long": ctypes.c_long,
    "unsigned long": ctypes.c_ulong,
    "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    "long double": ctypes.c_longdouble,
    "__int128": ctypes.c_int64 * 2,
    "unsigned __int128": ctypes.c_uint64 * 2,
}


def decode_type(desc: Any) -> Any:
    """The ctypes class of a BCC type description (bcc BPF._decode_table_type)."""
    if isinstance(desc, str):
        try:
            return _CTYPES[desc]
        except KeyError:
            raise ProbeLoadError(f"unknown C type {desc!r} in a map description") from None
    anon: list[str] = []
    fields: list[tuple[Any, ...]] = []
    for t in desc[1]:
        if len(t) == 2:
            fields.append((t[0], decode_type(t[1])))
        elif len(t) == 3 and isinstance(t[2], list):
            fields.append((t[0], decode_type(t[1]) * t[2][0]))
        elif len(t) == 3 and isinstance(t[2], int):
            fields.append((t[0], decode_type(t[1]), t[2]))  # bit field
        elif len(t) == 3 and t[2] in ("union", "struct", "struct_packed"):
            name = t[0] or f"__anon{len(anon)}"
            if not t[0]:
                anon.append(name)
            fields.append((name, decode_type(t)))
        else:
            raise ProbeLoadError(f"cannot decode map type {t!r}")
    kind = desc[2] if len(desc) > 2 else "struct"
    base = ctypes.Union if kind == "union" else ctypes.Structure
    body: dict[str, Any] = {"_anonymous_": anon, "_fields_": fields}
    if kind == "struct_packed":
        body["_pack_"] = 1
    return type(str(desc[0]), (base,), body)


def layout(cls: Any, prefix: str = "", base: int = 0) -> list[list[Any]]:
    """[[field path, offset, size], ...] of a ctypes type, nested fields flattened."""
    if not hasattr(cls, "_fields_"):
        return [[prefix or "value", base, ctypes.sizeof(cls)]]
    out: list[list[Any]] = []
    for f in cls._fields_:
        name, ftype = f[0], f[1]
        descr = getattr(cls, name)
        path = f"{prefix}{name}"
        if hasattr(ftype, "_fields_"):
            out.extend(layout(ftype, path + ".", base + descr.offset))
        else:
            out.append([path, base + descr.offset, descr.size])
    return out


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many per-CPU slots a per-CPU map value has ("0-3,5" -> 5)."""
    count = 0
    with open(path) as f:
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
    return count


class _MapInfo(ctypes.Structure):
    # leading part of the UAPI struct bpf_map_info; the kernel fills what fits
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


_RING_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


@cache
def libbpf() -> ctypes.CDLL:
    """libbpf with the signatures of the calls used here."""
    lib = _libbpf()
    c_int, c_void_p, c_char_p, c_u32p = (
        ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32))
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "bpf_obj_get": (c_int, [c_char_p]),
        "bpf_obj_pin": (c_int, [c_int, c_char_p]),
        "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, c_u32p]),
        "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, ctypes.c_uint64]),
        "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
        "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_map_lookup_batch":
            (c_int, [c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_u32p, c_void_p]),
        "bpf_map_lookup_and_delete_batch":
            (c_int, [c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_u32p, c_void_p]),
        "ring_buffer__new": (c_void_p, [c_int, _RING_CB, c_void_p, c_void_p]),
        "ring_buffer__add": (c_int, [c_void_p, c_int, _RING_CB, c_void_p]),
        "ring_buffer__poll": (c_int, [c_void_p, c_int]),
        "ring_buffer__consume": (c_int, [c_void_p]),
        "ring_buffer__free": (None, [c_void_p]),
        "bpf_xdp_attach": (c_int, [c_int, c_int, ctypes.c_uint32, c_void_p]),
        "bpf_xdp_detach": (c_int, [c_int, ctypes.c_uint32, c_void_p]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _errno(rc: int) -> int:
    """libbpf 1.x returns -errno (and sets errno)."""
    return -rc if rc < 0 else (ctypes.get_errno() or errno.EIO)


def obj_get(path: str) -> int:
    """An fd of the object pinned at `path`."""
    fd = libbpf().bpf_obj_get(path.encode())
    if fd < 0:
        err = _errno(fd)
        raise ProbeLoadError(f"opening pinned {path}: {os.strerror(err)}")
    return int(fd)


def obj_pin(fd: int, path: str) -> None:
    rc = libbpf().bpf_obj_pin(fd, path.encode())
    if rc < 0:
        raise ProbeLoadError(f"pinning {path}: {os.strerror(_errno(rc))}")


def map_info(fd: int) -> _MapInfo:
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    rc = libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if rc < 0:
        raise ProbeLoadError(f"reading map info of fd {fd}: {os.strerror(_errno(rc))}")
    return info


class PinnedTable(MutableMapping[Any, Any]):
    """One map opened by fd, with BCC's table interface (bcc/table.py)."""

    def __init__(self, name: str, fd: int, map_type: int, key_type: Any, leaf_type: Any,
                 max_entries: int, owner: PinnedObject | None = None) -> None:
        self.name = name
        self.map_fd = fd
        self.ttype = map_type
        self.max_entries = max_entries
        self.Key = key_type
        self.sLeaf = leaf_type
        self._owner = owner
        self._cb: Any = None
        if map_type in PERCPU_TYPES:
            if ctypes.sizeof(leaf_type) % 8:
                raise ProbeLoadError(f"{name}: per-CPU value of {ctypes.sizeof(leaf_type)} "
                                     "bytes is not a multiple of 8")
            self.Leaf = leaf_type * possible_cpus()
        else:
            self.Leaf = leaf_type

    def get_fd(self) -> int:
        return self.map_fd

    def _key(self, key: Any) -> Any:
        return self.Key(key) if isinstance(key, int) else key

    def __getitem__(self, key: Any) -> Any:
        leaf = self.Leaf()
        key = self._key(key)
        if libbpf().bpf_map_lookup_elem(self.map_fd, ctypes.byref(key), ctypes.byref(leaf)) < 0:
            raise KeyError(key)
        return leaf

    def __setitem__(self, key: Any, leaf: Any) -> None:
        key = self._key(key)
        rc = libbpf().bpf_map_update_elem(self.map_fd, ctypes.byref(key), ctypes.byref(leaf), 0)
        if rc < 0:
            raise OSError(_errno(rc), f"updating {self.name}: {os.strerror(_errno(rc))}")

    def __delitem__(self, key: Any) -> None:
        key = self._key(key)
        if self.ttype in ARRAY_TYPES:  # array slots cannot be deleted: zero them (as BCC)
            self[key] = self.Leaf()
            return
        if libbpf().bpf_map_delete_elem(self.map_fd, ctypes.byref(key)) < 0:
            raise KeyError(key)

    def __iter__(self) -> Iterator[Any]:
        if self.ttype in ARRAY_TYPES:
            yield from (self.Key(i) for i in range(self.max_entries))
            return
        lib = libbpf()
        key: Any = None
        while True:
            next_key = self.Key()
            prev = ctypes.byref(key) if key is not None else None
            if lib.bpf_map_get_next_key(self.map_fd, prev, ctypes.byref(next_key)) < 0:
                return
            yield next_key
            key = next_key

    def __len__(self) -> int:
        if self.ttype in ARRAY_TYPES:
            return self.max_entries
        return sum(1 for _ in self)

    def items(self) -> list[tuple[Any, Any]]:  # type: ignore[override]
        out = []
        for key in list(self):
            try:
                out.append((key, self[key]))
            except KeyError:
                pass  # deleted between the key walk and the lookup
        return out

    def values(self) -> list[Any]:  # type: ignore[override]
        return [v for _, v in self.items()]

    def clear(self) -> None:
        for key in list(self):
            try:
                del self[key]
            except KeyError:
                pass

    def items_lookup_batch(self) -> Iterator[tuple[Any, Any]]:
        """Every (key, value), read BATCH_ENTRIES per syscall."""
        return self._batches(libbpf().bpf_map_lookup_batch)

    def items_lookup_and_delete_batch(self) -> Iterator[tuple[Any, Any]]:
        """Every (key, value), each taken out of the map atomically with its read."""
        return self._batches(libbpf().bpf_map_lookup_and_delete_batch)

    def lookup_and_delete_chunks(self, entries: int) -> Iterator[tuple[memoryview, memoryview,
                                                                        int]]:
        """Every entry taken out of the map (atomically with its read), `entries` per
        syscall, as raw chunks: (keys, values, count), the first `count` keys and values
        packed back to back. For drains that parse bytes in bulk instead of building
        ctypes objects per entry; the buffers are reused by the next chunk."""
        for keys, values, count in self._chunks(
                libbpf().bpf_map_lookup_and_delete_batch, entries, reuse=True):
            yield memoryview(keys).cast("B"), memoryview(values).cast("B"), count

    def _batches(self, call: Callable[..., int]) -> Iterator[tuple[Any, Any]]:
        # fresh arrays per batch: what the caller keeps of one stays valid
        for keys, values, count in self._chunks(call, BATCH_ENTRIES, reuse=False):
            for i in range(count):
                yield keys[i], values[i]

    def _chunks(self, call: Callable[..., int], entries: int,
                reuse: bool) -> Iterator[tuple[Any, Any, int]]:
        # the batch cursor is a bucket number for hash maps, a key for arrays
        token_size = max(8, ctypes.sizeof(self.Key))
        in_batch = ctypes.create_string_buffer(token_size)
        out_batch = ctypes.create_string_buffer(token_size)
        chunk = min(entries, max(1, self.max_entries))
        first = True
        keys: Any = None
        values: Any = None
        while True:
            if not reuse or keys is None or len(keys) != chunk:
                keys = (self.Key * chunk)()
                values = (self.Leaf * chunk)()
            count = ctypes.c_uint32(chunk)
            rc = call(self.map_fd, None if first else in_batch, out_batch, keys, values,
                      ctypes.byref(count), None)
            err = _errno(rc) if rc < 0 else 0
            if err == errno.ENOSPC and count.value == 0 and chunk < self.max_entries:
                chunk = min(chunk * 2, self.max_entries)  # one bucket holds more
                continue
            if err not in (0, errno.ENOENT):
                raise OSError(err, f"batch read of {self.name}: {os.strerror(err)}")
            yield keys, values, count.value
            if err == errno.ENOENT:
                return
            ctypes.memmove(in_batch, out_batch, token_size)
            first = False

    def open_ring_buffer(self, callback: Callable[[Any, int, int], Any],
                         ctx: Any = None) -> None:
        """Deliver each record of this ring buffer to callback(ctx, data, size)."""
        if self.ttype != MAP_RINGBUF or self._owner is None:
            raise ProbeLoadError(f"{self.name} is not a ring buffer")

        def on_record(_ctx: Any, data: int, size: int) -> int:
            ret = callback(ctx, data, size)
            return int(ret) if isinstance(ret, int) else 0

        self._cb = _RING_CB(on_record)  # referenced as long as the table lives
        self._owner.add_ring(self.map_fd, self._cb)


@dataclass
class PinnedProgram:
    """A loaded program reopened by path: what attach and test runs need."""

    name: str
    fd: int


class PinnedObject:
    """The maps of one program set, by name; stands where the BCC module stood."""

    def __init__(self) -> None:
        self.tables: dict[str, PinnedTable] = {}
        self.fds: list[int] = []
        self._ring: Any = None

    def __getitem__(self, name: str | bytes) -> PinnedTable:
        key = name.decode() if isinstance(name, bytes) else name
        return self.tables[key]

    def __contains__(self, name: object) -> bool:
        key = name.decode() if isinstance(name, bytes) else name
        return key in self.tables

    def add_ring(self, fd: int, callback: Any) -> None:
        lib = libbpf()
        if self._ring is None:
            ring = lib.ring_buffer__new(fd, callback, None, None)
            if not ring:
                err = ctypes.get_errno() or errno.EINVAL
                raise ProbeLoadError(f"opening ring buffer fd {fd}: {os.strerror(err)}")
            self._ring = ring
            return
        rc = lib.ring_buffer__add(self._ring, fd, callback, None)
        if rc < 0:
            raise ProbeLoadError(f"adding ring buffer fd {fd}: {os.strerror(_errno(rc))}")

    def ring_buffer_poll(self, timeout: int = -1) -> int:
        """Wait up to `timeout` ms and deliver what arrived; returns records or -errno
        (as BCC, a failed poll is not raised: the drain thread polls again)."""
        if self._ring is None:
            return 0
        return int(libbpf().ring_buffer__poll(self._ring, timeout))

    def ring_buffer_consume(self) -> int:
        if self._ring is None:
            return 0
        return int(libbpf().ring_buffer__consume(self._ring))

    def cleanup(self) -> None:
        if self._ring is not None:
            libbpf().ring_buffer__free(self._ring)
            self._ring = None
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
