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

Whole agent (issue 16.5; target: VmRSS < 128 MB with 100,000 flows drained per
second). A real `leaktap run` subprocess (API, detectors, alert pipeline, ring
and flow drains) watches one veth interface (lt-mem-h, 198.18.30.1/30; its peer
lt-mem-p in netns lt-mem-b). A forked generator opens the agent's attached
lt_tc_egress by id and runs BENCH_FLOWS distinct 54-byte frames through it every
second (BPF_PROG_TEST_RUN): every flow is new to the map once per second, so
each drain takes BENCH_FLOWS flows. After BENCH_AGENT_SECONDS of that, the
agent's /proc/<pid>/status is sampled once a second; medians and the peak are
printed, with the flow entries the agent's polls took per second
(leaktap_flow_entries_drained_total), side by side for each of BENCH_RUNS
(drain/compile pairs, default "columns/child,objects/child": the numpy drain
and the earlier object drain, LT_FLOW_DRAIN; compile "in-process" is
LT_COMPILE=in-process). BENCH_PART=kernel|agent|both. The generator and the
agent share the machine's CPUs: on 2 CPUs the generator itself may make fewer
than BENCH_FLOWS a second, which then bounds the drain rate (printed).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from leaktap.controller.kernel.loader import KernelOptions, load
from leaktap.controller.kernel.maps import MapReader
from leaktap.controller.kernel.testrun import _libbpf, _TestRunOpts, run_frame

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


# ---- whole agent ------------------------------------------------------------------

AGENT_SECONDS = int(os.environ.get("BENCH_AGENT_SECONDS", "30"))
SAMPLES = 20
AGENT_TARGET_MB = 128.0
NS, HOST_IF, PEER_IF = "lt-mem-b", "lt-mem-h", "lt-mem-p"
HOST_ADDR, PEER_ADDR = "198.18.30.1/30", "198.18.30.2/30"
PIN_ROOT = "/sys/fs/bpf/leaktap-bench-mem"
TOKEN = "bench-memory-reader-token-0123456789"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


@contextlib.contextmanager
def veth_lab() -> Iterator[None]:
    def cleanup() -> None:
        sh("ip", "link", "del", HOST_IF, check=False)
        sh("ip", "netns", "del", NS, check=False)

    cleanup()
    try:
        sh("ip", "netns", "add", NS)
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF, "netns", NS)
        sh("ip", "addr", "add", HOST_ADDR, "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        sh("ip", "-n", NS, "addr", "add", PEER_ADDR, "dev", PEER_IF)
        sh("ip", "-n", NS, "link", "set", PEER_IF, "up")
        yield
    finally:
        cleanup()


def proc_mem(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of `pid` in MB."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                vals[key] = int(value.split()[0]) / 1024
    return vals


def compiler_mappings(pid: int) -> list[str]:
    """Mapped files of `pid` that belong to BCC or LLVM/clang."""
    names = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if any(x in path.lower() for x in ("libbcc", "llvm", "clang")):
                names.add(os.path.basename(path))
    return sorted(names)


def egress_prog_id(iface: str) -> int:
    out = json.loads(sh("tc", "-j", "filter", "show", "dev", iface, "egress").stdout or "[]")
    for f in out:
        prog = (f.get("options") or {}).get("prog") or {}
        if str(prog.get("name", "")).startswith("lt_tc_egress"):
            return int(prog["id"])
    raise RuntimeError(f"no lt_tc_egress filter on {iface}: {out}")


def generate(prog_id: int, stop: Any, sent: Any) -> None:
    """Forked: every second, BENCH_FLOWS distinct flows through the agent's program."""
    lib = _libbpf()
    lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        raise OSError(-fd, f"opening program id {prog_id}")
    # one options struct, the frame's buffer swapped in: run_frame's per-call setup
    # would hold the generator below 100,000 runs a second on a shared CPU
    buffers = [ctypes.create_string_buffer(flow_frame(n), 54) for n in range(FLOWS)]
    addresses = [ctypes.addressof(b) for b in buffers]
    opts = _TestRunOpts()
    opts.sz, opts.data_size_in, opts.repeat = ctypes.sizeof(_TestRunOpts), 54, 1
    test_run, ref = lib.bpf_prog_test_run_opts, ctypes.byref(opts)
    while not stop.is_set():
        t = time.monotonic()
        for address in addresses:
            opts.data_in = address
            if test_run(fd, ref) != 0:
                raise OSError(ctypes.get_errno(), "BPF_PROG_TEST_RUN failed")
        with sent.get_lock():
            sent.value += len(addresses)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))


def scrape(port: int) -> dict[str, float]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        series, _, value = line.rpartition(" ")
        out[series] = float(value)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_agent(drain: str, compile_mode: str, workdir: str) -> dict[str, Any]:
    """One whole-agent run; returns its memory samples and drain rate."""
    port = free_port()
    config = os.path.join(workdir, f"leaktap-{drain}-{compile_mode}.yaml")
    with open(config, "w") as f:
        f.write(f"interfaces: [{HOST_IF}]\n"
                f"listen: 127.0.0.1:{port}\n"
                f"tokens: {{reader: [{TOKEN}]}}\n"
                f"storage: {{path: {workdir}/lt-{drain}-{compile_mode}.db}}\n"
                f"kernel: {{flows_max: {FLOWS_MAX * 2}, pin_root: {PIN_ROOT}}}\n")
    env = dict(os.environ, LT_COMPILE=compile_mode, LT_FLOW_DRAIN=drain)
    log = open(f"/tmp/lt-bench-mem-agent-{drain}-{compile_mode}.log", "w")  # noqa: SIM115
    agent = subprocess.Popen([sys.executable, "-m", "leaktap.controller.commands.cli", "-v", "run",
                              "--config", config], env=env, stdout=subprocess.DEVNULL,
                             stderr=log)
    ctx = multiprocessing.get_context("fork")
    stop, sent = ctx.Event(), ctx.Value("q", 0)
    gen = None
    samples: list[dict[str, float]] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            if agent.poll() is not None:
                raise RuntimeError(f"agent exited {agent.returncode} (log in {workdir})")
            try:
                scrape(port)
                egress_prog_id(HOST_IF)
                break
            except (OSError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        started = proc_mem(agent.pid)
        gen = ctx.Process(target=generate, args=(egress_prog_id(HOST_IF), stop, sent))
        gen.start()
        gen_started = time.monotonic()
        time.sleep(AGENT_SECONDS)
        first = scrape(port)
        t0 = time.monotonic()
        for _ in range(SAMPLES):
            time.sleep(1)
            samples.append(proc_mem(agent.pid))
        last = scrape(port)
        elapsed = time.monotonic() - t0
        mappings = compiler_mappings(agent.pid)
    finally:
        stop.set()
        if gen is not None:
            gen.join(timeout=10)
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
        shutil.rmtree(PIN_ROOT, ignore_errors=True)
    # every flow has a packet each generator round: entries the polls took per second
    # is the drain rate while the agent keeps up (a flow drained once per round)
    drained_total = "leaktap_flow_entries_drained_total"
    drained = (last.get(drained_total, 0.0) - first.get(drained_total, 0.0)) / elapsed
    return {
        "mode": f"{drain}/{compile_mode}", "drain": drain, "started": started, "samples": samples,
        "drained_per_s": drained, "sent": sent.value, "mappings": mappings,
        "conversations": last.get("leaktap_conversations", 0.0),
        "generated_per_s": sent.value / max(time.monotonic() - gen_started, 1e-9),
    }


def whole_agent() -> bool:
    w = sys.stdout.write
    results = []
    runs = [r.split("/") for r in os.environ.get("BENCH_RUNS", "columns/child,objects/child")
            .split(",")]
    with veth_lab(), tempfile.TemporaryDirectory(prefix="lt-bench-mem-") as workdir:
        for drain, compile_mode in runs:
            results.append(run_agent(drain, compile_mode, workdir))
    w(f"\nwhole agent (`leaktap run`, API + detectors + drains, one veth), {FLOWS} flows "
      f"per second for {AGENT_SECONDS} s, then {SAMPLES} samples; {os.cpu_count()} CPUs\n")
    w(f"{'drain/compile':15s} {'idle RSS':>8s} {'VmRSS':>7s} {'anon':>6s} {'file':>6s} "
      f"{'VmHWM':>7s} {'made/s':>7s} {'drained/s':>10s} {'convs':>7s}  memory  drain   "
      "compiler mapped\n")
    ok = True
    for r in results:
        med = {k: statistics.median(s[k] for s in r["samples"]) for k in r["samples"][0]}
        peak = max(s["VmHWM"] for s in r["samples"])
        # the drain keeps up when it takes what the generator makes (it cannot take more)
        mem_ok = med["VmRSS"] < AGENT_TARGET_MB and peak < AGENT_TARGET_MB
        drain_ok = r["drained_per_s"] >= min(FLOWS, 0.95 * r["generated_per_s"])
        w(f"{r['mode']:15s} {r['started']['VmRSS']:8.1f} {med['VmRSS']:7.1f} "
          f"{med['RssAnon']:6.1f} {med['RssFile']:6.1f} {peak:7.1f} {r['generated_per_s']:7.0f} "
          f"{r['drained_per_s']:10.0f} {r['conversations']:7.0f}  "
          f"{'PASS' if mem_ok else 'MISS':6s}  {'PASS' if drain_ok else 'MISS':6s}  "
          f"{', '.join(r['mappings']) or 'none'}\n")
        if r["drain"] == "columns":
            ok = ok and mem_ok and drain_ok
    w("(MB; VmRSS/anon/file: medians of the samples; VmHWM: the peak since start; made/s: "
      "flows the generator ran per second; drained/s: flow entries the agent's polls took "
      "per second; columns: the numpy drain, objects: the earlier one (LT_FLOW_DRAIN))\n")
    w(f"targets: VmRSS median and peak < {AGENT_TARGET_MB:.0f} MB; drained/s >= "
      f"min({FLOWS}, 95% of made/s); columns drain: {'PASS' if ok else 'MISS'}\n")
    if any(r["generated_per_s"] < 0.95 * FLOWS for r in results):
        w(f"(the generator made fewer than {FLOWS} flows/s on this machine: the drain rate "
          "is bounded by what it makes)\n")
    return ok

if __name__ == "__main__":
    part = os.environ.get("BENCH_PART", "both")
    if part in ("kernel", "both"):
        main()
    if part in ("agent", "both"):
        whole_agent()
    sys.exit(0)
