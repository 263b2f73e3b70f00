"""A process's fd -> its TCP connection's endpoints, from /proc.

/proc/<pid>/fd/<fd> names the socket inode; /proc/<pid>/net/tcp{,6} (the
process's own network namespace) lists inode and endpoints. The tables are
re-read only when an inode is missing from the cached copy, at most every
REFRESH_MIN_S per namespace.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PROC = Path("/proc")
REFRESH_MIN_S = 0.05
CACHE_MAX = 16384


@dataclass(frozen=True, slots=True)
class SocketEnds:
    family: int  # 4 | 6
    local: tuple[str, int]
    remote: tuple[str, int]
    inode: int


def _addr(hex_addr: str) -> tuple[int, str, int]:
    ip_hex, port_hex = hex_addr.split(":")
    raw = bytes.fromhex(ip_hex)
    # each 32-bit word is in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return 4, str(ip.ipv4_mapped), int(port_hex, 16)
    return ip.version, str(ip), int(port_hex, 16)


def parse_tcp_table(text: str) -> dict[int, SocketEnds]:
    """inode -> endpoints for the lines of /proc/net/tcp or tcp6."""
    out = {}
    for line in text.split("\n")[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        inode = int(f[9])
        if not inode:
            continue
        fam, lip, lport = _addr(f[1])
        _, rip, rport = _addr(f[2])
        out[inode] = SocketEnds(fam, (lip, lport), (rip, rport), inode)
    return out


class SocketResolver:
    """(pid, fd) -> SocketEnds of a TCP socket, or None."""

    def __init__(self, proc: Path = PROC) -> None:
        self._proc = proc
        self._tables: dict[str, tuple[float, dict[int, SocketEnds]]] = {}
        self._by_inode: OrderedDict[int, SocketEnds] = OrderedDict()
        self.lookups = 0
        self.misses = 0

    def resolve(self, pid: int, fd: int) -> SocketEnds | None:
        if fd < 0:
            return None
        self.lookups += 1
        try:
            link = os.readlink(f"{self._proc}/{pid}/fd/{fd}")
        except OSError:
            self.misses += 1
            return None
        if not link.startswith("socket:["):
            self.misses += 1
            return None
        inode = int(link[8:-1])
        ends = self._by_inode.get(inode)
        if ends is not None:
            return ends
        ends = self._lookup(pid, inode)
        if ends is None:
            self.misses += 1
            return None
        self._by_inode[inode] = ends
        if len(self._by_inode) > CACHE_MAX:
            self._by_inode.popitem(last=False)
        return ends

    def _lookup(self, pid: int, inode: int) -> SocketEnds | None:
        try:
            netns = os.readlink(f"{self._proc}/{pid}/ns/net")
        except OSError:
            return None
        cached = self._tables.get(netns)
        if cached is not None and inode in cached[1]:
            return cached[1][inode]
        now = time.monotonic()
        if cached is not None and now - cached[0] < REFRESH_MIN_S:
            return None
        table: dict[int, SocketEnds] = {}
        for name in ("tcp", "tcp6"):
            try:
                table.update(parse_tcp_table(Path(f"{self._proc}/{pid}/net/{name}").read_text()))
            except OSError:
                continue
        self._tables[netns] = (now, table)
        return table.get(inode)
