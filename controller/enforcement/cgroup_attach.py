"""Attaching cgroup programs (BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI) through libbpf.

A program attached this way is not tied to the process that attached it: it
keeps running (with its maps) until detached, also after a crash. So an attach
first removes leaktap's own programs a previous run left on the cgroup (found
by name through BPF_PROG_QUERY), and never touches anyone else's.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path
from typing import Any

from leaktap.controller.errors import ProbeLoadError
from leaktap.controller.kernel.pinned import libbpf

BPF_F_ALLOW_MULTI = 1 << 1
# the leading part of struct bpf_prog_info: name[16] sits at offset 64
_PROG_INFO_SIZE = 80
_PROG_NAME_OFFSET = 64
_QUERY_MAX = 64


@cache
def _lib() -> Any:
    lib = libbpf()
    c_int, c_u32, c_u32p = ctypes.c_int, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "bpf_prog_attach": (c_int, [c_int, c_int, ctypes.c_int, ctypes.c_uint]),
        "bpf_prog_detach2": (c_int, [c_int, c_int, ctypes.c_int]),
        "bpf_prog_query": (c_int, [c_int, ctypes.c_int, c_u32, c_u32p, c_u32p, c_u32p]),
        "bpf_prog_get_fd_by_id": (c_int, [c_u32]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _open_cgroup(cgroup: Path) -> int:
    try:
        return os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise ProbeLoadError(f"opening cgroup {cgroup}: {e.strerror}") from e


def prog_name(fd: int) -> str:
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    size = ctypes.c_uint32(_PROG_INFO_SIZE)
    if libbpf().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)) < 0:
        return ""
    raw = info.raw[_PROG_NAME_OFFSET:_PROG_NAME_OFFSET + 16]
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def attached_programs(cgroup: Path, attach_type: int) -> list[tuple[int, str]]:
    """(program id, name) of the programs attached to `cgroup` for `attach_type`."""
    lib = _lib()
    fd = _open_cgroup(cgroup)
    try:
        ids = (ctypes.c_uint32 * _QUERY_MAX)()
        count = ctypes.c_uint32(_QUERY_MAX)
        flags = ctypes.c_uint32(0)
        if lib.bpf_prog_query(fd, attach_type, 0, ctypes.byref(flags), ids,
                              ctypes.byref(count)) < 0:
            return []
        out = []
        for prog_id in ids[: count.value]:
            pfd = lib.bpf_prog_get_fd_by_id(prog_id)
            if pfd < 0:
                continue
            try:
                out.append((int(prog_id), prog_name(pfd)))
            finally:
                os.close(pfd)
        return out
    finally:
        os.close(fd)


def detach_by_prefix(cgroup: Path, attach_type: int, prefix: str) -> int:
    """Detach every program named `prefix`* from `cgroup`; returns how many."""
    lib = _lib()
    removed = 0
    fd = _open_cgroup(cgroup)
    try:
        for prog_id, name in attached_programs(cgroup, attach_type):
            if not name.startswith(prefix):
                continue
            pfd = lib.bpf_prog_get_fd_by_id(prog_id)
            if pfd < 0:
                continue
            try:
                if lib.bpf_prog_detach2(pfd, fd, attach_type) == 0:
                    removed += 1
            finally:
                os.close(pfd)
    finally:
        os.close(fd)
    return removed


def attach(prog_fd: int, cgroup: Path, attach_type: int) -> None:
    fd = _open_cgroup(cgroup)
    try:
        rc = _lib().bpf_prog_attach(prog_fd, fd, attach_type, BPF_F_ALLOW_MULTI)
        if rc < 0:
            raise ProbeLoadError(f"attaching to cgroup {cgroup}: {os.strerror(-rc)}")
    finally:
        os.close(fd)


def detach(prog_fd: int, cgroup: Path, attach_type: int) -> bool:
    fd = _open_cgroup(cgroup)
    try:
        return bool(_lib().bpf_prog_detach2(prog_fd, fd, attach_type) == 0)
    finally:
        os.close(fd)
