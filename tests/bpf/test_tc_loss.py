"""Loss accounting (STYLE.md section 6) under constrained builds.

Every event that does not reach user space is counted under a reason, and LRU
flow evictions never lose volume: it stays in the totals as unattributed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaktap.controller.kernel.hostfs import find_cgroup2_mount
from leaktap.controller.kernel.loss import LossMonitor
from tests.bpf.lt_frames import CLIENT4, SERVER4, client_hello, segments, tcp4, udp4
from tests.prerequisites import missing

pytestmark = pytest.mark.kernel

HELLO_1K = client_hello(size=1000)
HELLO_2K = client_hello(size=1800)


def test_one_page_ring_flood_counts_every_lost_hello(tc_tiny_ring, caplog):
    sent = 20
    frames = [tcp4(HELLO_1K, sport=44000 + i) for i in range(sent)]
    monitor = LossMonitor()
    monitor.check(tc_tiny_ring.reader.stats())

    out = tc_tiny_ring.run(frames)  # no polling until all 20 ran

    delivered, lost = out.stats["cnt_ev_hello"], out.stats["loss_ringbuf_full"]
    assert lost > 0
    assert delivered + lost == sent
    assert len(out.samples) == delivered
    assert all(s.data == HELLO_1K for s in out.samples)
    # the delivered ones are the first ones: the ring filled, then every later one failed
    assert [s.sport for s in out.samples] == [44000 + i for i in range(delivered)]
    assert out.changed() == {"cnt_flow_new": sent, "cnt_ev_hello": delivered,
                             "loss_ringbuf_full": lost, "cnt_sni_named": sent}
    # the controller's loss monitor turns the rise into one WARNING with a remedy
    with caplog.at_level(logging.WARNING, logger="leaktap.controller.kernel.loss"):
        assert monitor.check(tc_tiny_ring.reader.stats()) == {"loss_ringbuf_full": lost}
    [record] = [r for r in caplog.records if r.name == "leaktap.controller.kernel.loss"]
    assert record.levelno == logging.WARNING
    assert f"lost {lost} " in record.getMessage()
    assert "loss_ringbuf_full" in record.getMessage()
    assert "ringbuf_pages" in record.getMessage()


def test_ring_has_room_again_after_a_poll(tc_tiny_ring):
    tc_tiny_ring.run([tcp4(HELLO_1K, sport=44100 + i) for i in range(10)])

    out = tc_tiny_ring.run(tcp4(HELLO_1K, sport=44199))

    assert [s.sport for s in out.samples] == [44199]
    assert out.stats["loss_ringbuf_full"] == 0


def test_rate_limit_delivers_the_budget_then_counts_the_rest(tc_rate3):
    frames = [tcp4(HELLO_1K, sport=44200 + i) for i in range(10)]

    out = tc_rate3.run(frames)

    assert [s.sport for s in out.samples] == [44200, 44201, 44202]
    assert out.changed() == {"cnt_flow_new": 10, "cnt_ev_hello": 3, "loss_rate_limited": 7,
                             "cnt_sni_named": 10}


def test_rate_limit_covers_every_event_kind(tc_rate3):
    dns = bytes.fromhex("00070100000100000000000000") + b"\x00"  # a tiny query-shaped blob
    quic = b"\xc3\x00\x00\x00\x01" + b"\x00" * 1195
    frames = [
        tcp4(HELLO_1K, sport=44300), udp4(dns, src=CLIENT4, dst=SERVER4, sport=44301, dport=53),
        udp4(quic, sport=44302), tcp4(HELLO_1K, sport=44303),
        udp4(dns, src=CLIENT4, dst=SERVER4, sport=44304, dport=53), udp4(quic, sport=44305),
    ]

    out = tc_rate3.run(frames)

    assert [s.kind for s in out.samples] == ["tls_hello", "dns", "quic_initial"]
    assert out.stats["loss_rate_limited"] == 3


def test_rate_limit_window_renews_after_a_second(tc_rate3):
    first = tc_rate3.run([tcp4(HELLO_1K, sport=44400 + i) for i in range(4)])
    assert (len(first.samples), first.stats["loss_rate_limited"]) == (3, 1)

    time.sleep(1.05)
    second = tc_rate3.run([tcp4(HELLO_1K, sport=44410 + i) for i in range(4)])

    assert (len(second.samples), second.stats["loss_rate_limited"]) == (3, 1)


def test_lru_evictions_never_lose_volume(tc_tiny_flows):
    flows_max = tc_tiny_flows.probes.options.flows_max
    n = 100
    frames = {44500 + i: udp4(b"v" * (10 + 3 * i), sport=44500 + i, dport=9) for i in range(n)}
    sent_bytes = sum(map(len, frames.values()))

    out = tc_tiny_flows.run(list(frames.values()))

    assert out.stats["cnt_flow_new"] + out.stats["loss_flow_insert"] == n
    assert len(out.flows) <= flows_max < n
    for flow in out.flows:  # what survived is exact
        assert (flow.tx_bytes, flow.tx_packets) == (len(frames[flow.key.sport]), 1)
    assert out.totals[0] == (sent_bytes, n)
    cgroup = tc_tiny_flows.cgroup_id
    if cgroup is not None:
        assert out.cgroups == {cgroup: (sent_bytes, n)}
    attributed = sum(f.tx_bytes for f in out.flows)
    evicted = sum(len(f) for sport, f in frames.items()
                  if sport not in {fl.key.sport for fl in out.flows})
    assert out.totals[0][0] - attributed == evicted > 0


def test_every_pending_hello_continuation_is_delivered_or_counted(tc_tiny_pending):
    # More multi-segment hellos in flight than LT_HELLO_PENDING_MAX: a hello that
    # cannot be followed must show up as loss_hello_pending, not vanish.
    pending_max = tc_tiny_pending.probes.options.hello_pending_max
    n = 3 * pending_max
    pieces = segments(HELLO_2K, [1000])
    starts = [tcp4(pieces[0][1], sport=44600 + i, seq=1) for i in range(n)]
    rests = [tcp4(pieces[1][1], sport=44600 + i, seq=1 + 1000) for i in range(n)]

    started = tc_tiny_pending.run(starts)
    assert len(started.samples) == n
    continued = tc_tiny_pending.run(rests)

    delivered = len(continued.samples)
    counted = started.stats["loss_hello_pending"] + continued.stats["loss_hello_pending"]
    assert delivered + counted == n, (
        f"{n} hellos started with room for {pending_max}: {delivered} continuations "
        f"delivered, {counted} counted as loss_hello_pending, "
        f"{n - delivered - counted} lost silently"
    )


@contextlib.contextmanager
def in_cgroup(path: Path, home: Path) -> Iterator[None]:
    """Run this process in cgroup `path` (the test-run socket takes the caller's cgroup)."""
    (path / "cgroup.procs").write_text(str(os.getpid()))
    try:
        yield
    finally:
        (home / "cgroup.procs").write_text(str(os.getpid()))


def test_cgroup_totals_are_per_cgroup_and_overflow_is_counted(tc_tiny_cgroups):
    mount = find_cgroup2_mount()
    if mount is None:
        missing("no cgroup2 mount")
    own = Path("/proc/self/cgroup").read_text().split("0::", 1)[1].splitlines()[0]
    home = mount / own.lstrip("/")
    dirs = [mount / f"lt-kernel-test-{os.getpid()}-{i}" for i in range(3)]
    frames = [udp4(b"c" * (100 * (i + 1)), sport=44700 + i, dport=9) for i in range(3)]
    try:
        for d in dirs:
            d.mkdir()
        results = []
        for d, frame in zip(dirs, frames, strict=True):
            with in_cgroup(d, home):
                results.append(tc_tiny_cgroups.run(frame))
        ids = [d.stat().st_ino for d in dirs]
    finally:
        for d in dirs:
            with contextlib.suppress(OSError):
                d.rmdir()

    # every flow carries its sender's cgroup id: the inode of the cgroup directory
    assert [r.flow().key.cgroup_id for r in results] == ids
    # two fit (cgroups_max=2); the third overflows, is counted, and stays in lt_totals
    assert [r.cgroups for r in results[:2]] == [
        {ids[0]: (len(frames[0]), 1)}, {ids[1]: (len(frames[1]), 1)}
    ]
    assert results[2].cgroups == {}
    assert results[2].changed() == {"cnt_flow_new": 1, "loss_cgroup_full": 1}
    assert [r.totals[0] for r in results] == [(len(f), 1) for f in frames]



def test_controller_expires_hellos_that_never_complete(tc):
    # lt_hello is not LRU (a full map must count, not evict): the controller frees
    # entries of hellos whose continuation never came
    pieces = segments(HELLO_2K, [1000])
    tc.run(tcp4(pieces[0][1], sport=47111, seq=1))
    hellos = tc.probes.table("lt_hello")
    assert len(list(hellos.items())) == 1
    assert tc.reader.expire_hellos(max_age_ns=60 * 10**9) == 0  # still young
    assert tc.reader.expire_hellos(max_age_ns=0) == 1
    assert list(hellos.items()) == []
    # the continuation now arrives too late: not captured, nothing counted as lost
    late = tc.run(tcp4(pieces[1][1], sport=47111, seq=1 + 1000))
    assert late.samples == [] and late.changed() == {"cnt_flow_new": 1}
