"""Facts about the host's filesystems: statfs magic numbers and mount points.

Shared by the loader (is /sys/fs/bpf a bpffs?), the doctor and the agent
(where is the cgroup v2 hierarchy whose ids the kernel reports?).
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Iterable
from pathlib import Path

BPF_FS_MAGIC = 0xCAFE4A11
TRACEFS_MAGIC = 0x74726163
MOUNTINFO_PATH = Path("/proc/self/mountinfo")


def filesystem_magic(path: Path) -> int:
    """Return statfs(2) f_type for `path` (os.statvfs does not expose it).

    Raises OSError, e.g. FileNotFoundError, when statfs fails.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    # struct statfs is 120 bytes on 64-bit Linux; f_type (a long) comes first.
    buf = ctypes.create_string_buffer(256)
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def find_cgroup2_mount(mountinfo: Path = MOUNTINFO_PATH) -> Path | None:
    """Return the first cgroup2 mount point listed in a mountinfo file, if any."""
    for fields, fstype in mountinfo_entries(mountinfo):
        if fstype == "cgroup2":
            return Path(_unescape_mount_path(fields[4]))
    return None


def mountinfo_entries(mountinfo: Path) -> Iterable[tuple[list[str], str]]:
    # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw": the
    # optional fields end at "-", the filesystem type follows it.
    for raw in mountinfo.read_text().splitlines():
        fields = raw.split()
        if "-" in fields:
            separator = fields.index("-")
            if separator + 1 < len(fields):
                yield fields, fields[separator + 1]


def _unescape_mount_path(path: str) -> str:
    # The kernel writes space, tab, newline and backslash as \040-style octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)
