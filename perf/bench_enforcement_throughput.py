"""Sanctioned traffic with enforcement on / off: iperf3 TCP across a veth pair (issue 12).

Target: throughput with a block-mode policy >= 0.97 x with enforcement off, for
traffic the policy allows. Both sides run the same attached TC programs (the
monitor counts either way); what differs is the policy in their maps (a block
tenant owning the client's cgroup, its allow list, the CRM addresses — or no
enforcing tenant at all) and the connect programs on the cgroup root (attached
with the tenant's cgroup mapped, or not at all). The client (iperf3) runs in the
tenant's cgroup; its connect() is judged and let through, and its data packets
go through the verdict path for a flow already judged.

Setup (created here, removed on exit):
  host namespace   lt-enfp-h  198.18.11.1/30   iperf3 client in cgroup lt-enfp-blk
  netns lt-enfp-b  lt-enfp-p  198.18.11.2/30   iperf3 server
Rounds alternate on/off (order flipping each round), one iperf3 run of
BENCH_SECONDS (+1 s omitted warm-up) each; medians reported. Same caveats as
bench_veth_throughput.py (one stream, TSO/GSO super-packets, shared CPUs).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from leaktap.controller.attribution.catalogue import CrmCatalogue
from leaktap.controller.config import parse_config
from leaktap.controller.enforcement.connect_guard import ConnectGuard
from leaktap.controller.enforcement.kernel_policy import KernelPolicy, set_crm_addresses
from leaktap.controller.kernel import loader
from leaktap.controller.kernel.cgroups import cgroup_dirs
from leaktap.controller.kernel.hostfs import find_cgroup2_mount

NS, HOST_IF, PEER_IF = "lt-enfp-b", "lt-enfp-h", "lt-enfp-p"
HOST_ADDR, PEER_ADDR = "198.18.11.1/30", "198.18.11.2"
CGROUP = "lt-enfp-blk"
PORT = 5201
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
TARGET = 0.97

ON = f"""
tenants:
  - name: blk
    match: {{cgroup: "/{CGROUP}*"}}
    allow: ["salesforce:acme"]
    enforce: block
"""
OFF = ON.replace("enforce: block", "enforce: monitor")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def cleanup() -> None:
    sh("ip", "link", "del", HOST_IF, check=False)
    sh("ip", "netns", "del", NS, check=False)


def setup() -> None:
    cleanup()
    sh("ip", "netns", "add", NS)
    sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF, "netns", NS)
    sh("ip", "addr", "add", HOST_ADDR, "dev", HOST_IF)
    sh("ip", "link", "set", HOST_IF, "up")
    sh("ip", "-n", NS, "link", "set", "lo", "up")
    sh("ip", "-n", NS, "addr", "add", PEER_ADDR + "/30", "dev", PEER_IF)
    sh("ip", "-n", NS, "link", "set", PEER_IF, "up")


def iperf(cgroup: Path, seconds: int) -> float:
    """Gbit/s received by the server over one client run from the tenant's cgroup."""
    script = f'echo $$ > {cgroup}/cgroup.procs && exec "$@"'
    r = sh("sh", "-c", script, "sh", "iperf3", "-c", PEER_ADDR, "-p", str(PORT),
           "-t", str(seconds), "-O", "1", "-J", check=False)
    out = json.loads(r.stdout or "{}")
    if "error" in out or r.returncode:
        raise RuntimeError(f"iperf3 failed: {out.get('error') or r.stderr.strip()}")
    return float(out["end"]["sum_received"]["bits_per_second"]) / 1e9


def apply_policy(probes: Any, text: str, mount: Path) -> bool:
    """The TC verdict's policy for `text`; False when this build has no hello verdict."""
    config = parse_config(text)
    try:
        KernelPolicy.from_config(config, CrmCatalogue(config.catalogue)).apply(
            probes, dict(cgroup_dirs(mount)))
        set_crm_addresses(probes, {PEER_ADDR})  # the server poses as a CRM address
    except NotImplementedError:
        return False
    return True


def main() -> int:
    mount = find_cgroup2_mount()
    if mount is None:
        sys.stderr.write("no cgroup2 mount\n")
        return 2
    cgroup = mount / CGROUP
    server: subprocess.Popen[bytes] | None = None
    probes: Any = None
    guard: ConnectGuard | None = None
    results: dict[str, list[float]] = {"off": [], "on": []}
    hello_verdict = False
    try:
        setup()
        cgroup.mkdir(exist_ok=True)
        server = subprocess.Popen(
            ["ip", "netns", "exec", NS, "iperf3", "-s", "-B", PEER_ADDR, "-p", str(PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(50):
            if sh("ip", "netns", "exec", NS, "ss", "-Hltn", f"sport = :{PORT}").stdout.strip():
                break
            time.sleep(0.1)
        probes = loader.load("tc")
        hello_verdict = apply_policy(probes, OFF, mount)
        loader.attach_tc(probes, HOST_IF)
        guard = ConnectGuard(mount, lambda e: None)
        guard.load(str(loader.PIN_ROOT))
        iperf(cgroup, 1)  # warm-up
        for rnd in range(ROUNDS):
            order = ["off", "on"] if rnd % 2 == 0 else ["on", "off"]
            for label in order:
                if label == "on":
                    apply_policy(probes, ON, mount)
                    guard.set_tenants({cgroup.stat().st_ino: (1, "block")}, {})
                    guard.attach()
                try:
                    results[label].append(iperf(cgroup, SECONDS))
                finally:
                    if label == "on":
                        guard.close()
                        guard = ConnectGuard(mount, lambda e: None)
                        guard.load(str(loader.PIN_ROOT))
                        apply_policy(probes, OFF, mount)
    finally:
        if guard is not None:
            guard.close()
        if probes is not None:
            with contextlib.suppress(Exception):
                loader.detach_tc(HOST_IF)
            probes.close()
        if server is not None:
            server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=5)
            if server.poll() is None:
                server.kill()
        cleanup()
        with contextlib.suppress(OSError):
            cgroup.rmdir()

    w = sys.stdout.write
    w(f"iperf3 TCP, 1 stream, from cgroup {CGROUP} (tenant blk) to netns {NS}, {ROUNDS} "
      f"alternating rounds of {SECONDS} s; TC programs attached on both sides\n")
    w("on: block policy for blk (allowed traffic) + connect programs; off: no enforcing "
      f"tenant, no connect programs; hello verdict in this build: {hello_verdict}\n")
    w(f"{'round':>5s} {'off Gbit/s':>11s} {'on Gbit/s':>10s} {'ratio':>6s}\n")
    pairs = list(zip(results["off"], results["on"], strict=True))
    for i, (a, b) in enumerate(pairs):
        w(f"{i + 1:5d} {a:11.2f} {b:10.2f} {b / a:6.3f}\n")
    m_off, m_on = statistics.median(results["off"]), statistics.median(results["on"])
    ratio = m_on / m_off
    w(f"{'med':>5s} {m_off:11.2f} {m_on:10.2f} {ratio:6.3f}   (median of per-round ratios "
      f"{statistics.median(b / a for a, b in pairs):.3f})\n")
    lo, hi = min(results["off"]), max(results["off"])
    spread = (hi - lo) / m_off
    w(f"noise: 'off' runs span {lo:.2f}..{hi:.2f} Gbit/s ({spread:.0%} of the median)\n")
    w(f"target: on/off >= {TARGET}: {'PASS' if ratio >= TARGET else 'MISS'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
