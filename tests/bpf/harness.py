"""The kernel test harness: frames through the compiled TC/XDP programs with BPF_PROG_TEST_RUN.

Each distinct KernelOptions is compiled once per session (BCC takes seconds
per compile) and its ring buffer is opened once (a `Kernel`). A test gets a
`Harness` that starts from drained maps and returns, for what it ran, the
drained flows, the ring-buffer samples and the delta of the monotonic counters.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from leaktap.controller.kernel import testrun
from leaktap.controller.kernel.loader import KernelOptions, Probes, load
from leaktap.controller.kernel.maps import FlowCounters, KernelName, MapReader
from leaktap.controller.kernel.ringbuf import RingDrainer, Sample

DEFAULT = KernelOptions(flows_max=4096)
# the ring also carries the single-segment hellos the kernel names: for tests of the
# ring capture itself (bytes, chunks, losses), which the default build leaves to lt_names
RING_NAMED = KernelOptions(flows_max=4096, ring_named_hellos=True)
TINY_RING = KernelOptions(flows_max=4096, ringbuf_pages=1, ring_named_hellos=True)
TINY_FLOWS = KernelOptions(flows_max=16)
RATE_3 = KernelOptions(flows_max=4096, events_per_sec=3, ring_named_hellos=True)
TINY_PENDING = KernelOptions(flows_max=4096, hello_pending_max=4)
TINY_CGROUPS = KernelOptions(flows_max=4096, cgroups_max=2)


class Kernel:
    """One compiled and loaded program set, its map reader and its ring buffer."""

    def __init__(self, options: KernelOptions, mode: str = "tc") -> None:
        self.options = options
        self.mode = mode
        self.probes: Probes = load(mode, options)
        self.reader = MapReader(self.probes)
        self.received: list[Sample] = []
        self.drainer = RingDrainer(self.probes, self.received.append)

    def close(self) -> None:
        self.probes.close()


@dataclass
class Outcome:
    """What one `Harness.run` did: everything is a delta since the previous run."""

    retvals: list[int]
    flows: list[FlowCounters]
    samples: list[Sample]
    stats: Counter[str]
    totals: dict[int, tuple[int, int]]  # direction -> (bytes, packets)
    cgroups: dict[int, tuple[int, int]] = field(default_factory=dict)  # only changed ones
    names: list[KernelName] = field(default_factory=list)  # server names read in the kernel

    def changed(self) -> dict[str, int]:
        """The counters that moved, e.g. {"cnt_flow_new": 1}."""
        return {k: v for k, v in self.stats.items() if v}

    def flow(self) -> FlowCounters:
        assert len(self.flows) == 1, f"expected exactly one flow, got {self.flows}"
        return self.flows[0]

    def hello_samples(self) -> list[Sample]:
        return [s for s in self.samples if s.kind == "tls_hello"]


def _own_cgroup_id() -> int | None:
    """cgroup v2 id (inode of the directory) of this process, if cgroup2 is mounted."""
    path = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            path = line[3:]
    if path is None:
        return None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ")
        if len(fields) == 2 and fields[1].startswith("cgroup2 "):
            mount = fields[0].split()[4]
            try:
                return os.stat(mount + path).st_ino
            except OSError:
                return None
    return None


class Harness:
    """Runs frames through one Kernel; each run returns an Outcome of deltas."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.probes = kernel.probes
        self.reader = kernel.reader
        self.cgroup_id = _own_cgroup_id()
        # Start from drained state: flows taken, ring emptied, no hello being followed,
        # a fresh rate-limit window on every CPU.
        self.reader.drain_flows()
        kernel.drainer.poll()
        kernel.received.clear()
        self.probes.table("lt_hello").clear()
        self.probes.table("lt_hello_bufs").clear()
        self.reader.drain_names()
        rate = self.probes.table("lt_rate")
        rate[rate.Key(0)] = rate.Leaf()
        self._stats = self.reader.stats()
        self._totals = self.reader.totals()
        self._cgroups = self.reader.cgroup_totals()

    def run(
        self,
        frames: bytes | Iterable[bytes],
        *,
        direction: str | None = None,
        gso_segs: int = 0,
        gso_size: int = 0,
    ) -> Outcome:
        """Run every frame (no ring polling in between), then collect."""
        if isinstance(frames, bytes | bytearray):
            frames = [bytes(frames)]
        # TC tests default to egress; the XDP program is a single ingress hook
        fd = self.probes.fd(direction or ("egress" if self.kernel.mode == "tc" else "ingress"))
        retvals = [
            testrun.run_frame(fd, f, gso_segs=gso_segs, gso_size=gso_size).retval for f in frames
        ]
        return self.collect(retvals)

    def collect(self, retvals: list[int] | None = None) -> Outcome:
        self.kernel.drainer.poll()
        samples = list(self.kernel.received)
        self.kernel.received.clear()
        flows = self.reader.drain_flows()
        names = self.reader.drain_names()
        stats, totals, cgroups = (
            self.reader.stats(), self.reader.totals(), self.reader.cgroup_totals()
        )
        out = Outcome(
            retvals=retvals or [],
            flows=flows,
            samples=samples,
            stats=Counter({k: v - self._stats.get(k, 0) for k, v in stats.items()}),
            totals={
                d: (b - self._totals[d][0], p - self._totals[d][1]) for d, (b, p) in totals.items()
            },
            cgroups={
                cg: (b - self._cgroups.get(cg, (0, 0))[0], p - self._cgroups.get(cg, (0, 0))[1])
                for cg, (b, p) in cgroups.items()
                if (b, p) != self._cgroups.get(cg, (0, 0))
            },
            names=names,
        )
        self._stats, self._totals, self._cgroups = stats, totals, cgroups
        return out
