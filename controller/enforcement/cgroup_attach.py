"""Attaching cgroup programs through pinned BPF links (libbpf).

A link pinned on the bpffs keeps its program attached (with its maps and its
last policy) after the agent dies, and the next start swaps its own program
into the same link (BPF_LINK_UPDATE: no moment without a program, no second
attachment). Everything goes through the pin's path: reopening an attachment
by program id (BPF_PROG_GET_FD_BY_ID) is reserved to CAP_SYS_ADMIN, which the
unit does not have. Programs that earlier versions attached without a link are
found by name through BPF_PROG_QUERY and detached when the capability allows
(detach_by_prefix); nobody else's are touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from functools import cache
from pathlib import Path
from typing import Any

from leaktap.controller.errors import ProbeLoadError
from leaktap.controller.kernel.pinned import libbpf, obj_get, obj_pin

# the leading part of struct bpf_prog_info: name[16] sits at offset 64
_PROG_INFO_SIZE = 80
_PROG_NAME_OFFSET = 64
_QUERY_MAX = 64


@cache
def _lib() -> Any:
    lib = libbpf()
    c_int, c_u32, c_u32p = ctypes.c_int, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "bpf_prog_detach2": (c_int, [c_int, c_int, ctypes.c_int]),
        "bpf_prog_query": (c_int, [c_int, ctypes.c_int, c_u32, c_u32p, c_u32p, c_u32p]),
        "bpf_prog_get_fd_by_id": (c_int, [c_u32]),
        "bpf_link_create": (c_int, [c_int, c_int, ctypes.c_int, ctypes.c_void_p]),
        "bpf_link_update": (c_int, [c_int, c_int, ctypes.c_void_p]),
        "bpf_link_detach": (c_int, [c_int]),
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


def attach_link(prog_fd: int, cgroup: Path, attach_type: int, pin: Path) -> int:
    """Attach `prog_fd` to `cgroup` through the link pinned at `pin`: the program
    replaces the one a previous run left in it, or a new link is made and pinned.
    Returns the link's fd (the caller keeps it). A pin that is no link of this
    kind (another cgroup's leftovers are named apart by the caller) is replaced."""
    lib = _lib()
    if pin.exists():
        try:
            link = obj_get(str(pin))
        except ProbeLoadError:
            link = -1
        if link >= 0:
            if lib.bpf_link_update(link, prog_fd, None) == 0:
                return link
            os.close(link)
        release_link(pin, -1)
    fd = _open_cgroup(cgroup)
    try:
        link = lib.bpf_link_create(prog_fd, fd, attach_type, None)
        if link < 0:
            raise ProbeLoadError(f"attaching to cgroup {cgroup}: {os.strerror(-link)}")
    finally:
        os.close(fd)
    try:
        pin.parent.mkdir(parents=True, exist_ok=True)
        obj_pin(link, str(pin))
    except (OSError, ProbeLoadError):
        _lib().bpf_link_detach(link)
        os.close(link)
        raise
    return int(link)


def release_link(pin: Path, link: int) -> None:
    """Detach a pinned link's program (fail open): the pin goes, then the link."""
    if link < 0 and pin.exists():
        with contextlib.suppress(ProbeLoadError):
            link = obj_get(str(pin))
    with contextlib.suppress(FileNotFoundError):
        pin.unlink()
    if link >= 0:
        _lib().bpf_link_detach(link)  # also when someone else holds the link open
        os.close(link)
