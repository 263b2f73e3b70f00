"""ssl_uprobe.bpf.c against a real OpenSSL: a child process does TLS over memory BIOs
(no network) while its pid-scoped uprobes capture writes in chunks, spend the
per-process budget on each write's head and tail, and count every lost byte
per connection and reason."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from leaktap.controller.kernel.loader import SslOptions, SslProbes, load_ssl
from leaktap.controller.kernel.loss import LossMonitor
from leaktap.controller.plaintext.events import SslEvent, SslEventDecoder, ssl_stat_names
from leaktap.controller.plaintext.monitor import REMEDIES, lost_reason_names

pytestmark = pytest.mark.kernel

LIBSSL = "/lib/x86_64-linux-gnu/libssl.so.3"

# client and server SSLObjects in one process, connected through memory BIOs
# (no network); handshake() pumps the BIOs until both sides are done
OBJECTS = """
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
def handshake():
    for _ in range(10):
        s_in.write(c_out.read()); c_in.write(s_out.read())
        for side in (cli, srv):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
"""
# handshakes, waits for a line, then makes `count` writes of `size` bytes (pattern(i, size))
WRITER = OBJECTS + """
handshake()
print("ready", flush=True)
sys.stdin.readline()
count, size = int(sys.argv[1]), int(sys.argv[2])
for i in range(count):
    cli.write(bytes((65 + i + j * 7) % 251 for j in range(size)))
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


def pattern(i: int, size: int) -> bytes:
    return bytes((65 + i + j * 7) % 251 for j in range(size))


def lost_bytes(probes: SslProbes, pid: int) -> dict[str, int]:
    """lt_ssl_lost of `pid`'s connections by reason name, plus `writes`."""
    names = lost_reason_names()
    out: dict[str, int] = {}
    for k, v in probes.table("lt_ssl_lost").items():
        if k.tgid == pid:
            for i, name in enumerate(names):
                out[name] = out.get(name, 0) + int(v.bytes[i])
            out["writes"] = out.get("writes", 0) + int(v.writes)
    return {k: v for k, v in out.items() if v}


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


# a write tried before the handshake is done wants to read (as Node's first request
# does): it wrote nothing, and the same buffer is written again once the handshake is
RETRY = OBJECTS + """
print("ready", flush=True)
sys.stdin.readline()
data = bytes((65 + j * 7) % 251 for j in range(int(sys.argv[2])))
try:
    cli.write(data)
    sys.exit("wrote before the handshake")
except ssl.SSLWantReadError:
    pass
handshake()
assert cli.write(data) == len(data)
print("done", flush=True)
"""


def test_a_write_retried_after_wanting_to_read_is_captured_once():
    probes = load_ssl(SslOptions(snap_bytes=4096, events_per_sec=1000))
    p = subprocess.Popen([sys.executable, "-c", RETRY, "1", "10000"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        events, stats = run(probes, p)
    finally:
        p.kill()
        p.wait()
        probes.close()
    # the try that wanted to read wrote nothing: one write, captured once, whole
    assert (stats["ssl_cnt_write"], stats["ssl_cnt_write_nothing"]) == (1, 1)
    assert [e.data_off for e in events] == [0, 4096, 8192]
    assert b"".join(e.data for e in events) == pattern(0, 10_000)
    assert stats["ssl_cnt_bytes_written"] == stats["ssl_cnt_bytes_captured"] == 10_000
    assert stats["ssl_loss_write_unmatched"] == 0


def test_writes_beyond_the_budget_are_dropped_and_every_byte_counted(child):
    probes = load_ssl(SslOptions(snap_bytes=64, events_per_sec=10))
    try:
        p = child(100, 64)
        events, stats = run(probes, p)
        lost = lost_bytes(probes, p.pid)
    finally:
        probes.close()
    assert stats["ssl_cnt_write"] == 100
    # a bucket of 10 chunks, refilling at 10/s while 100 writes take milliseconds
    sent = stats["ssl_cnt_event"]
    assert len(events) == sent and sent in (10, 11)
    assert stats["ssl_loss_rate_limited"] == 100 - sent
    assert (stats["ssl_cnt_bytes_written"], stats["ssl_cnt_bytes_captured"]) == (6400, 64 * sent)
    assert lost == {"rate_limited": 64 * (100 - sent), "writes": 100 - sent}
    first = events[0]
    assert (first.data, first.req_len, first.data_off, first.fd) == (pattern(0, 64), 64, 0, -1)
    assert first.comm.startswith("python")


def test_a_70k_write_arrives_whole_in_ordered_chunks(child):
    probes = load_ssl(SslOptions(snap_bytes=4096, events_per_sec=1000))
    try:
        p = child(1, 70_000)
        events, stats = run(probes, p)
        lost = lost_bytes(probes, p.pid)
    finally:
        probes.close()
    assert [e.data_off for e in events] == list(range(0, 70_000, 4096))
    assert {e.req_len for e in events} == {70_000}
    assert b"".join(e.data for e in events) == pattern(0, 70_000)
    assert [e.write_ends for e in events] == [False] * 17 + [True]
    assert stats["ssl_cnt_bytes_written"] == stats["ssl_cnt_bytes_captured"] == 70_000
    assert lost == {} and stats["ssl_loss_chunk_bound"] == 0


def test_a_write_beyond_the_chunk_bound_sends_head_and_tail(child):
    probes = load_ssl(SslOptions(snap_bytes=1024, events_per_sec=1000, chunks_max=4))
    try:
        p = child(1, 10_000)
        events, stats = run(probes, p)
        lost = lost_bytes(probes, p.pid)
    finally:
        probes.close()
    data = pattern(0, 10_000)
    assert [e.data_off for e in events] == [0, 1024, 10_000 - 2048, 10_000 - 1024]
    assert all(e.data == data[e.data_off:e.data_off + 1024] for e in events)
    assert stats["ssl_loss_chunk_bound"] == 1
    assert lost == {"chunk_bound": 10_000 - 4096, "writes": 1}
    assert stats["ssl_cnt_bytes_captured"] == 4096


def test_a_short_budget_is_spent_on_the_head_and_tail_of_a_write(child):
    probes = load_ssl(SslOptions(snap_bytes=64, events_per_sec=5))
    try:
        p = child(1, 64 * 20)
        events, stats = run(probes, p)
        lost = lost_bytes(probes, p.pid)
    finally:
        probes.close()
    # 5 tokens for 20 chunks: 3 from the head, 2 from the tail, in offset order
    assert [e.data_off for e in events] == [0, 64, 128, 64 * 18, 64 * 19]
    assert lost == {"budget": 64 * 15, "writes": 1}
    assert stats["ssl_loss_rate_limited"] == 15


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
        lost = lost_bytes(probes, p.pid)
    finally:
        probes.close()
    assert stats["ssl_cnt_write"] == 50
    assert rises["ssl_loss_ringbuf_full"] == 50 - stats["ssl_cnt_event"] > 0
    assert lost == {"ringbuf_full": 4096 * rises["ssl_loss_ringbuf_full"],
                    "writes": rises["ssl_loss_ringbuf_full"]}
    assert "ssl_loss_ringbuf_full" in caplog.text and "ring buffer" in caplog.text


# the plaintext drop-in's capabilities over the base unit's: no CAP_SYS_ADMIN
UNIT_CAPS = "-all,+bpf,+perfmon,+net_admin,+sys_resource,+sys_ptrace,+dac_read_search"
UNPRIVILEGED_CAPTURE = f"""
import ctypes, subprocess, sys
from pathlib import Path
from leaktap.controller.kernel.loader import SslOptions, load_ssl
from leaktap.controller.plaintext.events import SslEventDecoder
status = Path("/proc/self/status").read_text()
assert not int(next(ln for ln in status.splitlines() if ln.startswith("CapEff")).split()[1],
               16) & (1 << 21), "CAP_SYS_ADMIN"
writer = subprocess.Popen([sys.executable, "-c", {WRITER!r}, "3", "100"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert writer.stdout.readline().strip() == "ready"
probes = load_ssl(SslOptions(snap_bytes=4096, events_per_sec=1000))
decoder = SslEventDecoder(probes.table("lt_ssl_scratch").sLeaf)
events = []
probes.table("lt_ssl_events").open_ring_buffer(
    lambda _c, data, size: events.append(decoder.decode(ctypes.string_at(data, size))) or 0)
library = f"/proc/{{writer.pid}}/root{LIBSSL}"  # how the monitor names a process's library
hooked = probes.attach(library, writer.pid)
out, _ = writer.communicate("go\\n", timeout=60)
probes.bpf.ring_buffer_consume()
writes = [e for e in events if e.tgid == writer.pid and e.kind == "write"]
print(len(writes), sorted(hooked), *(e.data[:8].hex() for e in writes))
probes.close()
"""


def test_per_process_probes_attach_without_cap_sys_admin():
    """plaintext.select probes each process apart. Without CAP_SYS_ADMIN the kernel
    refuses the uprobe PMU and BCC falls back to a tracefs event named after the
    whole path, which the kernel refused as too long: no process was probed."""
    done = subprocess.run(["setpriv", f"--bounding-set={UNIT_CAPS}", "--inh-caps=-all", "--",
                           sys.executable, "-c", UNPRIVILEGED_CAPTURE],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    count, *rest = done.stdout.split(maxsplit=1)
    assert int(count) == 3, done.stdout
    assert "'SSL_write'" in rest[0]
    assert rest[0].split()[-3:] == [pattern(i, 100)[:8].hex() for i in range(3)]


def test_uprobe_events_left_by_a_dead_agent_are_removed():
    from pathlib import Path

    from leaktap.controller.kernel.uprobe_attach import (
        TRACEFS,
        file_offset,
        remove_stale_events,
        short_uprobe_event_name,
        tracefs_write,
    )
    from leaktap.controller.plaintext.libraries import ssl_function_addresses

    events = next(root / "uprobe_events" for root in TRACEFS
                  if (root / "uprobe_events").exists())
    offset = file_offset(LIBSSL, ssl_function_addresses(LIBSSL)["SSL_write"])
    dead = subprocess.Popen(["true"])  # only its pid, free once it has exited, matters
    dead.wait()
    names = {
        who: short_uprobe_event_name(b"p", who.encode(), offset, -1).decode() + f"_bcc_{pid}"
        for who, pid in (("dead", dead.pid), ("alive", os.getpid()))}
    names["other"] = f"p_someone_else_bcc_{dead.pid}"  # not ours: never touched
    for name in names.values():
        tracefs_write(events, f"p:uprobes/{name} {LIBSSL}:{offset:#x}\n")
    try:
        assert remove_stale_events() == 1
        left = Path(events).read_text()
        assert names["dead"] not in left
        assert names["alive"] in left and names["other"] in left
    finally:
        for name in names.values():
            with contextlib.suppress(OSError):
                tracefs_write(events, f"-:uprobes/{name}\n")
