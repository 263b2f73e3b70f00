"""Share of ring-buffer events delivered at 50,000 new TLS flows per second.

Target (issue 3): every event delivered, or every loss counted and exported.
The agent's side runs as in production: a drain thread polls lt_events
(RingDrainer, the agent's class) and feeds the real attribution pipeline, and
the flow map is drained each second. The traffic comes from a forked child
process (its own GIL, like the kernel producer it stands for) that pushes one
ClientHello segment per new flow through lt_tc_egress with BPF_PROG_TEST_RUN,
paced at the target rate. Compares ring sizes side by side in one run.
Caveats: 2 cores shared by producer and consumer; synthetic 600-byte hellos.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from leaktap.controller.attribution.attributor import Attributor  # noqa: E402
from leaktap.controller.config import LeaktapConfig  # noqa: E402
from leaktap.controller.kernel import loader, testrun  # noqa: E402
from leaktap.controller.kernel.maps import MapReader  # noqa: E402
from leaktap.controller.kernel.ringbuf import RingDrainer  # noqa: E402
from perf.bench_hello_parse import make_hello  # noqa: E402

RATE = int(os.environ.get("BENCH_RATE", "50000"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))
RINGS = [int(x) for x in os.environ.get("BENCH_RINGS", "64,1024").split(",")]


def _checksum(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF


def hello_frame(record: bytes) -> bytearray:
    """Ethernet/IPv4/TCP frame carrying one hello; ports patched per flow."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 443, 1000, 0, 5 << 4, 0x18, 64240, 0, 0)
    total = 20 + len(tcp) + len(record)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 6, 0,
                     bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]))
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    eth = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
    return bytearray(eth + ip + tcp + record)


def push_new_flows(fd: int, frame: bytearray, rate: int = RATE,
                   seconds: float = SECONDS) -> tuple[int, float]:
    """Run `frame` through the program `fd` as rate*seconds new flows (source port and
    address varied), paced, from a forked producer (it inherits the fd) so that the
    consumer in this process has a core: (frames pushed, seconds it took)."""
    n = int(rate * seconds)
    start = time.monotonic()
    child = os.fork()
    if child == 0:
        code = 0
        try:
            for i in range(n):
                struct.pack_into("!H", frame, 34, 1024 + i % 60000)
                frame[29] = 1 + (i // 60000) % 250
                testrun.run_frame(fd, bytes(frame))
                ahead = start + (i + 1) / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        except BaseException:  # noqa: BLE001 - report through the exit code
            code = 1
        os._exit(code)
    _, status = os.waitpid(child, 0)
    if status != 0:
        raise RuntimeError(f"producer failed with status {status}")
    return n, time.monotonic() - start


def run(ring_pages: int, record: bytes) -> dict[str, float]:
    probes = loader.load("tc", loader.KernelOptions(ringbuf_pages=ring_pages))
    try:
        reader = MapReader(probes)
        attributor = Attributor(LeaktapConfig(), live=False)
        drainer = RingDrainer(probes, attributor.on_sample)
        drainer.start()
        stop = threading.Event()

        def drain_flows() -> None:
            while not stop.wait(1.0):
                reader.drain_flows()

        flows_thread = threading.Thread(target=drain_flows, daemon=True)
        flows_thread.start()
        before = reader.stats()
        n, elapsed = push_new_flows(probes.fd("egress"), hello_frame(record))
        time.sleep(0.5)
        stop.set()
        drainer.stop()
        after = reader.stats()
        d = {k: after[k] - before.get(k, 0) for k in after}
        lost = sum(v for k, v in d.items() if k.startswith("loss_"))
        return {
            "pushed": n, "rate": n / elapsed, "delivered": d["cnt_ev_hello"],
            "received": drainer.received, "lost": lost,
            "ringbuf_full": d["loss_ringbuf_full"], "rate_limited": d["loss_rate_limited"],
            "snis": attributor.hellos.stats.completed,
        }
    finally:
        probes.close()


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    record = make_hello(b"acme.my.salesforce.com", pq=False)
    out = sys.stdout
    out.write(f"new TLS flows pushed at {RATE}/s for {SECONDS:.0f} s, hello of {len(record)} B\n")
    out.write(f"{'ring pages':>10} {'pushed':>8} {'rate/s':>8} {'delivered':>9} {'received':>8} "
              f"{'lost':>7} {'ring full':>9} {'rate lim':>8} {'SNIs':>7} {'accounted':>9}\n")
    verdict = "PASS"
    for pages in RINGS:
        r = run(pages, record)
        accounted = (r["delivered"] + r["lost"]) == r["pushed"] and r["received"] == r["delivered"]
        if not accounted:
            verdict = "MISS"
        out.write(
            f"{pages:>10} {r['pushed']:>8.0f} {r['rate']:>8.0f} {r['delivered']:>9.0f} "
            f"{r['received']:>8.0f} {r['lost']:>7.0f} {r['ringbuf_full']:>9.0f} "
            f"{r['rate_limited']:>8.0f} {r['snis']:>7.0f} {str(accounted):>9}\n"
        )
        out.write(f"{'':>10} delivered share {r['delivered'] / r['pushed']:.4f}\n")
    out.write(f"target: all delivered, or every loss counted (delivered + lost == pushed): "
              f"{verdict}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
