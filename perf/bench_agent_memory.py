"""Resident memory of the agent's kernel-facing part with 100k flows, and the drain time.

Target (issue): agent RSS < 200 MB with 100,000 flows in lt_flows.
Steps, in this one process (VmRSS and the peak VmHWM from /proc/self/status):
  start     Python with leaktap's controller modules imported
  loaded    programs compiled (BCC/LLVM in-process) and loaded, flows_max=131072
  filled    100,000 distinct IPv4 TCP flows created by running 100,000 distinct
            54-byte frames through lt_tc_egress (BPF_PROG_TEST_RUN, repeat=1)
  drained   one MapReader.drain_flows(), the agent's per-second work; the
            100,000 FlowCounters are still referenced when RSS is read
  released  the drained list dropped and garbage-collected
Caveats: the kernel map memory is not in RSS (it is kernel memory, reported
separately from the map's fdinfo memlock); the API server, analytics and
ring-buffer consumer of a full agent are not loaded here; "file" is the
part of RSS backed by mapped files (mostly BCC's libLLVM/libclang), shared
with other processes and reclaimable, "anon" the process's own heap; every flow was
created on one CPU (the process is pinned), values are read for all CPUs.
"""

from __future__ import annotations

import gc
import logging
import os
import struct
import sys
import time

from leaktap.controller.kernel.loader import KernelOptions, load
from leaktap.controller.kernel.maps import MapReader
from leaktap.controller.kernel.testrun import run_frame

logger = logging.getLogger("perf.bench_agent_memory")

FLOWS = int(os.environ.get("BENCH_FLOWS", "100000"))
FLOWS_MAX = 131072
TARGET_MB = 200.0


def mem() -> tuple[float, float, float, float]:
    """(VmRSS, VmHWM, RssAnon, RssFile) in MB."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                vals[key] = int(value.split()[0]) / 1024
    return vals["VmRSS"], vals["VmHWM"], vals["RssAnon"], vals["RssFile"]


def map_memlock_mb(table: object) -> float:
    fd = table.map_fd  # type: ignore[attr-defined]
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split()[1]) / 2**20
    return 0.0


ETH = bytes.fromhex("020000000002" "020000000001" "0800")
IP_HDR = struct.Struct("!BBHHHBBH4s4s")
TCP_HDR = struct.Struct("!HHIIBBHHH")
DST = bytes([198, 18, 200, 1])


def flow_frame(n: int) -> bytes:
    """IPv4 TCP ACK without payload from 198.18.<a>.<b>:<sport> to 198.18.200.1:443."""
    src = bytes([198, 18, 1 + n // 60000 * 100 + (n // 250) % 100, 1 + n % 250])
    sport = 1024 + n % 60000
    ip = IP_HDR.pack(0x45, 0, 40, n & 0xFFFF, 0x4000, 64, 6, 0, src, DST)
    tcp = TCP_HDR.pack(sport, 443, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    return ETH + ip + tcp


def main() -> int:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})
    frames = [flow_frame(n) for n in range(FLOWS)]
    assert len({fr[26:38] for fr in frames}) == FLOWS  # distinct (src, dst, sport, dport)
    rows: list[tuple[str, float, float, float, float]] = []
    gc.collect()
    rows.append(("start", *mem()))
    probes = load("tc", KernelOptions(flows_max=FLOWS_MAX))
    try:
        gc.collect()
        rows.append(("loaded", *mem()))
        fd = probes.fd("egress")
        t = time.perf_counter()
        for fr in frames:
            run_frame(fd, fr)
        fill_s = time.perf_counter() - t
        gc.collect()
        rows.append(("filled", *mem()))
        reader = MapReader(probes)
        t = time.perf_counter()
        drained = reader.drain_flows()
        drain_s = time.perf_counter() - t
        rows.append(("drained", *mem()))
        n_drained = len(drained)
        del drained
        gc.collect()
        rows.append(("released", *mem()))
        stats = reader.stats()
        flows_kernel_mb = map_memlock_mb(probes.table("lt_flows"))
    finally:
        probes.close()

    w = sys.stdout.write
    w(f"agent memory, {FLOWS} flows, flows_max={FLOWS_MAX}, {os.cpu_count()} CPUs\n")
    w(f"{'step':10s} {'VmRSS MB':>9s} {'VmHWM MB':>9s} {'anon MB':>8s} {'file MB':>8s}\n")
    for name, rss, hwm, anon, file in rows:
        w(f"{name:10s} {rss:9.1f} {hwm:9.1f} {anon:8.1f} {file:8.1f}\n")
    w(f"fill: {FLOWS} test runs in {fill_s:.2f} s; drain: {n_drained} flows in "
      f"{drain_s * 1e3:.0f} ms ({drain_s / max(n_drained, 1) * 1e6:.2f} us/flow); "
      f"cnt_flow_new={stats['cnt_flow_new']} loss_flow_insert={stats['loss_flow_insert']}\n")
    w(f"lt_flows kernel memory (memlock, not in RSS): {flows_kernel_mb:.1f} MB\n")
    peak = max(row[2] for row in rows)
    w(f"target: RSS < {TARGET_MB:.0f} MB with {FLOWS} flows (peak VmHWM {peak:.1f} MB): "
      f"{'PASS' if peak < TARGET_MB else 'MISS'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
