"""API latency at 200 requests/s, idle vs. while the agent counts an iperf3 stream,
and outbox throughput to local receivers.

Targets (issue 5): throughput under load >= 0.9 x idle, p99 < 50 ms, for
GET /v1/alerts and GET /v1/flows; outbox alerts/s is reported only.

Setup (created here, removed in `finally` whatever happens):
  host namespace   lt-api-h  198.18.44.1/30   the agent (its TC programs attached
                                               here, maps not pinned) + iperf3 client
  netns lt-api-b   lt-api-p  198.18.44.2/30   iperf3 server
The agent is a real Agent with the real uvicorn server on 127.0.0.1, run in its own
process on a database populated beforehand (BENCH_FLOWS flows, BENCH_ALERTS alerts);
it polls the kernel maps each second as in production. Without root or bcc, the
same API is served without probes and a CPU burner per core stands in for iperf3
(marked `(no lab)`). Load: an open-loop schedule at RATE requests/s (latency counted
from the scheduled send time, so a stall is not hidden by the client waiting);
rounds alternate idle and loaded, BENCH_SECONDS each per endpoint; medians reported.
BENCH_NO_CACHE=1 serves every /v1/alerts page from the database (no response cache).
Caveats: 2 shared cores run the agent, iperf3 (client, server, softirq) and this
load generator; one keep-alive connection per client thread (16), opened before
the clock starts; /v1/alerts pages are served from a cache that any commit to the
database invalidates (the agent commits each second), /v1/flows pages are not.
Usage: python perf/bench_api.py
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from leaktap.analytics.alert_settings import OutboxSettings
from leaktap.analytics.alerts import AlertManager, Finding, SinkRoute
from leaktap.analytics.outbox import OutboxDispatcher
from leaktap.analytics.sinks.file import FileSettings, FileSink
from leaktap.analytics.sinks.webhook import WebhookSettings, WebhookSink
from leaktap.controller.storage import Store

logger = logging.getLogger("perf.bench_api")

NS, HOST_IF, PEER_IF = "lt-api-b", "lt-api-h", "lt-api-p"
HOST_ADDR, PEER_ADDR = "198.18.44.1", "198.18.44.2"
IPERF_PORT = 5201
RATE = 200
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
N_FLOWS = int(os.environ.get("BENCH_FLOWS", "20000"))
N_ALERTS = int(os.environ.get("BENCH_ALERTS", "2000"))
N_OUTBOX = int(os.environ.get("BENCH_OUTBOX", "2000"))
TOKEN = "bench-reader-token-0123456789"
P99_TARGET_MS, RATIO_TARGET = 50.0, 0.9
ENDPOINTS = ("/v1/alerts", "/v1/flows")


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the lab ----------------------------------------------------------------------------


def lab_available() -> bool:
    if os.geteuid() != 0 or not Path("/sys/kernel/btf/vmlinux").exists():
        return False
    try:
        import bcc  # noqa: F401
    except ImportError:
        return False
    return sh("which", "iperf3", check=False).returncode == 0


def lab_cleanup() -> None:
    sh("ip", "link", "del", HOST_IF, check=False)  # removes the peer too
    sh("ip", "netns", "del", NS, check=False)


@contextlib.contextmanager
def veth_lab() -> Iterator[subprocess.Popen[bytes]]:
    """The veth pair and an iperf3 server in the namespace."""
    lab_cleanup()  # leftovers of an interrupted run (our names only)
    server = None
    try:
        sh("ip", "netns", "add", NS)
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF, "netns", NS)
        sh("ip", "addr", "add", HOST_ADDR + "/30", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        sh("ip", "-n", NS, "addr", "add", PEER_ADDR + "/30", "dev", PEER_IF)
        sh("ip", "-n", NS, "link", "set", PEER_IF, "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", NS, "iperf3", "-s", "-B", PEER_ADDR, "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        yield server
    finally:
        if server is not None:
            server.kill()
            server.wait()
        lab_cleanup()


@contextlib.contextmanager
def background_load(lab: bool) -> Iterator[None]:
    """An iperf3 stream through the watched veth, or CPU burners without a lab."""
    if lab:
        proc = subprocess.Popen(
            ["iperf3", "-c", PEER_ADDR, "-p", str(IPERF_PORT), "-t", "3600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # past slow start
        try:
            yield
        finally:
            proc.terminate()
            proc.wait()
        return
    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=_burn, args=(stop,), daemon=True)
               for _ in range(os.cpu_count() or 1)]
    for b in burners:
        b.start()
    try:
        yield
    finally:
        stop.set()
        for b in burners:
            b.join()


def _burn(stop: multiprocessing.synchronize.Event) -> None:
    x = 0
    while not stop.is_set():
        for i in range(100_000):
            x ^= i


# -- the database and the server ----------------------------------------------------------


def populate(db: Path) -> None:
    store = Store(db)
    now = time.time()
    for start in range(0, N_FLOWS, 1000):
        flows = []
        for n in range(start, min(start + 1000, N_FLOWS)):
            tenant = f"tenant{n % 20}"
            flows.append({
                "id": None, "family": 4, "proto": "tcp", "src": "198.18.44.1",
                "sport": 10000 + n % 50000, "dst": f"198.18.45.{n % 250 + 1}", "dport": 443,
                "sni": f"{tenant}.my.salesforce.com", "dns_names": [f"{tenant}.my.salesforce.com"],
                "crm_vendor": "salesforce", "crm_instance": tenant, "tenant": tenant,
                "cgroup": f"/tenants/{tenant}", "uid": 1000 + n % 20, "bytes_out": 4096 + n,
                "packets_out": 4, "bytes_in": 8192, "packets_in": 6,
                "first_seen": now - 86400 + n * 86400 / N_FLOWS, "last_seen": now - n % 3600,
                "flags_out": 5, "flags_in": 6,
            })
        store.write({}, flows)
    store.close()
    alerts = AlertManager(db, [SinkRoute("webhook")])
    kinds = ("volume_anomaly", "unsanctioned_destination", "new_destination", "canary_token")
    for n in range(N_ALERTS):
        alerts.record(Finding(kind=kinds[n % 4], tenant=f"tenant{n % 20}", severity="high",
                              summary=f"bench alert {n}", crm_vendor="salesforce",
                              crm_instance=f"other{n}", ts=now - n,
                              evidence={"bytes_out": n * 1000, "snippet": "[REDACTED]"}))
    alerts.close()


AGENT_SERVER = textwrap.dedent(
    """
    import logging, os, sys
    from leaktap.controller.agent import Agent, api_server
    from leaktap.controller.api.cache import ResponseCache
    from leaktap.controller.api.main import create_app
    from leaktap.controller.config import parse_config
    from leaktap.controller.storage import Store
    logging.basicConfig(level=logging.WARNING)
    db, iface, port, token = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    store = Store(db)
    config = parse_config("tenants: [{name: tenant0, match: {cidrs: ['198.18.44.1/32']}}]")
    agent = Agent(config, [iface], store, pin=False)
    app = create_app(agent, readers=[token], admins=[])
    if os.environ.get("BENCH_NO_CACHE"):
        app.state.response_cache = ResponseCache(max_entries=0)
    api_server(app, "127.0.0.1", port, None).run()
    store.close()
    """
)

API_ONLY_SERVER = textwrap.dedent(
    """
    import os, sys
    from types import SimpleNamespace
    from leaktap.analytics.alerts import AlertManager
    from leaktap.controller.api.cache import ResponseCache
    from leaktap.controller.agent import api_server
    from leaktap.controller.api.main import create_app
    from leaktap.controller.storage import Store
    db, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = Store(db)
    agent = SimpleNamespace(store=store, alerts=AlertManager(db),
                            flow_records=lambda **f: store.flows(**f))
    app = create_app(agent, readers=[token], admins=[], manage=False)
    if os.environ.get("BENCH_NO_CACHE"):
        app.state.response_cache = ResponseCache(max_entries=0)
    api_server(app, "127.0.0.1", port, None).run()
    """
)


@contextlib.contextmanager
def api_process(db: Path, lab: bool) -> Iterator[str]:
    port = free_port()
    if lab:
        cmd = [sys.executable, "-c", AGENT_SERVER, str(db), HOST_IF, str(port), TOKEN]
    else:
        cmd = [sys.executable, "-c", API_ONLY_SERVER, str(db), str(port), TOKEN]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                detail = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"the API server exited: {detail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the API server did not start within 60 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- open-loop load -------------------------------------------------------------------------


def open_loop(url: str, rate: float, seconds: float, workers: int = 16) -> dict[str, float]:
    """GET url at `rate`/s on schedule; latency from the scheduled time to the answer."""
    schedule: queue.Queue[float | None] = queue.Queue()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    # connections are opened and used once before the clock starts: the schedule
    # measures the server, not TCP handshakes and thread start-up
    ready = threading.Barrier(workers + 1)

    def worker() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as client:
            client.get(url)
            ready.wait()
            while (due := schedule.get()) is not None:
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                try:
                    ok = client.get(url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                done = time.perf_counter()
                with lock:
                    if ok:
                        latencies.append(done - due)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter() + 0.05
    n = int(rate * seconds)
    for i in range(n):
        schedule.put(start + i / rate)
    for _ in threads:
        schedule.put(None)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "throughput": len(latencies) / max(elapsed, seconds),
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan"),
        "errors": errors[0],
    }


def bench_api(lab: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        t0 = time.perf_counter()
        populate(db)
        out(f"database: {N_FLOWS} flows, {N_ALERTS} alerts in {time.perf_counter() - t0:.1f} s")
        with contextlib.ExitStack() as stack:
            if lab:
                stack.enter_context(veth_lab())
            base = stack.enter_context(api_process(db, lab))
            for path in ENDPOINTS:  # warm-up: caches, first-request costs
                open_loop(base + path, RATE, 1.0)
            results: dict[tuple[str, str], list[dict[str, float]]] = {}
            for r in range(ROUNDS):
                for condition in (("idle", "loaded") if r % 2 == 0 else ("loaded", "idle")):
                    load = background_load(lab) if condition == "loaded" else None
                    with load or contextlib.nullcontext():
                        for path in ENDPOINTS:
                            results.setdefault((path, condition), []).append(
                                open_loop(base + path, RATE, SECONDS))
    label = "iperf3 through the watched veth" if lab else "CPU burners (no lab)"
    if os.environ.get("BENCH_NO_CACHE"):
        label += "; alert pages not cached"
    out(f"\nAPI at {RATE} req/s, {ROUNDS} rounds x {SECONDS:.0f} s, loaded = {label}")
    out(f"{'endpoint':<12} {'condition':<8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    verdicts = []
    for path in ENDPOINTS:
        med = {}
        for condition in ("idle", "loaded"):
            runs = results[(path, condition)]
            med[condition] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            m = med[condition]
            out(f"{path:<12} {condition:<8} {m['throughput']:>8.1f} {m['p50_ms']:>8.2f} "
                f"{m['p99_ms']:>8.2f} {int(m['errors']):>7}")
        ratio = med["loaded"]["throughput"] / med["idle"]["throughput"]
        p99 = med["loaded"]["p99_ms"]
        ok = ratio >= RATIO_TARGET and p99 < P99_TARGET_MS
        verdicts.append(ok)
        out(f"{path:<12} loaded/idle throughput {ratio:.3f}, loaded p99 {p99:.1f} ms, "
            f"p99 loaded/idle {p99 / med['idle']['p99_ms']:.2f}")
    out(f"target: throughput >= {RATIO_TARGET} x idle and p99 < {P99_TARGET_MS:.0f} ms: "
        f"{'PASS' if all(verdicts) else 'MISS'}{'' if lab else ' (no lab)'}")


# -- outbox throughput ----------------------------------------------------------------------

RECEIVER = textwrap.dedent(
    """
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    sys.stdout.write(f"{srv.server_address[1]}\\n")
    sys.stdout.flush()
    srv.serve_forever()
    """
)


@contextlib.contextmanager
def webhook_receiver() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}/hook"
    finally:
        proc.kill()
        proc.wait()


def bench_outbox() -> None:
    out(f"\noutbox: {N_OUTBOX} new alerts recorded back to back, then delivered")
    out(f"{'sink':<22} {'record/s':>9} {'delivered/s':>12} {'end-to-end/s':>13}")
    with webhook_receiver() as url, tempfile.TemporaryDirectory() as tmp:
        sinks = {
            "webhook (HMAC)": lambda: WebhookSink(WebhookSettings(
                type="webhook", url=url, secret="bench-secret-0123456789")),
            "file (fsync)": lambda: FileSink(FileSettings(
                type="file", path=str(Path(tmp) / "alerts.jsonl"), max_bytes=2**30)),
        }
        for label, make in sinks.items():
            db = Path(tmp) / f"{label.split()[0]}.db"
            Store(db).close()
            sink = make()
            outbox = OutboxDispatcher(db, [sink], OutboxSettings())
            alerts = AlertManager(db, [SinkRoute(sink.name)], on_change=outbox.notify)
            outbox.start()
            t0 = time.perf_counter()
            for n in range(N_OUTBOX):
                alerts.record(Finding(kind="unsanctioned_destination", tenant=f"t{n}",
                                      severity="high", summary=f"alert {n}", ts=time.time()))
            t1 = time.perf_counter()
            delivered_at_t1 = outbox.deliveries[(sink.name, "delivered")]
            if not outbox.wait_idle(300):
                raise RuntimeError(f"{label}: outbox not drained in 300 s")
            t2 = time.perf_counter()
            outbox.stop()
            alerts.close()
            drain_rate = (N_OUTBOX - delivered_at_t1) / max(t2 - t1, 1e-9)
            out(f"{label:<22} {N_OUTBOX / (t1 - t0):>9.0f} {drain_rate:>12.0f} "
                f"{N_OUTBOX / (t2 - t0):>13.0f}")
    out("(record/s: alerts committed with their outbox entry; delivered/s: the dispatcher "
        "after recording stopped)")


def main() -> int:
    logging.basicConfig(level=logging.ERROR)
    lab = lab_available()
    if not lab:
        out("no root/BTF/bcc/iperf3: serving the API without probes, CPU burners as load")
    bench_api(lab)
    bench_outbox()
    return 0


if __name__ == "__main__":
    sys.exit(main())
