"""A prompt error for a client whose ClientHello the kernel dropped: SOCK_DESTROY.

A dropped hello leaves the client retransmitting it for minutes. Destroying its
socket over NETLINK_SOCK_DIAG (an ``inet_diag_req_v2`` naming the exact 5-tuple,
kernel CONFIG_INET_DIAG_DESTROY, CAP_NET_ADMIN) aborts it at once: the client's
pending and next calls fail with ECONNABORTED, and the kernel sends the server a
reset. pyroute2 names the message type but has no request for inet sockets, so
the request is packed here.

Sockets live in a network namespace. The agent watches the interfaces of its own
namespace, where a node's tenant processes run, so the socket is looked up there
first; when it is not there (a container with its own namespace routed through
the watched interface) the namespaces of the processes in the decision's cgroup
are tried, each from a short-lived thread that joins it (setns moves only the
calling thread).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
IPPROTO_TCP = 6
ALL_STATES = 0xFFFFFFFF
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
CLONE_NEWNET = 0x40000000
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid
# (sport, dport big-endian; src[4], dst[4] as network-order words; if; cookie[2])
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
_NLMSGHDR = struct.Struct("=IHHII")


@dataclass(slots=True)
class DestroyStats:
    """Monotonic counters, exported with the enforcement state."""

    destroyed: int = 0
    not_found: int = 0  # the socket was gone (closed already) in every namespace tried
    failed: dict[str, int] = field(default_factory=dict)  # errno name -> count


def destroy_request(family: int, proto: int, src: str, sport: int, dst: str, dport: int,
                    seq: int = 1) -> bytes:
    """The netlink message that destroys the socket bound to src:sport, connected to
    dst:dport (seen from the socket: src is its local end)."""
    def addr(a: str) -> bytes:
        return ipaddress.ip_address(a).packed.ljust(16, b"\0")

    body = (
        _REQ.pack(family, proto, 0, ALL_STATES)
        + _SOCKID.pack(sport, dport, addr(src), addr(dst))
        + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DESTROY,
                          NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def _ack_errno(reply: bytes) -> int:
    """The errno of a netlink ack (0: done)."""
    if len(reply) < _NLMSGHDR.size + 4:
        return errno.EIO
    _, msg_type, _, _, _ = _NLMSGHDR.unpack_from(reply)
    if msg_type != NLMSG_ERROR:
        return errno.EIO
    (code,) = struct.unpack_from("=i", reply, _NLMSGHDR.size)
    return -int(code)


def destroy_here(family: int, proto: int, src: str, sport: int, dst: str, dport: int) -> int:
    """Destroy the socket in the calling thread's network namespace; returns an errno
    (0: destroyed, ENOENT: no such socket here)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        try:
            nl.send(destroy_request(family, proto, src, sport, dst, dport))
            return _ack_errno(nl.recv(4096))
        except OSError as e:
            return int(e.errno or errno.EIO)


def _in_netns(ns_path: str, family: int, proto: int, src: str, sport: int, dst: str,
              dport: int) -> int:
    """destroy_here from a thread that joined the namespace at ns_path."""
    result = [errno.EIO]

    def run() -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(ns_path, os.O_RDONLY)
        except OSError as e:
            result[0] = e.errno or errno.EIO
            return
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                result[0] = ctypes.get_errno()
                return
        finally:
            os.close(fd)
        result[0] = destroy_here(family, proto, src, sport, dst, dport)

    # the thread ends in the other namespace and is not reused
    t = threading.Thread(target=run, name="lt-sockdestroy", daemon=True)
    t.start()
    t.join(timeout=2.0)
    return result[0]


def cgroup_netns(cgroup_mount: Path | None, cgroup_path: str | None) -> list[str]:
    """/proc/<pid>/ns/net of one process per distinct namespace in a cgroup."""
    if cgroup_mount is None or not cgroup_path:
        return []
    procs = cgroup_mount / cgroup_path.lstrip("/") / "cgroup.procs"
    try:
        pids = procs.read_text().split()
    except OSError:
        return []
    seen: set[int] = set()
    out: list[str] = []
    for pid in pids:
        path = f"/proc/{pid}/ns/net"
        try:
            ino = os.stat(path).st_ino
        except OSError:
            continue
        if ino not in seen:
            seen.add(ino)
            out.append(path)
    return out


class SocketDestroyer:
    """Destroys blocked clients' sockets, here first, then in their cgroup's namespaces."""

    def __init__(self) -> None:
        self.stats = DestroyStats()
        self._own_netns = _netns_inode("/proc/self/ns/net")

    def destroy(self, proto: int, src: str, sport: int, dst: str, dport: int,
                other_netns: Iterable[str] = ()) -> bool:
        family = socket.AF_INET6 if ":" in src else socket.AF_INET
        err = destroy_here(family, proto, src, sport, dst, dport)
        for ns in other_netns:
            if err != errno.ENOENT:
                break
            if _netns_inode(ns) == self._own_netns:
                continue
            err = _in_netns(ns, family, proto, src, sport, dst, dport)
        if err == 0:
            self.stats.destroyed += 1
            return True
        if err == errno.ENOENT:
            self.stats.not_found += 1
        else:
            name = errno.errorcode.get(err, str(err))
            self.stats.failed[name] = self.stats.failed.get(name, 0) + 1
            logger.warning("destroying the socket %s:%d -> %s:%d: %s", src, sport, dst, dport,
                           os.strerror(err))
        return False


def _netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
