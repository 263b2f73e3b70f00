"""A process's fd -> its TCP connection's endpoints, from /proc.

/proc/<pid>/fd/<fd> names the socket inode; /proc/<pid>/net/tcp{,6} (the
process's own network namespace) lists inode and endpoints. The tables are
re-read only when an inode is missing from the cached copy, at most every
REFRESH_MIN_S per namespace. A socket missing from a table read after it was
asked for is not TCP (an AF_UNIX pair, a socket of another namespace): it is
remembered as such for NOT_TCP_TTL_S, so its every write does not re-read the
tables (reading a busy host's /proc/net/tcp takes milliseconds).
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
NOT_TCP_TTL_S = 10.0  # bounds the cost of one misjudged socket; inodes are not reused so soon


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
        self._not_tcp: OrderedDict[int, float] = OrderedDict()  # inode -> when found so
        self.lookups = 0
        self.misses = 0
        self.table_reads = 0

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
        seen_not_tcp = self._not_tcp.get(inode)
        if seen_not_tcp is not None:
            if time.monotonic() - seen_not_tcp < NOT_TCP_TTL_S:
                self.misses += 1
                return None
            del self._not_tcp[inode]
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
        read = False
        for name in ("tcp", "tcp6"):
            try:
                table.update(parse_tcp_table(Path(f"{self._proc}/{pid}/net/{name}").read_text()))
            except OSError:
                continue
            read = True
        self.table_reads += 1
        self._tables[netns] = (now, table)
        ends = table.get(inode)
        if ends is None and read:  # read after the write that named it: not a TCP socket
            self._not_tcp[inode] = now
            if len(self._not_tcp) > CACHE_MAX:
                self._not_tcp.popitem(last=False)
        return ends
