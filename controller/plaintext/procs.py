"""Processes from /proc: who they are, whether plaintext.select picks them, and
which TLS library files they map (by content: any file mapped executable that
defines SSL_write/SSL_write_ex, whatever its name).

A process in a container sees its libraries under its own root: the path to
probe is /proc/<pid>/root/<path>, and the same file reached by two paths (a
merged /usr, a bind mount) is one library, keyed by device and inode,
because two uprobes on one inode would trap twice per call.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from leaktap.controller.config import PlaintextSelect
from leaktap.controller.plaintext.libraries import SslLibraryFinder

logger = logging.getLogger(__name__)

PROC = Path("/proc")
DEFAULT_FINDER = SslLibraryFinder()


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    exe: str | None
    argv0: str | None
    cgroup: str | None  # cgroup v2 path ("0::" line)
    uid: int | None  # real uid
    zombie: bool = False


def list_pids(proc: Path = PROC) -> list[int]:
    return [int(name) for name in os.listdir(proc) if name.isdigit()]


def _read(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def read_process(pid: int, proc: Path = PROC) -> ProcessInfo | None:
    """What selection needs of `pid`, or None when it is gone."""
    base = proc / str(pid)
    status = _read(base / "status")
    if status is None:
        return None
    uid = None
    zombie = False
    for line in status.split(b"\n"):
        if line.startswith(b"Uid:"):
            uid = int(line.split()[1])
        elif line.startswith(b"State:"):
            fields = line.split()
            zombie = len(fields) > 1 and fields[1] in (b"Z", b"X")
    try:
        exe: str | None = os.readlink(base / "exe")
    except OSError:
        exe = None  # kernel thread or gone
    cmdline = _read(base / "cmdline") or b""
    argv0 = cmdline.split(b"\0", 1)[0].decode("utf-8", "replace") or None
    cgroup = None
    for line in (_read(base / "cgroup") or b"").split(b"\n"):
        if line.startswith(b"0::"):
            cgroup = line[3:].decode("utf-8", "replace") or "/"
    return ProcessInfo(pid, exe, argv0, cgroup, uid, zombie)


class ProcessSelector:
    """plaintext.select: a process is probed when any rule matches it."""

    def __init__(self, select: PlaintextSelect) -> None:
        self._cgroups = [re.compile(fnmatch.translate(g)) for g in select.cgroups]
        self._exes = [re.compile(fnmatch.translate(g)) for g in select.exes]
        self._uids = frozenset(select.uids)

    def __bool__(self) -> bool:
        return bool(self._cgroups or self._exes or self._uids)

    def matches(self, info: ProcessInfo) -> bool:
        if info.zombie or info.exe is None:
            return False
        if info.uid is not None and info.uid in self._uids:
            return True
        if info.cgroup is not None and any(rx.match(info.cgroup) for rx in self._cgroups):
            return True
        names = [n for n in (info.exe, info.argv0) if n]
        return any(rx.match(n) for rx in self._exes for n in names)


@dataclass(frozen=True, slots=True)
class Library:
    """A TLS library file: the path to probe it by, its identity, and (when read
    by content) the addresses of the functions to probe."""

    path: str
    dev: int
    ino: int
    addresses: tuple[tuple[str, int], ...] = ()

    @property
    def key(self) -> tuple[int, int]:
        return self.dev, self.ino


def library_at(path: str) -> Library | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Library(path, st.st_dev, st.st_ino)


def executable_mappings(pid: int, proc: Path = PROC) -> list[str]:
    """Paths of the files `pid` maps executable (as the process names them)."""
    maps = _read(proc / str(pid) / "maps")
    if maps is None:
        return []
    paths: dict[str, None] = {}
    for line in maps.decode("utf-8", "replace").split("\n"):
        parts = line.split(None, 5)
        if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/"):
            continue
        if not parts[5].endswith(" (deleted)"):
            paths[parts[5]] = None
    return list(paths)


def ssl_libraries(pid: int, proc: Path = PROC,
                  finder: SslLibraryFinder = DEFAULT_FINDER) -> list[Library]:
    """Every file `pid` maps that defines SSL_write(_ex), as paths we can open."""
    found: dict[tuple[int, int], Library] = {}
    for path in executable_mappings(pid, proc):
        # the process's own root: its container's file, not ours
        rooted = f"{proc}/{pid}/root{path}"
        try:
            st = os.stat(rooted)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in found:
            continue
        addresses = tuple(sorted(finder.addresses(rooted, st).items()))
        if not addresses:
            continue
        lib = Library(rooted, st.st_dev, st.st_ino, addresses)
        own = library_at(path)
        if own is not None and own.key == lib.key:
            lib = Library(path, st.st_dev, st.st_ino, addresses)  # the shorter path
        found[lib.key] = lib
    return list(found.values())
