"""Which process owns a TCP connection, by its socket: the connection's endpoints
-> its socket inode (/proc/PID/net/tcp{,6} of each network namespace) -> the
process holding that inode open (/proc/PID/fd).

One pass over /proc answers a whole batch of connections: each namespace's
tables are read once, and only processes of a namespace holding a wanted
socket have their descriptors listed.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

from leaktap.controller.plaintext.procs import PROC, list_pids
from leaktap.controller.plaintext.sockets import SocketEnds, parse_tcp_table

logger = logging.getLogger(__name__)

# (family, local (ip, port), remote (ip, port)) as this host sees the connection
Endpoints = tuple[int, tuple[str, int], tuple[str, int]]


def _tables(proc: Path, pid: int) -> dict[int, SocketEnds]:
    table: dict[int, SocketEnds] = {}
    for name in ("tcp", "tcp6"):
        try:
            table.update(parse_tcp_table((proc / str(pid) / "net" / name).read_text()))
        except (OSError, ValueError):
            continue
    return table


def _socket_inodes(proc: Path, pid: int) -> list[int]:
    fd_dir = proc / str(pid) / "fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return []
    inodes = []
    for fd in fds:
        try:
            link = os.readlink(fd_dir / fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.append(int(link[8:-1]))
    return inodes


class SocketOwners:
    """find(connections) -> {connection: pid} for those whose socket is still open."""

    def __init__(self, proc: Path = PROC) -> None:
        self.proc = proc
        self.counters: Counter[str] = Counter()

    def find(self, wanted: set[Endpoints]) -> dict[Endpoints, int]:
        if not wanted:
            return {}
        self.counters["owner_scans"] += 1
        # per namespace: inode -> connection, for the wanted connections it holds
        by_netns: dict[str, dict[int, Endpoints]] = {}
        found: dict[Endpoints, int] = {}
        me = os.getpid()
        for pid in list_pids(self.proc):
            if pid == me:
                continue
            try:
                netns = os.readlink(self.proc / str(pid) / "ns" / "net")
            except OSError:
                continue  # gone, or a kernel thread
            inodes = by_netns.get(netns)
            if inodes is None:
                inodes = by_netns[netns] = {}
                for inode, ends in _tables(self.proc, pid).items():
                    key = (ends.family, ends.local, ends.remote)
                    if key in wanted:
                        inodes[inode] = key
            if not inodes:
                continue
            for inode in _socket_inodes(self.proc, pid):
                conn = inodes.get(inode)
                if conn is not None and conn not in found:
                    found[conn] = pid
            if len(found) == len(wanted):
                break
        self.counters["owners_found"] += len(found)
        return found
