"""ssl_uprobe.bpf.c against a real OpenSSL: a child process does TLS over memory BIOs
(no network) while its pid-scoped uprobes capture, rate-limit and count."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from leaktap.controller.kernel.loader import SslOptions, SslProbes, load_ssl
from leaktap.controller.kernel.loss import LossMonitor
from leaktap.controller.plaintext.events import SslEvent, SslEventDecoder, ssl_stat_names
from leaktap.controller.plaintext.monitor import REMEDIES

pytestmark = pytest.mark.kernel

LIBSSL = "/lib/x86_64-linux-gnu/libssl.so.3"

# client and server SSLObjects in one process, handshaking through memory BIOs;
# waits for a line, then makes `count` writes of `size` bytes
WRITER = """
import ssl, subprocess, sys, tempfile, os
d = tempfile.mkdtemp()
subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                "-subj", "/CN=t", "-keyout", d + "/k", "-out", d + "/c"], check=True,
               capture_output=True)
sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); sctx.load_cert_chain(d + "/c", d + "/k")
cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); cctx.check_hostname = False
cctx.verify_mode = ssl.CERT_NONE
c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
cli = cctx.wrap_bio(c_in, c_out); srv = sctx.wrap_bio(s_in, s_out, server_side=True)
for _ in range(10):
    for side in (cli, srv):
        try:
            side.do_handshake()
        except ssl.SSLWantReadError:
            pass
    s_in.write(c_out.read()); c_in.write(s_out.read())
print("ready", flush=True)
sys.stdin.readline()
count, size = int(sys.argv[1]), int(sys.argv[2])
for i in range(count):
    cli.write(bytes([65 + i % 26]) * size)
    c_out.read()
print("done", flush=True)
"""


@pytest.fixture
def child() -> Iterator[callable]:
    procs: list[subprocess.Popen[str]] = []

    def start(count: int, size: int) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(count), str(size)],
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
    import ctypes

    probes.table("lt_ssl_events").open_ring_buffer(
        lambda _c, data, size: events.append(decoder.decode(ctypes.string_at(data, size))) or 0)
    probes.attach(LIBSSL, proc.pid)
    out, _ = proc.communicate("go\n", timeout=60)
    assert "done" in out
    probes.bpf.ring_buffer_consume()
    table = probes.table("lt_ssl_stats")
    stats = {n: sum(int(v) for v in table[table.Key(i)]) for i, n in enumerate(ssl_stat_names())}
    return [e for e in events if e.tgid == proc.pid and e.kind == "write"], stats


def test_writes_are_captured_truncated_and_rate_limited(child):
    probes = load_ssl(SslOptions(snap_bytes=64, events_per_sec=10))
    try:
        events, stats = run(probes, child(100, 100))
    finally:
        probes.close()
    assert stats["ssl_cnt_write"] == 100
    # the window of 10: the child's own exec notice took one of them
    assert len(events) == stats["ssl_cnt_event"] in (9, 10, 18, 19, 20)
    assert stats["ssl_loss_rate_limited"] == 100 - stats["ssl_cnt_event"]
    assert stats["ssl_loss_truncated"] == stats["ssl_cnt_event"]
    first = events[0]
    assert (first.data, first.req_len, first.fd) == (b"A" * 64, 100, -1)
    assert first.comm.startswith("python")


def test_a_full_ring_is_counted_and_warned_about(child, caplog):
    probes = load_ssl(SslOptions(snap_bytes=4096, ringbuf_pages=1, events_per_sec=100000))
    loss = LossMonitor(prefix="ssl_loss_", remedies=REMEDIES)
    try:
        table = probes.table("lt_ssl_stats")
        loss.check({n: 0 for n in ssl_stat_names()})
        p = child(50, 4096)
        # never drained: one page holds no 4 KiB event at all
        probes.attach(LIBSSL, p.pid)
        p.communicate("go\n", timeout=60)
        stats = {n: sum(int(v) for v in table[table.Key(i)])
                 for i, n in enumerate(ssl_stat_names())}
        with caplog.at_level(logging.WARNING):
            rises = loss.check(stats)
    finally:
        probes.close()
    assert stats["ssl_cnt_write"] == 50
    assert rises["ssl_loss_ringbuf_full"] == 50 - stats["ssl_cnt_event"] > 0
    assert "ssl_loss_ringbuf_full" in caplog.text and "ring buffer" in caplog.text
