"""The read side of ssl_uprobe.bpf.c (issue 14.1) against a real OpenSSL.

A child process is a TLS client over an AF_UNIX socketpair to a forked
server (no network): it writes a request, then reads `count` answers of
`size` bytes, through CPython (SSL_write_ex / SSL_read_ex) or through
libssl's SSL_write / SSL_read called with ctypes. Its pid-scoped probes must
deliver every byte each read returned, as `read` events on the same
connection as its writes, under the process's budget (of which reads may
spend only half: the request written after a flood of reads is still seen),
and count what they could not deliver per connection and direction.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from leaktap.controller.kernel import abi
from leaktap.controller.kernel.loader import SslOptions, SslProbes, load_ssl
from leaktap.controller.plaintext.events import SslEvent, SslEventDecoder, ssl_stat_names
from leaktap.controller.plaintext.monitor import lost_reason_names

pytestmark = pytest.mark.kernel

LIBSSL = "/lib/x86_64-linux-gnu/libssl.so.3"
REQUEST = b"GET /services/data/v59.0/sobjects/Account HTTP/1.1\r\nHost: x\r\n\r\n"

# argv: count size api(ex|plain) request. The server answers the request with
# `count` records pattern(i, size); the client reads until it has them all,
# then writes the request once more.
CLIENT = r"""
import ctypes, os, socket, ssl, subprocess, sys, tempfile
count, size, api = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def pattern(i, n):
    return bytes((97 + i + j * 5) % 251 for j in range(n))
d = tempfile.mkdtemp()
subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                "-subj", "/CN=t", "-keyout", d + "/k", "-out", d + "/c"], check=True,
               capture_output=True)
a, b = socket.socketpair()
if os.fork() == 0:
    a.close()
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(d + "/c", d + "/k")
    with sctx.wrap_socket(b, server_side=True) as s:
        s.recv(65536)
        for i in range(count):
            s.sendall(pattern(i, size))
        s.recv(1)
    os._exit(0)
b.close()
want = count * size
if api == "ex":
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    tls = cctx.wrap_socket(a, server_hostname="t")
    print("ready", flush=True)
    sys.stdin.readline()
    tls.sendall(sys.argv[4].encode())
    got = 0
    while got < want:
        got += len(tls.recv(65536))
    tls.sendall(sys.argv[4].encode())
else:
    L = ctypes.CDLL("libssl.so.3")
    L.TLS_client_method.restype = ctypes.c_void_p
    L.SSL_CTX_new.restype = ctypes.c_void_p
    L.SSL_CTX_new.argtypes = [ctypes.c_void_p]
    L.SSL_new.restype = ctypes.c_void_p
    L.SSL_new.argtypes = [ctypes.c_void_p]
    L.SSL_set_fd.argtypes = [ctypes.c_void_p, ctypes.c_int]
    L.SSL_connect.argtypes = [ctypes.c_void_p]
    L.SSL_write.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    L.SSL_read.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    s = L.SSL_new(L.SSL_CTX_new(L.TLS_client_method()))
    L.SSL_set_fd(s, a.fileno())
    assert L.SSL_connect(s) == 1
    print("ready", flush=True)
    sys.stdin.readline()
    req = sys.argv[4].encode()
    assert L.SSL_write(s, req, len(req)) == len(req)
    buf = ctypes.create_string_buffer(65536)
    got = 0
    while got < want:
        n = L.SSL_read(s, buf, 65536)
        assert n > 0, n
        got += n
    assert L.SSL_write(s, req, len(req)) == len(req)
print("done", got, flush=True)
"""


def pattern(i: int, n: int) -> bytes:
    return bytes((97 + i + j * 5) % 251 for j in range(n))


@pytest.fixture
def client() -> Iterator[Callable[[int, int, str], subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(count: int, size: int, api: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(count), str(size), api, REQUEST.decode()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def run(probes: SslProbes, proc: subprocess.Popen[str]) -> tuple[list[SslEvent], dict[str, int]]:
    decoder = SslEventDecoder(probes.table("lt_ssl_scratch").sLeaf)
    events: list[SslEvent] = []
    probes.table("lt_ssl_events").open_ring_buffer(
        lambda _c, data, size: events.append(decoder.decode(ctypes.string_at(data, size))) or 0)
    hooked = probes.attach(LIBSSL, proc.pid)
    assert {"SSL_read", "SSL_read:return", "SSL_read_ex", "SSL_read_ex:return"} <= set(hooked)
    out, _ = proc.communicate("go\n", timeout=60)
    assert "done" in out
    probes.bpf.ring_buffer_consume()
    table = probes.table("lt_ssl_stats")
    stats = {n: sum(int(v) for v in table[table.Key(i)]) for i, n in enumerate(ssl_stat_names())}
    return [e for e in events if e.tgid == proc.pid and e.kind in ("write", "read")], stats


def lost_by_direction(probes: SslProbes, pid: int) -> dict[int, dict[str, int]]:
    """lt_ssl_lost of `pid` by key.dir, then reason (plus `writes`: calls with a loss)."""
    names = lost_reason_names()
    out: dict[int, dict[str, int]] = {}
    for k, v in probes.table("lt_ssl_lost").items():
        if k.tgid != pid:
            continue
        per = out.setdefault(int(k.dir), {})
        for i, name in enumerate(names):
            if v.bytes[i]:
                per[name] = per.get(name, 0) + int(v.bytes[i])
        per["writes"] = per.get("writes", 0) + int(v.writes)
    return out


def reassemble(events: list[SslEvent]) -> bytes:
    """The reads' bytes in order; every chunk must follow the last without a hole."""
    out = bytearray()
    pos = 0
    for e in events:
        assert e.data_off == (pos if e.data_off else 0)
        pos = e.data_off + len(e.data)
        out += e.data
    return bytes(out)


@pytest.mark.parametrize("api", ["ex", "plain"])
def test_every_byte_a_read_returns_arrives_after_the_request(client, api):
    probes = load_ssl(SslOptions(snap_bytes=4096, events_per_sec=10_000))
    try:
        p = client(3, 70_000, api)
        events, stats = run(probes, p)
        lost = lost_by_direction(probes, p.pid)
    finally:
        probes.close()
    writes = [e for e in events if e.kind == "write"]
    reads = [e for e in events if e.kind == "read"]
    assert [e.data for e in writes] == [REQUEST, REQUEST]
    assert events[0].kind == events[-1].kind == "write"  # request, answer, request
    assert {e.ssl_ptr for e in reads} == {writes[0].ssl_ptr}
    assert reassemble(reads) == b"".join(pattern(i, 70_000) for i in range(3))
    # a read returns at most one TLS record (16 KiB), chunked like a write
    assert all(e.req_len <= 16384 and len(e.data) <= 4096 for e in reads)
    assert stats["ssl_cnt_bytes_read"] == stats["ssl_cnt_bytes_read_captured"] == 210_000
    assert stats["ssl_cnt_read"] == len([e for e in reads if e.data_off == 0])
    assert stats["ssl_cnt_bytes_written"] == stats["ssl_cnt_bytes_captured"] == 2 * len(REQUEST)
    assert stats["ssl_loss_read_unmatched"] == 0 and lost == {}
    # the request's send syscall bound the connection to its socket before any read
    (fd,) = {e.fd for e in reads}
    assert fd >= 0


def test_reads_spend_half_the_budget_and_their_losses_are_counted_apart(client):
    # 20 chunk tokens: the request takes one, the reads down to the last 10, and the
    # request written after them still finds its token
    probes = load_ssl(SslOptions(snap_bytes=1024, events_per_sec=20))
    try:
        p = client(1, 100_000, "ex")
        events, stats = run(probes, p)
        lost = lost_by_direction(probes, p.pid)
    finally:
        probes.close()
    dirs = abi.enums()["lt_ssl_dir"]
    reads = [e for e in events if e.kind == "read"]
    captured = sum(len(e.data) for e in reads)
    assert stats["ssl_cnt_bytes_read"] == 100_000
    assert stats["ssl_cnt_bytes_read_captured"] == captured < 100_000
    # every chunk sent spent a token: 9 down to half the bucket, plus its refill meanwhile
    assert 9 <= len(reads) <= 14
    assert [e.data for e in events if e.kind == "write"] == [REQUEST, REQUEST]
    answer = pattern(0, 100_000)
    assert all(e.data in answer for e in reads)
    assert dirs == {"LT_SSL_DIR_WRITE": 0, "LT_SSL_DIR_READ": 1}
    assert 0 not in lost  # the request was captured whole
    read_lost = lost[1]
    assert sum(n for r, n in read_lost.items() if r != "writes") == 100_000 - captured
    assert read_lost["writes"] >= 1 and set(read_lost) - {"writes"} <= {"rate_limited", "budget"}

