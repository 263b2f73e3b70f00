"""SocketResolver: a write's fd -> TCP endpoints, without re-reading /proc per write.

A fake /proc tree (fd and netns links, net/tcp) stands in for the kernel's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from leaktap.controller.plaintext import sockets
from leaktap.controller.plaintext.sockets import SocketResolver

PID = 4242
HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
          "   uid  timeout inode\n")
# 198.18.0.1:40000 -> 198.18.0.2:443, established, inode 5001
TCP_LINE = ("   0: 010012C6:9C40 020012C6:01BB 01 00000000:00000000 00:00000000 00000000"
            "     0        0 5001 1 0000000000000000 20 4 30 10 -1\n")


def _proc(tmp_path: Path, fds: dict[int, int], tcp: str | None = HEADER + TCP_LINE) -> Path:
    pdir = tmp_path / str(PID)
    (pdir / "fd").mkdir(parents=True)
    (pdir / "ns").mkdir()
    (pdir / "net").mkdir()
    (pdir / "ns" / "net").symlink_to("net:[4026531840]")
    for fd, inode in fds.items():
        (pdir / "fd" / str(fd)).symlink_to(f"socket:[{inode}]")
    if tcp is not None:
        (pdir / "net" / "tcp").write_text(tcp)
        (pdir / "net" / "tcp6").write_text(HEADER)
    return tmp_path


@pytest.fixture(autouse=True)
def _no_refresh_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # every miss may re-read the tables: only the not-TCP memory can spare the reads
    monkeypatch.setattr(sockets, "REFRESH_MIN_S", 0.0)


def test_tcp_socket_resolves_from_one_table_read(tmp_path: Path) -> None:
    resolver = SocketResolver(_proc(tmp_path, {7: 5001}))
    for _ in range(100):
        ends = resolver.resolve(PID, 7)
        assert ends is not None
        assert (ends.family, ends.local, ends.remote) == (4, ("198.18.0.1", 40000),
                                                          ("198.18.0.2", 443))
    assert resolver.table_reads == 1


def test_socket_missing_from_the_tables_is_not_reread_per_write(tmp_path: Path) -> None:
    # an AF_UNIX socketpair (or another namespace's socket) never appears in net/tcp:
    # before, each of its writes re-read both tables (milliseconds on a busy host)
    resolver = SocketResolver(_proc(tmp_path, {7: 5001, 9: 6002}))
    for _ in range(1000):
        assert resolver.resolve(PID, 9) is None
    assert resolver.table_reads == 1
    assert resolver.misses == 1000
    assert resolver.resolve(PID, 7) is not None  # a TCP socket still resolves (cached table)
    assert resolver.table_reads == 1


def test_not_tcp_memory_expires(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = SocketResolver(_proc(tmp_path, {9: 6002}))
    assert resolver.resolve(PID, 9) is None
    monkeypatch.setattr(sockets, "NOT_TCP_TTL_S", 0.0)
    assert resolver.resolve(PID, 9) is None
    assert resolver.table_reads == 2


def test_unreadable_tables_do_not_mark_a_socket(tmp_path: Path) -> None:
    proc = _proc(tmp_path, {7: 5001}, tcp=None)
    resolver = SocketResolver(proc)
    assert resolver.resolve(PID, 7) is None
    assert resolver.resolve(PID, 7) is None
    assert resolver.table_reads == 2  # read again: nothing was learnt
    (proc / str(PID) / "net" / "tcp").write_text(HEADER + TCP_LINE)
    assert resolver.resolve(PID, 7) is not None
