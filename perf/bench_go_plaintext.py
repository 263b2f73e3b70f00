"""Cost of Go crypto/tls plaintext inspection (issue 13.4), measured side by side.

Rows:
  selected     writes/s of a tight 4 KiB tls.Conn.Write loop in a selected Go
               process with leaktap's probes (ssl_go.bpf.c: Write after its stack
               check, Read's entry and RETs) / with a count-only uprobe at the
               same addresses, both pid-scoped (the physical floor of a uprobe;
               target >= 0.9). As for OpenSSL, the per-process budget
               (plaintext.events_per_second) means most writes take the counted,
               rate-limited path.
  unprobed     the same loop without any probe, for scale (not a target).
The writer (perf/go_writer, built here with the distribution's Go) talks TLS over
loopback TCP to a reader process of its own, both on this 2-CPU VM; rounds
alternate and medians are reported.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.commands.doctor import find_cgroup2_mount
from leaktap.controller.config import parse_config
from leaktap.controller.plaintext import golang
from leaktap.controller.plaintext.monitor import PlaintextMonitor

logger = logging.getLogger("perf.bench_go_plaintext")

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "perf" / "go_writer" / "main.go"
ROUNDS = 5
SECONDS = 2.0
CGROUP = "lt-bench-go"

COUNT_ONLY = """
BPF_PERCPU_ARRAY(calls, u64, 1);
int count_call(struct pt_regs *ctx) {
    u32 k = 0;
    u64 *v = calls.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
    return 0;
}
"""


def build_writer(tmp: Path) -> Path:
    go = shutil.which("go")
    if go is None:
        raise SystemExit("no Go toolchain: scripts/setup.sh installs golang-go")
    out = tmp / "go_writer"
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "",
           "GOCACHE": str(tmp / "gocache"), "GOPATH": str(tmp / "gopath"), "HOME": str(tmp)}
    subprocess.run([go, "build", "-o", str(out), str(SOURCE)], cwd=SOURCE.parent, env=env,
                   check=True, capture_output=True, timeout=300)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_writer(binary: Path, addr: str, cgroup: Path | None) -> subprocess.Popen[str]:
    argv = [str(binary), "write", addr, str(SECONDS)]
    if cgroup is not None:
        argv = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$@"', *argv]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def writes_per_second(p: subprocess.Popen[str]) -> float:
    out, _ = p.communicate("go\n", timeout=60)
    return int(out.strip().splitlines()[-1]) / SECONDS


def count_only_run(binary: Path, addr: str, cgroup: Path,
                   points: tuple[tuple[str, int], ...]) -> float:
    from bcc import BPF  # the count-only reference program, not leaktap's

    b = BPF(text=COUNT_ONLY.encode())
    try:
        p = start_writer(binary, addr, cgroup)
        for _label, address in points:
            b.attach_uprobe(name=str(binary).encode(), addr=address, fn_name=b"count_call",
                            pid=p.pid)
        return writes_per_second(p)
    finally:
        b.cleanup()


def wait_probed(monitor: PlaintextMonitor, pid: int, binary: Path) -> None:
    deadline = time.monotonic() + 5
    while str(binary) not in monitor.probed_pids().get(pid, []):
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid}'s Go executable was not probed within 5 s")
        time.sleep(0.01)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mount = find_cgroup2_mount()
    if os.geteuid() != 0 or mount is None:
        logger.error("needs root and a cgroup2 mount")
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="lt-bench-go-"))
    binary = build_writer(tmp)
    found = golang.inspect_go_binary(str(binary))
    if found is None or not found.inspected:
        logger.error("%s cannot be probed: %s", binary, found and found.reason)
        return 1
    cgroup = mount / CGROUP
    cgroup.mkdir(exist_ok=True)
    addr = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen([str(binary), "serve", addr], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    config = parse_config(f"""
plaintext:
  enabled: true
  select: {{cgroups: ["/{CGROUP}*"]}}
  hmac_secret_file: {tmp / 'hmac.key'}
""")
    monitor = PlaintextMonitor(config, Attributor(config, cgroup_mount=mount),
                               lambda f: None, lambda a: None)
    rows: dict[str, list[float]] = {k: [] for k in (
        "unprobed", "selected_count_only", "selected_leaktap")}
    stats: dict[str, int] = {}
    try:
        for r in range(ROUNDS):
            rows["unprobed"].append(writes_per_second(start_writer(binary, addr, None)))
            rows["selected_count_only"].append(count_only_run(binary, addr, cgroup,
                                                              found.probes))
            monitor.start()
            try:
                p = start_writer(binary, addr, cgroup)
                try:
                    wait_probed(monitor, p.pid, binary)
                except RuntimeError:
                    p.kill()
                    p.communicate()
                    raise
                rows["selected_leaktap"].append(writes_per_second(p))
                stats = monitor.kernel_stats()
            finally:
                monitor.stop()
            logger.info("round %d: %s", r + 1, {k: round(v[-1]) for k, v in rows.items()})
        logger.info("rounds: %s", {k: [round(x) for x in v] for k, v in rows.items()})
    finally:
        server.kill()
        server.wait()
        cgroup.rmdir()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    logger.info("Go %s, probes: %s", found.version, ", ".join(label for label, _ in found.probes))
    ratio = med["selected_leaktap"] / med["selected_count_only"]
    logger.info("selected Go process, writes/s leaktap / count-only uprobe: %.0f / %.0f = %.3f",
                med["selected_leaktap"], med["selected_count_only"], ratio)
    logger.info("target: leaktap / count-only >= 0.9: %s", "PASS" if ratio >= 0.9 else "MISS")
    logger.info("unprobed: %.0f writes/s (a uprobe's trap costs %.0f%% of that loop)",
                med["unprobed"], 100 * (1 - med["selected_count_only"] / med["unprobed"]))
    logger.info("last round's kernel counters: %s", {k: v for k, v in stats.items() if v})
    return 0


if __name__ == "__main__":
    sys.exit(main())
