"""Uprobes and tracepoints for programs reopened by path, without the compiler.

The plaintext programs are compiled in the compiler child like the others
(kernel/compile.py); what attaches them here is libbcc_bpf, the perf-event half
of BCC, which does not link LLVM (libbcc does: importing bcc maps ~120 MB of it).
A uprobe is given as a file offset: a symbol's address is turned into one with
the ELF's executable PT_LOAD headers, as BCC's bcc_resolve_symname does.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import re
import struct
from functools import cache
from pathlib import Path
from typing import Any

from leaktap.controller.errors import ProbeLoadError

_PT_LOAD, _PF_X = 1, 1
_PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr
_PHDRS_MAX = 256
BPF_PROBE_ENTRY, BPF_PROBE_RETURN = 0, 1
TRACEFS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
# our tracefs uprobe events: short_uprobe_event_name + libbcc's "_bcc_<pid>"
_OUR_EVENT = re.compile(r"^[pr]:(\S+/([pr]_lt_[0-9a-f]{16}_bcc_(\d+)))\s", re.M)

logger = logging.getLogger(__name__)


@cache
def _lib() -> Any:
    try:
        lib = ctypes.CDLL("libbcc_bpf.so.0", use_errno=True)
    except OSError as e:
        raise ProbeLoadError(f"cannot load libbcc_bpf.so.0 (package libbpfcc): {e}") from e
    c_int, c_char_p = ctypes.c_int, ctypes.c_char_p
    lib.bpf_attach_uprobe.restype = c_int
    lib.bpf_attach_uprobe.argtypes = [c_int, c_int, c_char_p, c_char_p, ctypes.c_uint64,
                                      c_int, ctypes.c_uint32]
    lib.bpf_detach_uprobe.restype = c_int
    lib.bpf_detach_uprobe.argtypes = [c_char_p]
    lib.bpf_attach_tracepoint.restype = c_int
    lib.bpf_attach_tracepoint.argtypes = [c_int, c_char_p, c_char_p]
    lib.bpf_close_perf_event_fd.restype = c_int
    lib.bpf_close_perf_event_fd.argtypes = [c_int]
    return lib


def short_uprobe_event_name(prefix: bytes, path: bytes, addr: int, pid: int) -> bytes:
    """A uprobe's tracefs event name: a digest of what names the probe.

    Without CAP_SYS_ADMIN the kernel refuses the uprobe PMU (perf_event_open
    returns EACCES here), and BCC falls back to an event it writes into tracefs'
    uprobe_events, by default named from the whole path, the address and the pid
    plus "_bcc_<our pid>". The kernel refuses names over 64 characters (EINVAL),
    which every per-process probe (`plaintext.select`: /proc/<pid>/root/...) and
    any deep library path passes."""
    digest = hashlib.blake2s(b"%s\0%s\0%x\0%d" % (prefix, path, addr, pid), digest_size=8)
    return b"%s_lt_%s" % (prefix, digest.hexdigest().encode())


def remove_stale_events(tracefs: tuple[Path, ...] = TRACEFS) -> int:
    """Remove the tracefs uprobe events a crashed agent left (named by us, made by
    a process that is gone): each would stay in the kernel until reboot, one per
    probed library and process for every crash. Returns how many went."""
    for root in tracefs:
        events = root / "uprobe_events"
        try:
            text = events.read_text()
        except OSError:
            continue
        removed = 0
        for m in _OUR_EVENT.finditer(text):
            if Path(f"/proc/{m.group(3)}").exists():
                continue
            with contextlib.suppress(OSError):
                tracefs_write(events, f"-:{m.group(1)}\n")
                removed += 1
        if removed:
            logger.info("removed %d uprobe event(s) left by an earlier run", removed)
        return removed
    return 0


def tracefs_write(path: Path, line: str) -> None:
    """One command to a tracefs control file (Python's append mode seeks, which
    tracefs refuses with EINVAL)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def file_offset(path: str, addr: int) -> int:
    """The file offset of virtual address `addr` (a symbol's value) in ELF `path`."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                raise ProbeLoadError(f"{path}: not a 64-bit little-endian ELF file")
            phoff, = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            if phentsize != _PHDR.size or not 0 < phnum <= _PHDRS_MAX:
                raise ProbeLoadError(f"{path}: unusable program headers")
            f.seek(phoff)
            table = f.read(phnum * phentsize)
    except OSError as e:
        raise ProbeLoadError(f"reading {path}: {e.strerror}") from e
    if len(table) < phnum * phentsize:
        raise ProbeLoadError(f"{path}: program headers out of bounds")
    for p_type, p_flags, p_offset, p_vaddr, _paddr, _filesz, p_memsz, _align in \
            _PHDR.iter_unpack(table):
        if p_type == _PT_LOAD and p_flags & _PF_X and p_vaddr <= addr < p_vaddr + p_memsz:
            return int(addr - p_vaddr + p_offset)
    raise ProbeLoadError(f"{path}: address {addr:#x} is in no executable segment")


class PerfAttachments:
    """The perf events that attach reopened programs: one fd per uprobe, per
    (library, address, pid, entry or return), and one per tracepoint."""

    def __init__(self) -> None:
        self.uprobes: dict[bytes, int] = {}
        self.tracepoints: list[int] = []

    def attach_tracepoint(self, prog_fd: int, category: str, name: str) -> None:
        fd = _lib().bpf_attach_tracepoint(prog_fd, category.encode(), name.encode())
        if fd < 0:
            raise ProbeLoadError(f"attaching tracepoint {category}:{name}: "
                                 f"{os.strerror(ctypes.get_errno() or 1)}")
        self.tracepoints.append(int(fd))

    def attach_uprobe(self, prog_fd: int, path: str, addr: int, pid: int, ret: bool) -> None:
        event = short_uprobe_event_name(b"r" if ret else b"p", path.encode(), addr, pid)
        if event in self.uprobes:
            return
        offset = file_offset(path, addr)
        fd = _lib().bpf_attach_uprobe(prog_fd, BPF_PROBE_RETURN if ret else BPF_PROBE_ENTRY,
                                      event, path.encode(), offset, pid, 0)
        if fd < 0:
            raise ProbeLoadError(f"attaching a uprobe to {path}:{addr:#x} for pid {pid}: "
                                 f"{os.strerror(ctypes.get_errno() or 1)}")
        self.uprobes[event] = int(fd)

    def detach_uprobe(self, path: str, addr: int, pid: int, ret: bool) -> None:
        event = short_uprobe_event_name(b"r" if ret else b"p", path.encode(), addr, pid)
        fd = self.uprobes.pop(event, None)
        if fd is None:
            raise KeyError(f"no uprobe on {path}:{addr:#x} for pid {pid}")
        self._release(event, fd)

    def close(self) -> None:
        for event, fd in list(self.uprobes.items()):
            self._release(event, fd)
        self.uprobes.clear()
        for fd in self.tracepoints:
            _lib().bpf_close_perf_event_fd(fd)
        self.tracepoints.clear()

    @staticmethod
    def _release(event: bytes, fd: int) -> None:
        _lib().bpf_close_perf_event_fd(fd)
        _lib().bpf_detach_uprobe(event)  # the tracefs event, when one was made
