"""End to end (issue 12.6): enforcement in the veth lab with the real agent.

Three tenants, each a cgroup (block, dry-run, monitor), all allowed salesforce:acme
only. Their processes resolve CRM instance names through the lab's DNS server and
upload over real TLS to servers in the CRM namespace (acme at .2, globex at .3;
each server counts the application bytes it receives per connection).

- connect-time refusal: once DNS named .3 only for globex, the block tenant's
  connect() fails with EPERM before a SYN leaves (the globex server sees no
  connection), the dry-run tenant's upload completes and is recorded as one would_block
  (the connect-time decision, its hello's report folded in),
  the monitor tenant's completes and pages as observed;
- the hello verdict: the block tenant connects to acme's address (.2, shared with
  nothing refused) naming globex in its ClientHello: the server receives no
  application byte and the client errors within 2 s (its socket destroyed);
- a reload that adds globex to the block tenant's allow list lets the next
  connection through; a bad file is refused with its FILE:LINE error and the
  running policy kept;
- metrics and audit list exactly these decisions.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from leaktap.controller.agent import Agent
from leaktap.controller.api.main import create_app
from leaktap.controller.config import load_config
from leaktap.controller.kernel.hostfs import find_cgroup2_mount
from leaktap.controller.storage import Store
from tests.netlab import make_cert, sh, veth_lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

HOST, ACME, GLOBEX = "198.18.70.1", "198.18.70.2", "198.18.70.3"
ACME_NAME, GLOBEX_NAME = "acme.my.salesforce.com", "globex.my.salesforce.com"
UPLOAD = 200_003  # odd on purpose: byte-exact at the server
TOKEN = "enforcement-admin-token-0123456789"
CGROUPS = {"blk": "lt-enf-blk", "dry": "lt-enf-dry", "mon": "lt-enf-mon"}


def config_text(blk_allow: str) -> str:
    return textwrap.dedent(f"""\
        tenants:
          - name: blk
            match: {{cgroup: "/{CGROUPS['blk']}*"}}
            allow: [{blk_allow}]
            enforce: block
          - name: dry
            match: {{cgroup: "/{CGROUPS['dry']}*"}}
            allow: ["salesforce:acme"]
            enforce: dry-run
          - name: mon
            match: {{cgroup: "/{CGROUPS['mon']}*"}}
            allow: ["salesforce:acme"]
        """)


# In the CRM namespace: a DNS server (acme -> .2, globex -> .3) and a TLS server on
# both addresses that logs, per connection, "address sni application-bytes".
SERVERS = textwrap.dedent(
    """
    import socket, ssl, sys, threading
    cert, key, log, dns_ip, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    answers = dict(n.split("=") for n in names)
    lock = threading.Lock()

    def dns():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((dns_ip, 53))
        while True:
            q, peer = s.recvfrom(512)
            labels, i = [], 12
            while q[i]:
                labels.append(q[i + 1 : i + 1 + q[i]].decode()); i += 1 + q[i]
            question = q[12 : i + 5]
            ip = answers.get(".".join(labels))
            head = q[:2] + (b"\\x81\\x80" if ip else b"\\x81\\x83") + b"\\x00\\x01"
            head += (b"\\x00\\x01" if ip else b"\\x00\\x00") + b"\\x00\\x00\\x00\\x00"
            rr = b"\\xc0\\x0c\\x00\\x01\\x00\\x01\\x00\\x00\\x01\\x2c\\x00\\x04" + (
                socket.inet_aton(ip) if ip else b"")
            s.sendto(head + question + (rr if ip else b""), peer)

    def serve(addr):
        srv = socket.create_server((addr, 443))
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=handle, args=(addr, conn), daemon=True).start()

    def handle(addr, conn):
        seen = {"sni": None}
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.sni_callback = lambda s, name, c: seen.__setitem__("sni", name)
        got = 0
        try:
            conn.settimeout(15)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                want = None
                buf = b""
                while chunk := tls.recv(65536):
                    got += len(chunk)
                    buf += chunk if want is None else b""
                    if want is None and len(buf) >= 8:
                        want = int.from_bytes(buf[:8], "big")
                    if want is not None and got - 8 >= want:
                        tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass
        with lock, open(log, "a") as f:
            f.write(f"{addr} {seen['sni']} {got}\\n")

    threading.Thread(target=dns, daemon=True).start()
    for a in answers.values():
        threading.Thread(target=serve, args=(a,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
    """
)

# A tenant's process: resolve (unless given an address), connect, TLS upload.
CLIENT = textwrap.dedent(
    """
    import json, os, socket, ssl, sys, time
    dns_ip, name, addr, nbytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    out = {}
    if not addr:
        q = os.urandom(2) + b"\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00"
        q += b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
        q += b"\\x00\\x00\\x01\\x00\\x01"
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(q, (dns_ip, 53))
        a = s.recv(512)
        addr = socket.inet_ntoa(a[-4:])
    out["addr"] = addr
    if nbytes >= 0:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        started = time.monotonic()
        try:
            raw = socket.create_connection((addr, 443), timeout=20)
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                tls.sendall(nbytes.to_bytes(8, "big") + b"x" * nbytes)
                out["result"] = "ok" if tls.recv(2) == b"ok" else "no answer"
        except OSError as e:
            out["result"] = f"errno {e.errno}" if e.errno else type(e).__name__
        out["elapsed_s"] = time.monotonic() - started
    print(json.dumps(out))
    """
)


@contextlib.contextmanager
def tenant_cgroups() -> Iterator[dict[str, Path]]:
    mount = find_cgroup2_mount()
    assert mount is not None, "no cgroup2 mount"
    made = {tenant: mount / name for tenant, name in CGROUPS.items()}
    for path in made.values():
        path.mkdir(exist_ok=True)
    try:
        yield made
    finally:
        for path in made.values():
            for _ in range(100):
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


def run_client(cgroup: Path, name: str, addr: str = "", nbytes: int = UPLOAD) -> dict[str, Any]:
    """The client, as a member of `cgroup` (the shell joins it, then becomes python)."""
    script = f'echo $$ > {cgroup}/cgroup.procs && exec "$0" -c "$@"'
    done = subprocess.run(["sh", "-c", script, sys.executable, CLIENT, ACME, name, addr,
                           str(nbytes)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def server_log(path: Path) -> list[tuple[str, str, int]]:
    if not path.exists():
        return []
    return [(a, s, int(n)) for a, s, n in (ln.split() for ln in path.read_text().splitlines())]


def wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def alerts_by_tenant(agent: Agent) -> dict[str, dict[str, Any]]:
    assert agent.alerts is not None
    rows = agent.alerts.db.query(
        "SELECT tenant, crm_instance, evidence FROM alerts WHERE kind = ?",
        ("unsanctioned_destination",))
    return {r["tenant"]: {"instance": r["crm_instance"], **json.loads(r["evidence"])}
            for r in rows}


@contextlib.contextmanager
def crm_lab(tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    cert, key = make_cert(tmp_path, "crm.test")
    log = tmp_path / "server.log"
    with veth_lab("lt-enf", HOST, ACME, prefix=29) as lab:
        sh(*lab.in_ns("ip", "addr", "add", f"{GLOBEX}/29", "dev", "lt-enf-p"))
        proc = subprocess.Popen(
            lab.in_ns(sys.executable, "-c", SERVERS, str(cert), str(key), str(log), ACME,
                      f"{ACME_NAME}={ACME}", f"{GLOBEX_NAME}={GLOBEX}"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            yield lab, log
        finally:
            proc.kill()
            proc.wait()


def test_enforcement_block_dry_run_monitor_reload(tmp_path: Path) -> None:
    config_path = tmp_path / "leaktap.yaml"
    config_path.write_text(config_text('"salesforce:acme"'))
    store = Store(tmp_path / "lt.db")
    try:
        with tenant_cgroups() as cg, crm_lab(tmp_path) as (lab, log):
            agent = Agent(load_config(config_path), [lab.host_if], store, pin=False)
            agent.config_path = str(config_path)
            agent.start()
            try:
                client = TestClient(create_app(agent, [], [TOKEN], manage=False))
                auth = {"Authorization": f"Bearer {TOKEN}"}
                ready = wait_for(lambda: (r := client.get("/readyz", headers=auth)).status_code
                                 == 200 and r.json())
                assert ready["enforcement"]["state"] == "block", ready
                assert (ready["enforcement"]["block_tenants"],
                        ready["enforcement"]["dry_run_tenants"]) == (["blk"], ["dry"])
                assert ready["enforcement"]["connect_refusal"] is True

                # DNS teaches the agent that .3 is globex only: refused to blk and dry
                assert run_client(cg["blk"], GLOBEX_NAME, nbytes=-1)["addr"] == GLOBEX
                assert run_client(cg["blk"], ACME_NAME, nbytes=-1)["addr"] == ACME
                assert agent.enforcement is not None
                # 2 tenants x (the address, its ::ffff: form)
                assert wait_for(lambda: agent.enforcement.state()["refused_addresses"] == 4)

                sanctioned = run_client(cg["blk"], ACME_NAME)
                assert sanctioned["result"] == "ok"
                refused = run_client(cg["blk"], GLOBEX_NAME)
                assert refused["result"] == "errno 1"  # EPERM at connect()
                assert refused["elapsed_s"] < 2.0
                dry = run_client(cg["dry"], GLOBEX_NAME)
                assert dry["result"] == "ok"
                mon = run_client(cg["mon"], GLOBEX_NAME)
                assert mon["result"] == "ok"

                alerts = wait_for(lambda: (a := alerts_by_tenant(agent)).keys() >= {
                    "blk", "dry", "mon"} and a)
                assert {t: (a["instance"], a["action"]) for t, a in alerts.items()} == {
                    "blk": ("globex", "blocked"), "dry": ("globex", "would_block"),
                    "mon": ("globex", "observed")}
                assert alerts["blk"]["reason"] == "address"

                # the reload lets blk reach globex; a bad file changes nothing
                config_path.write_text(config_text('"salesforce:acme", "salesforce:globex"'))
                reloaded = client.post("/v1/config/reload", headers=auth)
                assert reloaded.status_code == 200, reloaded.text
                assert reloaded.json()["changes"]["tenants_changed"] == {
                    "blk": {"allow_added": ["salesforce:globex"], "allow_removed": []}}
                assert wait_for(lambda: agent.enforcement.state()["refused_addresses"] == 2)
                after = run_client(cg["blk"], GLOBEX_NAME)
                assert after["result"] == "ok"
                config_path.write_text(config_text('"salesforce:acme"') + "  - name: [\n")
                bad = client.post("/v1/config/reload", headers=auth)
                assert bad.status_code == 422
                assert bad.json()["detail"].startswith(f"{config_path}:")
                assert [t.allow for t in agent.config.tenants][0] == [
                    "salesforce:acme", "salesforce:globex"]
                assert client.post("/v1/config/reload").status_code == 401

                metrics = client.get("/metrics", headers=auth).text
                audit = client.get("/v1/audit", headers=auth).json()["transfers"]
            finally:
                agent.stop()
            # fail open: nothing of ours is left on the cgroup root
            assert agent.enforcement.state()["connect_refusal"] is False
        served = server_log(log)
    finally:
        store.close()

    # the servers: acme got blk's upload byte-exact; globex never saw blk before the reload
    payload = UPLOAD + 8
    assert sorted(served) == sorted([
        (ACME, ACME_NAME, payload), (GLOBEX, GLOBEX_NAME, payload),
        (GLOBEX, GLOBEX_NAME, payload), (GLOBEX, GLOBEX_NAME, payload)])
    decisions = [ln for ln in metrics.splitlines()
                 if ln.startswith("leaktap_enforcement_decisions_total{")]
    assert sorted(decisions) == [
        'leaktap_enforcement_decisions_total{action="blocked",crm_instance="globex",'
        'tenant="blk",vendor="salesforce"} 1.0',
        # dry-run decides once, as block did: at connect (its hello's report is folded in)
        'leaktap_enforcement_decisions_total{action="would_block",crm_instance="globex",'
        'tenant="dry",vendor="salesforce"} 1.0',
    ]
    enforced = sorted((t["tenant"], t["outcome"], t["dst"], t["dport"], t["id"] is None,
                       t["enforcement_reason"])
                      for t in audit if t["outcome"] in ("blocked", "would_block"))
    assert enforced == [("blk", "blocked", GLOBEX, 443, True, "address"),
                        ("dry", "would_block", GLOBEX, 443, False, "address")]


def test_hello_naming_an_unsanctioned_instance_is_dropped(tmp_path: Path) -> None:
    """The hello verdict (kernel side of issue 12): blk connects to acme's address, which
    is not refused, naming globex in its ClientHello."""
    config_path = tmp_path / "leaktap.yaml"
    config_path.write_text(config_text('"salesforce:acme"'))
    store = Store(tmp_path / "lt.db")
    try:
        with tenant_cgroups() as cg, crm_lab(tmp_path) as (lab, log):
            agent = Agent(load_config(config_path), [lab.host_if], store, pin=False)
            agent.start()
            try:
                client = TestClient(create_app(agent, [], [TOKEN], manage=False))
                auth = {"Authorization": f"Bearer {TOKEN}"}
                ready = wait_for(lambda: (r := client.get("/readyz", headers=auth)).status_code
                                 == 200 and r.json())
                assert ready["enforcement"]["hello_verdict"] is True, ready
                sanctioned = run_client(cg["blk"], ACME_NAME, addr=ACME)
                assert sanctioned["result"] == "ok"
                blocked = run_client(cg["blk"], GLOBEX_NAME, addr=ACME)
                assert blocked["result"] == "errno 103"  # ECONNABORTED: socket destroyed
                assert blocked["elapsed_s"] < 2.0
                dry = run_client(cg["dry"], GLOBEX_NAME, addr=ACME)
                assert dry["result"] == "ok"
                alerts = wait_for(lambda: (a := alerts_by_tenant(agent)).keys() >= {
                    "blk", "dry"} and a)
                metrics = client.get("/metrics", headers=auth).text
                audit = client.get("/v1/audit", headers=auth).json()["transfers"]
                destroyed = agent.enforcement.state()["sockets_destroyed"] \
                    if agent.enforcement else 0
                # the reload puts globex in blk's allow list: the next hello goes through
                agent.config_path = str(config_path)
                config_path.write_text(config_text('"salesforce:acme", "salesforce:globex"'))
                assert client.post("/v1/config/reload", headers=auth).status_code == 200
                assert run_client(cg["blk"], GLOBEX_NAME, addr=ACME)["result"] == "ok"
            finally:
                agent.stop()
        served = server_log(log)
    finally:
        store.close()
    # the server got the sanctioned upload byte-exact and nothing of the blocked one
    by_sni = {(a, sni): n for a, sni, n in served}
    assert by_sni[(ACME, ACME_NAME)] == UPLOAD + 8
    # blk's blocked hello never reached it (or reached it with no application byte)
    assert sorted(n for a, sni, n in served if sni == GLOBEX_NAME) in (
        [UPLOAD + 8, UPLOAD + 8], [0, UPLOAD + 8, UPLOAD + 8])
    assert destroyed == 1
    assert {t: (a["instance"], a["action"], a["reason"]) for t, a in alerts.items()} == {
        "blk": ("globex", "blocked", "unsanctioned_instance"),
        "dry": ("globex", "would_block", "unsanctioned_instance")}
    decisions = sorted(ln for ln in metrics.splitlines()
                       if ln.startswith("leaktap_enforcement_decisions_total{"))
    assert decisions == [
        'leaktap_enforcement_decisions_total{action="blocked",crm_instance="globex",'
        'tenant="blk",vendor="salesforce"} 1.0',
        'leaktap_enforcement_decisions_total{action="would_block",crm_instance="globex",'
        'tenant="dry",vendor="salesforce"} 1.0',
    ]
    enforced = sorted((t["tenant"], t["outcome"], t["dst"], t["dport"], t["sni"])
                      for t in audit if t["outcome"] in ("blocked", "would_block"))
    assert enforced == [("blk", "blocked", ACME, 443, GLOBEX_NAME),
                        ("dry", "would_block", ACME, 443, GLOBEX_NAME)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Cli:
    """`leaktap run` as a user starts it, its stderr collected as it comes."""

    def __init__(self, config: Path, iface: str, db: Path) -> None:
        import threading

        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "leaktap.controller.commands.cli", "run", "--config",
             str(config), "--iface", iface, "--listen", f"127.0.0.1:{self.port}", "--db",
             str(db)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def ready(self) -> dict[str, Any] | None:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/readyz",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                body: dict[str, Any] = json.loads(resp.read())
                return body
        except (OSError, urllib.error.HTTPError):
            return None


def test_sighup_reload_and_the_failure_modes_of_the_cli_agent(tmp_path: Path) -> None:
    from leaktap.controller.commands.doctor import Status, check_enforcement
    from leaktap.controller.enforcement.connect_guard import attached_here, remove_stale

    mount = find_cgroup2_mount()
    assert mount is not None
    monitor = config_text('"salesforce:acme"').replace("enforce: block", "enforce: monitor") \
        .replace("enforce: dry-run", "enforce: monitor")
    tokens = f"tokens: {{admin: [{TOKEN}]}}\n"
    config_path = tmp_path / "leaktap.yaml"
    config_path.write_text(monitor + tokens)
    db = tmp_path / "lt.db"
    try:
        with tenant_cgroups(), veth_lab("lt-enfh", "198.18.71.1", "198.18.71.2") as lab:
            cli = _Cli(config_path, lab.host_if, db)
            try:
                state = wait_for(lambda: (r := cli.ready()) and r["enforcement"], 60)
                assert (state["state"], state["connect_refusal"]) == ("off", False), cli.log
                # SIGHUP turns enforcement on in the running agent
                config_path.write_text(config_text('"salesforce:acme"') + tokens)
                cli.proc.send_signal(signal.SIGHUP)
                state = wait_for(lambda: (r := cli.ready()) and r["enforcement"][
                    "connect_refusal"] and r["enforcement"], 30)
                assert state and state["state"] == "block", cli.log
                assert (state["block_tenants"], state["dry_run_tenants"]) == (["blk"], ["dry"])
                assert attached_here(mount) == 2
                # a bad file: logged, the running policy kept
                config_path.write_text(monitor + tokens + "tenants: []\n")
                cli.proc.send_signal(signal.SIGHUP)
                assert wait_for(lambda: any("configuration not reloaded" in ln
                                            for ln in cli.log)), cli.log
                refused = next(ln for ln in cli.log if "configuration not reloaded" in ln)
                assert f"{config_path}:" in refused
                after = cli.ready()
                assert after is not None and after["enforcement"]["state"] == "block"
                # a crash: the programs stay attached with the last policy
                cli.proc.kill()
                cli.proc.wait(timeout=10)
                assert attached_here(mount) == 2
                crashed = check_enforcement(None)
                assert crashed.status is Status.WARN
                assert crashed.detail.startswith("no agent runs but 2 connect program(s)")
                assert lab.host_if in crashed.detail
                # the next start replaces them; a clean stop removes them (fail open)
                config_path.write_text(config_text('"salesforce:acme"') + tokens)
                cli = _Cli(config_path, lab.host_if, db)
                assert wait_for(lambda: (r := cli.ready()) and r["enforcement"][
                    "connect_refusal"], 60), cli.log
                assert attached_here(mount) == 2
            finally:
                if cli.proc.poll() is None:
                    cli.proc.send_signal(signal.SIGTERM)
                    assert cli.proc.wait(timeout=30) == 0, cli.log
            assert attached_here(mount) == 0
    finally:
        remove_stale(mount)
