"""The front cache of established flows (bpf/include/lt_fcache.h, issue 12): whichever
path counted a packet (lt_flows, a cache entry, a fold of one into the other, the drain
of an idle bank), every flow, cgroup and total is exact, and nothing is counted twice."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaktap.controller.kernel import abi, loader, testrun
from leaktap.controller.kernel.hostfs import find_cgroup2_mount
from leaktap.controller.kernel.maps import MapReader
from tests.bpf.harness import Harness
from tests.bpf.lt_frames import tcp4, tcp6
from tests.bpf.test_tc_enforce import (  # noqa: F401  (enf: the fixture)
    BLOCK_SRC,
    TC_ACT_OK,
    TC_ACT_SHOT,
    Enforced,
    enf,
    hello,
)

pytestmark = pytest.mark.kernel

# payload packets of a flow entry that are probed before its slot fills (lt_flow.h)
BUDGET = abi.defines()["LT_PROBE_SEGS"] + abi.defines()["LT_HELLO_SEGS_MAX"]
PIN_ROOT = loader.BPFFS / "leaktap-test-fcache"


def cached_packets(h: Harness, sport: int) -> int:
    """Packets of the flow from `sport` that sit in front cache entries now."""
    table = h.probes.table("lt_fcache")
    return sum(int(e.packets) for _, e in table.items_lookup_batch()
               if int(e.key.sport) == sport)


def test_a_long_flow_is_counted_exactly_by_the_cache_across_drains(tc: Harness) -> None:
    frame = tcp4(bytes(200), sport=41001)
    n = BUDGET + 80

    for _ in range(n):
        testrun.run_frame(tc.probes.fd("egress"), frame)
    # the probed packets and the one that fills the slot are in lt_flows, the rest here
    assert cached_packets(tc, 41001) == n - BUDGET - 1
    out = tc.collect()

    assert [(f.key.sport, f.tx_bytes, f.tx_packets) for f in out.flows] == [
        (41001, n * len(frame), n)]
    assert out.totals[0] == (n * len(frame), n)
    assert list(out.cgroups.values()) == [(n * len(frame), n)]
    assert cached_packets(tc, 41001) == 0  # the idle bank was zeroed

    # the next interval starts in the other bank: probed again, then cached again
    out = tc.run([frame] * 50)
    assert [(f.tx_bytes, f.tx_packets) for f in out.flows] == [(50 * len(frame), 50)]
    assert list(out.cgroups.values()) == [(50 * len(frame), 50)]

    again = tc.collect()  # nothing sent: a drain finds nothing, cgroup totals stand still
    assert again.flows == [] and again.cgroups == {} and again.totals[0] == (0, 0)


def test_flows_that_take_each_others_slots_fold_without_loss_or_double_count(
    tc: Harness,
) -> None:
    # 300 IPv4 + 100 IPv6 flows over 256 slots, 3 packets per flow in turn: colliding
    # flows take each other's slots with packets in them (folds); a drain between two
    # intervals flips the bank while entries hold packets
    frames = [tcp4(bytes(100 + i % 7), sport=42000 + i) for i in range(300)]
    frames += [tcp6(bytes(60 + i % 5), sport=43000 + i) for i in range(100)]
    sports = [*range(42000, 42300), *range(43000, 43100)]
    fd = tc.probes.fd("egress")

    for turns in (BUDGET // 3 + 4, BUDGET // 3 + 2):
        per_flow = 3 * turns
        for _ in range(turns):
            for f in frames:
                for _ in range(3):
                    testrun.run_frame(fd, f)
        out = tc.collect()
        assert out.changed().get("cnt_fcache_fold", 0) > 0, out.changed()
        got = sorted((f.key.sport, f.tx_bytes, f.tx_packets) for f in out.flows)
        assert got == sorted((sport, per_flow * len(f), per_flow)
                             for sport, f in zip(sports, frames, strict=True))
        sent = sum(per_flow * len(f) for f in frames)
        assert out.totals[0] == (sent, per_flow * len(frames))
        assert list(out.cgroups.values()) == [(sent, per_flow * len(frames))]


@pytest.fixture
def cgroup_dirs() -> Iterator[list[Path]]:
    mount = find_cgroup2_mount()
    assert mount is not None, "no cgroup2 mount"
    parent = mount / "leaktap-test-fcache"
    parent.mkdir(exist_ok=True)
    dirs = [parent / f"cg{i}" for i in range(3)]
    for d in dirs:
        d.mkdir(exist_ok=True)
    yield dirs
    for d in dirs:
        d.rmdir()
    parent.rmdir()


def _send_from_cgroup(cgroup: Path, fd: int, frames: list[bytes]) -> None:
    """Run the frames from a child process that lives in `cgroup` (the test-run
    socket takes its sender's cgroup)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
            for f in frames:
                testrun.run_frame(fd, f)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_cgroup_totals_are_exact_per_cgroup_and_reaped_whole(
    tc: Harness, cgroup_dirs: list[Path]
) -> None:
    fd = tc.probes.fd("egress")
    sent = {}
    for i, d in enumerate(cgroup_dirs):
        frames = [tcp4(bytes(300 + i), sport=44000 + i)] * (BUDGET + 40 + i)
        frames += [tcp4(bytes(90), sport=44100 + i, flags="FA")]  # never cached
        _send_from_cgroup(d, fd, frames)
        sent[d.stat().st_ino] = (sum(len(f) for f in frames), len(frames))

    out = tc.collect()

    assert out.cgroups == sent
    by_cgroup: dict[int, tuple[int, int]] = {}
    for f in out.flows:
        b, p = by_cgroup.get(f.key.cgroup_id, (0, 0))
        by_cgroup[f.key.cgroup_id] = (b + f.tx_bytes, p + f.tx_packets)
    assert by_cgroup == sent
    # a reaped cgroup's total is both of its parts (lt_cgtot and lt_cgdrained), once
    gone = cgroup_dirs[0].stat().st_ino
    before = tc.reader.cgroup_totals()[gone]
    assert tc.reader.remove_cgroups([gone]) == {gone: before}
    assert gone not in tc.reader.cgroup_totals()


@pytest.fixture
def pin_root() -> Iterator[Path]:
    shutil.rmtree(PIN_ROOT, ignore_errors=True)
    yield PIN_ROOT
    shutil.rmtree(PIN_ROOT, ignore_errors=True)


def test_a_restart_drains_the_cached_volume_of_the_pinned_maps(pin_root: Path) -> None:
    options = loader.KernelOptions(flows_max=1024, pin=True, pin_root=str(pin_root))
    frame = tcp4(bytes(500), sport=45001)
    n = BUDGET + 30
    first = loader.load("tc", options)
    for _ in range(n):
        testrun.run_frame(first.fd("egress"), frame)
    first.close()  # a crash: nothing drained, 29 packets only in the cache

    second = loader.load("tc", options)
    try:
        reader = MapReader(second)
        assert [(f.key.sport, f.tx_bytes, f.tx_packets) for f in reader.drain_flows()] == [
            (45001, n * len(frame), n)]
        assert list(reader.cgroup_totals().values()) == [(n * len(frame), n)]
        assert reader.drain_flows() == []
    finally:
        second.close()


def test_a_cached_flow_blocked_on_another_cpu_is_dropped_here(enf: Enforced) -> None:  # noqa: F811
    cpus = sorted(range(os.cpu_count() or 1))
    assert len(cpus) >= 2, "needs two CPUs: a flow cached on one, blocked on the other"
    fd = enf.tc.probes.fd("egress")
    flow = {"src": BLOCK_SRC, "sport": 50077}
    data = tcp4(bytes(200), seq=9000, **flow)

    # another flow blocked first: the switch is on, so cached packets look lt_blocked up
    retvals, _, _ = enf.run([hello(b"Evil.My.Salesforce.com", src=BLOCK_SRC, sport=50078)])
    assert retvals == [TC_ACT_SHOT]
    os.sched_setaffinity(0, {cpus[0]})
    assert {testrun.run_frame(fd, data).retval for _ in range(BUDGET + 10)} == {TC_ACT_OK}
    assert cached_packets(enf.tc, 50077) == 9  # found not blocked once, then not again
    os.sched_setaffinity(0, {cpus[1]})  # its lt_flows slot here is fresh: the hello is read
    assert testrun.run_frame(fd, hello(b"Evil.My.Salesforce.com", **flow)).retval == TC_ACT_SHOT
    os.sched_setaffinity(0, {cpus[0]})

    assert testrun.run_frame(fd, data).retval == TC_ACT_SHOT  # in the cache, still dropped
    assert cached_packets(enf.tc, 50077) == 10
