"""`leaktap demo`: a lab of network namespaces, normal tenant traffic, then leaks.

Two tenant "inference" namespaces reach a namespace posing as Salesforce
(`<tenant>.my.salesforce.com`, a self-signed certificate and a lab-local DNS
server) through this host, which forwards between them; the agent watches the
host's CRM-facing interface, as on a gateway. Two weeks of normal minutes are
written to the demo database first (compressed history, so the baselines are
warm), live normal traffic follows, then an exfiltration burst, a canary
record, a Bulk API export and an upload to another tenant's instance. Each
alert is printed as it fires. Ctrl-C, an error or the end removes every
namespace, link, qdisc and cgroup it made. Addresses: 198.18.90.0/23.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from leaktap.controller.errors import LeaktapError
from leaktap.controller.kernel.hostfs import find_cgroup2_mount

logger = logging.getLogger(__name__)

CRM_NS, CRM_IF, CRM_HOST_IP, CRM_IP = "lt-demo-crm", "lt-dm-crm", "198.18.90.1", "198.18.90.2"
TENANTS = {  # tenant -> (namespace, host interface, host address, tenant address)
    "acme": ("lt-demo-acme", "lt-dm-acme", "198.18.91.1", "198.18.91.2"),
    "globex": ("lt-demo-globex", "lt-dm-globex", "198.18.92.1", "198.18.92.2"),
}
CANARY = "CANARY-7731-ACME-CONTACT-0042"
NORMAL_BYTES_PER_S = 50_000
BURST_FACTOR = 20
HISTORY_DAYS = 14
EXPECTED_KINDS = ("volume_anomaly", "canary_token", "bulk_export", "unsanctioned_destination")

DEMO_CONFIG = """
interfaces: [{crm_if}]
listen: 127.0.0.1:{port}
tokens: {{reader: ["{reader}"], admin: ["{admin}"]}}
storage: {{path: "{db}", retention_days: 30}}
tenants:
  - name: acme
    match: {{cgroup: "/lt-demo-acme*", cidrs: ["198.18.91.0/24"]}}
    allow: ["salesforce:acme"]
  - name: globex
    match: {{cgroup: "/lt-demo-globex*", cidrs: ["198.18.92.0/24"]}}
    allow: ["salesforce:globex"]
plaintext:
  enabled: true
  select: {{cgroups: ["/lt-demo-*-sync"]}}
  canaries: [{{token: "{canary}", tenant: acme, record: "Contact/003DEMO0042"}}]
  tenants:
    acme: {{bulk_operations: ["salesforce:bulk2.ingest"]}}
sinks:
  - {{type: file, path: "{alerts}", fsync: false}}
"""

# The CRM: TLS on 443, reading until each client closes (an `openssl s_server`
# without a terminal would close early), answering requests with 200.
CRM_SERVER = textwrap.dedent(
    """
    import socket, ssl, sys, threading
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    srv = socket.create_server((sys.argv[3], 443), backlog=64)
    def serve(conn):
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                while chunk := tls.recv(65536):
                    if b"HTTP/1.1" in chunk[:200]:
                        tls.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
        except OSError:
            pass
    print("ready", flush=True)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    """
)

# Lab DNS: every A question is answered with the CRM's address.
DNS_SERVER = textwrap.dedent(
    """
    import socket, sys
    import dpkt
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], 53))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(2048)
        q = dpkt.dns.DNS(data)
        r = dpkt.dns.DNS(id=q.id, qr=dpkt.dns.DNS_R, rd=q.rd, ra=1, qd=q.qd)
        r.an = [dpkt.dns.DNS.RR(name=x.name, type=dpkt.dns.DNS_A, cls=dpkt.dns.DNS_IN,
                                ttl=300, rdata=socket.inet_aton(sys.argv[1])) for x in q.qd]
        s.sendto(bytes(r), peer)
    """
)

# A tenant's client: resolve the CRM host through the lab DNS, then either
# stream at a rate for a while, or send one HTTP request.
CLIENT = textwrap.dedent(
    """
    import json, socket, ssl, sys, time
    import dpkt
    host, mode, arg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    q = dpkt.dns.DNS(id=7, rd=1, qd=[dpkt.dns.DNS.Q(name=host, type=dpkt.dns.DNS_A)])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        u.sendto(bytes(q), (arg["dns"], 53))
        ip = socket.inet_ntoa(dpkt.dns.DNS(u.recv(2048)).an[0].rdata)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    time.sleep(arg.get("delay", 0))
    with ctx.wrap_socket(socket.create_connection((ip, 443)), server_hostname=host) as tls:
        if mode == "stream":
            block, end = b"r" * 4096, time.monotonic() + arg["seconds"]
            tick = 0.25
            while time.monotonic() < end:
                due = time.monotonic() + tick
                for _ in range(max(1, int(arg["rate"] * tick) // len(block))):
                    tls.sendall(block)
                time.sleep(max(0.0, due - time.monotonic()))
        else:
            body = arg["body"].encode()
            head = (f"POST {arg['path']} HTTP/1.1\\r\\nHost: {host}\\r\\n"
                    "Content-Type: application/json\\r\\nAuthorization: Bearer demo-token-"
                    f"{arg['tenant']}\\r\\nContent-Length: {len(body)}\\r\\n\\r\\n").encode()
            tls.sendall(head + body)
            tls.recv(100)
    """
)


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@dataclass
class Lab:
    """The namespaces, links, routes and cgroups of the demo, and their teardown."""

    workdir: Path
    cgroup_root: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cgroups: list[Path] = field(default_factory=list)

    def build(self) -> None:
        self.teardown()  # a previous run that was killed
        pairs = [(CRM_NS, CRM_IF, CRM_HOST_IP, CRM_IP)] + list(TENANTS.values())
        for ns, host_if, host_ip, peer_ip in pairs:
            peer_if = host_if + "p"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
            _sh("ip", "link", "set", peer_if, "netns", ns)
            _sh("sysctl", "-qw", f"net.ipv6.conf.{host_if}.disable_ipv6=1")
            # forwarding on the lab's own interfaces only, never the host's uplink
            _sh("sysctl", "-qw", f"net.ipv4.conf.{host_if}.forwarding=1")
            _sh("ip", "addr", "add", f"{host_ip}/24", "dev", host_if)
            _sh("ip", "link", "set", host_if, "up")
            inns = ("ip", "netns", "exec", ns)
            _sh(*inns, "sysctl", "-qw", f"net.ipv6.conf.{peer_if}.disable_ipv6=1")
            _sh(*inns, "ip", "addr", "add", f"{peer_ip}/24", "dev", peer_if)
            _sh(*inns, "ip", "link", "set", peer_if, "up")
            _sh(*inns, "ip", "link", "set", "lo", "up")
            if ns != CRM_NS:
                _sh(*inns, "ip", "route", "add", "default", "via", host_ip)
                _sh("ip", "netns", "exec", CRM_NS, "ip", "route", "add",
                    f"{peer_ip.rsplit('.', 1)[0]}.0/24", "via", CRM_HOST_IP)
        for tenant in TENANTS:
            for suffix in ("", "-sync"):
                path = self.cgroup_root / f"lt-demo-{tenant}{suffix}"
                path.mkdir(exist_ok=True)
                self.cgroups.append(path)

    def start_servers(self) -> None:
        cert, key = self.workdir / "crm.pem", self.workdir / "crm.key"
        _sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=*.my.salesforce.com", "-keyout", str(key), "-out", str(cert))
        for script, args in ((CRM_SERVER, [str(cert), str(key), CRM_IP]),
                             (DNS_SERVER, [CRM_IP])):
            proc = subprocess.Popen(
                ["ip", "netns", "exec", CRM_NS, sys.executable, "-c", script, *args],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            self.procs.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                err = proc.stderr.read().decode() if proc.stderr is not None else ""
                raise LeaktapError(f"demo server failed: {err[-500:]}")

    def client(self, tenant: str, cgroup: str, host: str, mode: str,
               **arg: Any) -> subprocess.Popen[bytes]:
        """A client process in `tenant`'s namespace and cgroup lt-demo-<cgroup>."""
        ns = TENANTS[tenant][0]
        cg = self.cgroup_root / f"lt-demo-{cgroup}" / "cgroup.procs"
        arg = {"dns": CRM_IP, "tenant": tenant, **arg}
        proc = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {cg} && exec "$0" "$@"', "ip", "netns", "exec", ns,
             sys.executable, "-c", CLIENT, host, mode, json.dumps(arg)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    def teardown(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        self.procs.clear()
        for _ns, host_if, _h, _p in [(CRM_NS, CRM_IF, "", ""), *TENANTS.values()]:
            _sh("ip", "link", "del", host_if, check=False)
        for ns in [CRM_NS, *(v[0] for v in TENANTS.values())]:
            _sh("ip", "netns", "del", ns, check=False)
        for tenant in TENANTS:
            for suffix in ("", "-sync"):
                path = self.cgroup_root / f"lt-demo-{tenant}{suffix}"
                _empty_cgroup(path, self.cgroup_root)
                with contextlib.suppress(OSError):
                    path.rmdir()


def _empty_cgroup(path: Path, root: Path) -> None:
    """Move leftover processes (a killed run's) back to the root so rmdir works."""
    try:
        pids = (path / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in pids:
        with contextlib.suppress(OSError):
            (root / "cgroup.procs").write_text(pid)


def seed_history(store: Any, now: float, rng: random.Random) -> int:
    """Two weeks of normal minutes (daytime-shaped, ±10% noise), compressed into the DB."""
    from leaktap.controller.storage import BucketKey, Volume, minute_of

    rows = 0
    end = minute_of(now)
    for day in range(HISTORY_DAYS, 0, -1):
        buckets = {}
        for m in range(1440):
            ts = end - day * 86400 + m * 60
            for tenant in TENANTS:
                rate = NORMAL_BYTES_PER_S * 60 * rng.uniform(0.9, 1.1)
                key = BucketKey(ts, tenant, "salesforce", tenant, f"{tenant}.my.salesforce.com")
                buckets[key] = Volume(int(rate), int(rate) // 1400, int(rate) // 20, 40)
                rows += 1
        store.write(buckets, [])
    return rows


class AlertPrinter:
    """Follows the file sink and prints each alert change as it lands."""

    def __init__(self, path: Path, out: TextIO) -> None:
        self.path, self.out = path, out
        self.kinds: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="lt-demo-alerts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _follow(self) -> None:
        offset = 0
        while not self._stop.wait(0.2):
            try:
                with self.path.open() as f:
                    f.seek(offset)
                    lines = f.readlines()
                    offset = f.tell()
            except FileNotFoundError:
                continue
            for line in lines:
                self._show(json.loads(line))

    def _show(self, event: dict[str, Any]) -> None:
        alert = event.get("alert", event)
        kind = alert.get("kind", "?")
        if event.get("action", "trigger") != "trigger":
            return
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        where = ":".join(x for x in (alert.get("crm_vendor"), alert.get("crm_instance")) if x)
        self.out.write(
            f"\n  ALERT  {alert.get('severity', '?'):<8} {kind:<25} tenant={alert.get('tenant')}"
            f"  {where}\n         {alert.get('summary', '')[:160]}\n"
        )
        self.out.flush()


class Progress:
    """One status line, redrawn in place on a terminal, printed every 10 s otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last = 0.0

    def show(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\033[K" + text)
            self.out.flush()
        elif time.monotonic() - self._last >= 10:
            self._last = time.monotonic()
            self.out.write(text + "\n")
            self.out.flush()

    def done(self, text: str) -> None:
        self.out.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.out.flush()


def _wait(seconds: float, progress: Progress, label: str, agent: Any) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        out = agent.totals.get(0, (0, 0))[0]
        progress.show(f"  {label}: {left:4.0f} s left · {out / 1e6:8.2f} MB counted toward the CRM")
        time.sleep(min(0.5, left))


@contextlib.contextmanager
def _terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM cleans up like Ctrl-C."""
    def handler(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(out: TextIO = sys.stdout, port: int = 8470) -> dict[str, int]:
    """Build the lab, run the story, tear everything down; returns alert counts by kind."""
    import uvicorn

    from leaktap.controller.agent import Agent
    from leaktap.controller.api.main import create_app
    from leaktap.controller.config import parse_config
    from leaktap.controller.storage import Store

    mount = find_cgroup2_mount()
    if mount is None:
        raise LeaktapError("the demo needs a cgroup v2 mount (see `leaktap doctor`)")
    workdir = Path(tempfile.mkdtemp(prefix="leaktap-demo-"))
    lab = Lab(workdir, mount)
    reader, admin = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    alerts_path = workdir / "alerts.jsonl"
    config = parse_config(DEMO_CONFIG.format(
        crm_if=CRM_IF, port=port, reader=reader, admin=admin, db=workdir / "demo.db",
        canary=CANARY, alerts=alerts_path,
    ), "demo config")
    progress = Progress(out)
    printer = AlertPrinter(alerts_path, out)
    store = Store(workdir / "demo.db")
    agent = None
    server = None
    started = time.monotonic()
    try:
        with _terminated_as_interrupt():
            out.write("leaktap demo: building the lab (namespaces acme, globex, crm)\n")
            lab.build()
            lab.start_servers()
            rows = seed_history(store, time.time(), random.Random(7))
            out.write(f"  {HISTORY_DAYS} days of normal traffic compressed into the baseline "
                      f"({rows} minute rows)\n")
            agent = Agent(config, [CRM_IF], store, pin=False)
            agent.start()
            app = create_app(agent, readers=[reader], admins=[admin], manage=False)
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                   log_level="warning", access_log=False))
            # uvicorn installs signal handlers only from the main thread: none here
            threading.Thread(target=server.run, name="lt-demo-api", daemon=True).start()
            printer.start()
            out.write(f"  agent watching {CRM_IF}; API and dashboard: http://127.0.0.1:{port}/ "
                      f"(reader token {reader}, admin token {admin})\n")

            # normal traffic until the next minute boundary at least 30 s away
            boundary = (int(time.time()) // 60 + 1) * 60
            if boundary - time.time() < 30:
                boundary += 60
            normal_s = boundary - time.time() + 100
            for tenant in TENANTS:
                lab.client(tenant, tenant, f"{tenant}.my.salesforce.com", "stream",
                           rate=NORMAL_BYTES_PER_S, seconds=normal_s)
            _wait(boundary - time.time() + 1, progress, "normal traffic", agent)
            progress.done("  normal traffic: both tenants at their usual rate")

            out.write(f"  exfiltration: acme uploads at {BURST_FACTOR}x its usual rate\n")
            lab.client("acme", "acme", "acme.my.salesforce.com", "stream",
                       rate=NORMAL_BYTES_PER_S * BURST_FACTOR, seconds=20)
            time.sleep(2)
            out.write("  acme's CRM sync writes a record carrying a canary token\n")
            lab.client("acme", "acme-sync", "acme.my.salesforce.com", "post", delay=1.0,
                       path="/services/data/v59.0/sobjects/Contact",
                       body=json.dumps({"LastName": "Doe", "Description": CANARY}))
            out.write("  acme's CRM sync starts a Bulk API 2.0 query export\n")
            lab.client("acme", "acme-sync", "acme.my.salesforce.com", "post", delay=1.0,
                       path="/services/data/v59.0/jobs/query",
                       body=json.dumps({"operation": "query", "query": "SELECT Id FROM Contact"}))
            out.write("  globex uploads to acme's Salesforce instance\n")
            lab.client("globex", "globex", "acme.my.salesforce.com", "stream",
                       rate=NORMAL_BYTES_PER_S * 4, seconds=10)
            # the burst minute closes at the next boundary; the detector pages then
            deadline = boundary + 60 + 20
            while time.time() < deadline and not all(k in printer.kinds for k in EXPECTED_KINDS):
                _wait(1, progress, "watching for alerts", agent)
            progress.done("  done watching")
    except KeyboardInterrupt:
        out.write("\ninterrupted: cleaning up\n")
    finally:
        printer.stop()
        if server is not None:
            server.should_exit = True
        if agent is not None:
            agent.stop()
        store.close()
        lab.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
    missing = [k for k in EXPECTED_KINDS if k not in printer.kinds]
    out.write(
        f"\nalerts by kind: {json.dumps(printer.kinds, sort_keys=True)}"
        f"{'; missing: ' + ', '.join(missing) if missing else ''}\n"
        f"lab removed (namespaces, links, qdiscs, cgroups) after "
        f"{time.monotonic() - started:.0f} s\n"
    )
    return printer.kinds


def main(args: Any) -> int:
    kinds = run_demo(port=getattr(args, "port", None) or 8470)
    return 0 if all(k in kinds for k in EXPECTED_KINDS) else 1
