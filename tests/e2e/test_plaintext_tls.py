"""TLS plaintext inspection end to end: real clients (requests, httpx HTTP/1.1 and
HTTP/2, curl, openssl s_client) in tenant cgroups talk to a local TLS server
posing as a CRM; the monitor's uprobes see their writes and each case yields
its finding or audit record with the right tenant and CRM instance within 5 s.

A process is probed tens of milliseconds after its exec (or fork); a client that
writes sooner is not seen. The Python clients here call only once probed
(run_probed), curl runs behind a launcher that waits before exec'ing into it,
so a loaded machine cannot make these tests race the attach.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from leaktap.analytics.alerts import Finding
from leaktap.analytics.plaintext.inspector import BulkAudit
from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.commands.doctor import find_cgroup2_mount
from leaktap.controller.config import LeaktapConfig, parse_config, with_database
from leaktap.controller.plaintext.monitor import PlaintextMonitor
from tests.netlab import make_cert, veth_lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]
logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
HOST_IP, CRM_IP = "198.18.60.1", "198.18.60.2"
LIBSSL = "/lib/x86_64-linux-gnu/libssl.so.3"
# how long a finding may take to arrive: generous for a loaded two-core CI machine (a passing
# wait returns as soon as its finding is there)
DEADLINE_S = 15.0
TOKEN = "00D5g000004ABCD!AR8AQPlaintextLeakTestBearer9f3a"
TOKEN2 = "00D5g000004WXYZ!AR8AQRedactionTestBearerToken77c4"
CANARY = "CANARY-ACME-7c1e55d0a2"
SSN = "123-45-6789"
CGROUPS = ("lt-pt-acme", "lt-pt-globex", "lt-pt-other")

CONFIG = f"""
tenants:
  - name: acme
    match: {{cgroup: "/lt-pt-acme*"}}
    environment: prod
  - name: globex
    match: {{cgroup: "/lt-pt-globex*"}}
    environment: prod
  - name: initech
    match: {{uids: [4712]}}
plaintext:
  enabled: true
  select: {{cgroups: ["/lt-pt-acme*", "/lt-pt-globex*"], exes: ["*/curl", "*/openssl"]}}
  max_bytes: 4096
  canaries:
    - {{token: "{CANARY}", tenant: acme, record: "Account/001ACME", environment: prod}}
  tenants:
    acme:
      encrypted_fields: [SSN__c, Email]
      envelope_prefixes: ["enc:v1:"]
      bulk_operations: ["salesforce:bulk2.query"]
    globex:
      bulk_operations: ["hubspot:export"]
"""


def in_cgroup(mount: Path, name: str, argv: list[str], uid: int | None = None) -> list[str]:
    prefix = ["sh", "-c", f'echo $$ > {mount / name}/cgroup.procs && exec "$0" "$@"']
    if uid is not None:
        prefix += ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"]
    return [*prefix, *argv]


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def run(argv: list[str], stdin: bytes | None = None, timeout: float = 30) -> str:
    out = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, cwd=REPO,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    return out.stdout.decode(errors="replace")


def run_probed(mon: Any, argv: list[str], timeout: float = 30) -> str:
    """Run a client that prints `started` and waits for a line; it is told to go once
    `mon` has probed it. A fresh process is probed tens of ms after its exec, before a
    Python client has imported its HTTP library, but a loaded machine can take longer:
    these tests are about what the monitor makes of the writes, not that race."""
    p = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        assert p.stdout is not None and p.stdout.readline() == b"started\n"
        wait_probed(mon, p.pid)
    finally:
        out, err = p.communicate(b"go\n", timeout=timeout)
    assert p.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


class Collected:
    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.audits: list[BulkAudit] = []

    def clear(self) -> None:
        self.findings.clear()
        self.audits.clear()

    def wait(self, what: Callable[[], list[Any]], timeout: float = DEADLINE_S) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = what()
            if found:
                return found
            time.sleep(0.05)
        return what()

    def finding(self, kind: str, **match: Any) -> list[Finding]:
        return self.wait(lambda: [f for f in self.findings if f.kind == kind and all(
            getattr(f, k) == v for k, v in match.items())])

    def audit(self, operation: str) -> list[BulkAudit]:
        return self.wait(lambda: [a for a in self.audits if a.operation == operation])


@contextlib.contextmanager
def crm_tls_lab(tmp: Path, lab_name: str, host_ip: str, crm_ip: str,
                cgroups: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Tenant cgroups, and a veth lab whose far end serves TLS on crm_ip:443 (crm_server)."""
    mount = find_cgroup2_mount()
    assert mount is not None, "no cgroup2 mount"
    for name in cgroups:
        (mount / name).mkdir(exist_ok=True)
    cert, key = make_cert(tmp, "crm.test")
    with veth_lab(lab_name, host_ip, crm_ip, prefix=24) as net:
        server = subprocess.Popen(
            net.in_ns(sys.executable, "-m", "tests.e2e.crm_server", str(cert), str(key), crm_ip,
                      "443"),
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            yield {"mount": mount, "net": net, "tmp": tmp}
        finally:
            server.kill()
            server.wait()
            for name in cgroups:
                (mount / name).rmdir()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with crm_tls_lab(tmp_path_factory.mktemp("plaintext"), "lt-t6", HOST_IP, CRM_IP,
                     CGROUPS) as where:
        yield where


def lab_config(lab: dict[str, Any], text: str, db: str = "lt.db") -> LeaktapConfig:
    """A test's configuration, its database (and the key beside it) in the lab's folder."""
    return with_database(parse_config(text), lab["tmp"] / db)


@contextlib.contextmanager
def running_monitor(lab: dict[str, Any], config: LeaktapConfig
                    ) -> Iterator[tuple[PlaintextMonitor, Collected]]:
    """A started PlaintextMonitor whose findings and audits are collected."""
    got = Collected()
    mon = PlaintextMonitor(config, Attributor(config, cgroup_mount=lab["mount"]),
                           got.findings.append, got.audits.append, system_library=LIBSSL)
    mon.start()
    try:
        yield mon, got
    finally:
        mon.stop()


@pytest.fixture(scope="module")
def config(lab: dict[str, Any]) -> LeaktapConfig:
    return lab_config(lab, CONFIG)


@pytest.fixture(scope="module")
def monitor(lab: dict[str, Any], config: LeaktapConfig) -> Iterator[tuple[PlaintextMonitor,
                                                                          Collected]]:
    with running_monitor(lab, config) as running:
        yield running


@pytest.fixture
def collected(monitor: tuple[PlaintextMonitor, Collected]) -> Collected:
    monitor[1].clear()
    return monitor[1]


# the clients call only once told that they are probed (run_probed)
GATE = 'print("started", flush=True); sys.stdin.readline()'
REQUESTS = """
import requests, urllib3, sys, json
urllib3.disable_warnings()
""" + GATE + """
r = requests.request({method!r}, "https://{ip}{path}", data={body!r},
                     headers={headers!r}, verify=False, timeout=10)
assert r.status_code == 200, r.status_code
"""

HTTPX = """
import httpx, sys
""" + GATE + """
with httpx.Client(http2={h2}, verify=False, timeout=10) as c:
    r = c.request({method!r}, "https://{ip}{path}", content={body!r}, headers={headers!r})
    assert r.status_code == 200 and r.http_version == {version!r}, (r.status_code, r.http_version)
"""


def requests_client(method: str, path: str, body: bytes, headers: dict[str, str]) -> list[str]:
    return py(REQUESTS.format(method=method, ip=CRM_IP, path=path, body=body, headers=headers))


def httpx_client(method: str, path: str, body: bytes, headers: dict[str, str],
                 h2: bool) -> list[str]:
    return py(HTTPX.format(h2=h2, method=method, ip=CRM_IP, path=path, body=body,
                           headers=headers, version="HTTP/2" if h2 else "HTTP/1.1"))


SF = {"Host": "acme.my.salesforce.com"}


def test_bulk2_ingest_job_with_requests_is_audited_and_alerts(lab, monitor, collected):
    mon, _ = monitor
    body = json.dumps({"object": "Account", "operation": "insert"}).encode()
    run_probed(mon, in_cgroup(lab["mount"], "lt-pt-acme", requests_client(
        "POST", "/services/data/v59.0/jobs/ingest", body,
        {**SF, "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})))

    audit = collected.audit("salesforce:bulk2.ingest")
    assert audit, collected.audits
    a = audit[0]
    assert (a.tenant, a.crm_vendor, a.crm_instance, a.action, a.allowed) == (
        "acme", "salesforce", "acme", "create", False)
    assert a.request_bytes == len(body) and a.protocol == "http/1.1"
    (f,) = collected.finding("bulk_export")
    assert (f.tenant, f.crm_instance, f.severity) == ("acme", "acme", "high")


def test_hubspot_export_over_http2_with_httpx_is_audited_as_allowed(lab, monitor, collected):
    mon, _ = monitor
    body = json.dumps({"exportType": "VIEW", "format": "CSV"}).encode()
    run_probed(mon, in_cgroup(lab["mount"], "lt-pt-globex", httpx_client(
        "POST", "/crm/v3/exports/export/async", body,
        {"Host": "api.hubapi.com", "Content-Type": "application/json"}, h2=True)))

    (a,) = collected.audit("hubspot:export")
    assert (a.tenant, a.crm_vendor, a.protocol, a.allowed, a.method) == (
        "globex", "hubspot", "h2", True, "POST")
    time.sleep(0.2)
    assert not [f for f in collected.findings if f.kind == "bulk_export"]


def test_canary_in_json_and_in_base64_with_curl(lab, collected):
    url = "https://acme.my.salesforce.com/services/data/v59.0/sobjects/Note"
    curl = ["curl", "-sS", "-k", "--http1.1", "--resolve", f"acme.my.salesforce.com:443:{CRM_IP}",
            "-H", "Content-Type: application/json"]
    wrapped = base64.b64encode(json.dumps({"Body": f"x {CANARY} y"}).encode()).decode()
    bodies = [json.dumps({"Body": f"see {CANARY} here"}), json.dumps({"blob": wrapped})]
    for body in bodies:
        # a launcher that execs into curl, as container entrypoints do: the process is
        # probed from the launcher's exec on, so curl's first write cannot outrun the
        # attach (a process exec'ing straight into a TLS write can: see the module doc)
        script = 'sleep 0.2; exec "$0" "$@"'
        run(in_cgroup(lab["mount"], "lt-pt-acme", ["sh", "-c", script, *curl,
                                                    "--data-binary", body, url]))

    def both() -> list[Finding]:
        found = [f for f in collected.findings if f.kind == "canary_token"]
        return found if {f.evidence["form"] for f in found} >= {"raw", "base64"} else []

    found = collected.wait(both)
    assert found, [f.evidence for f in collected.findings]
    f = found[0]
    assert (f.tenant, f.crm_vendor, f.crm_instance, f.severity) == (
        "acme", "salesforce", "acme", "critical")
    assert f.evidence["canary_tenant"] == "acme"
    assert f.evidence["canary_record"] == "Account/001ACME"
    assert f.evidence["comm"] == "curl"


def test_must_be_encrypted_field_in_clear_alerts_and_encrypted_does_not(lab, monitor, collected):
    mon, _ = monitor
    path = "/services/data/v59.0/sobjects/Contact/003ACME"
    enc = "enc:v1:" + base64.b64encode(os.urandom(24)).decode()
    for value in (enc, SSN):
        body = json.dumps({"LastName": "Doe", "SSN__c": value}).encode()
        run_probed(mon, in_cgroup(lab["mount"], "lt-pt-acme", requests_client(
            "PATCH", path, body, {**SF, "Content-Type": "application/json"})))

    (f,) = collected.finding("unencrypted_field")
    assert (f.tenant, f.crm_instance) == ("acme", "acme")
    assert f.evidence["field"] == "SSN__c" and f.evidence["value_kind"] == "ssn"
    assert f.evidence["excerpt"] == '"SSN__c": "***-**-**89"'


def test_same_bearer_token_from_two_tenants_cgroups(lab, monitor, collected):
    mon, _ = monitor
    headers = {**SF, "Authorization": f"Bearer {TOKEN}"}
    run_probed(mon, in_cgroup(lab["mount"], "lt-pt-acme", requests_client(
        "GET", "/services/data/v59.0/limits", b"", headers)))
    run_probed(mon, in_cgroup(lab["mount"], "lt-pt-globex", httpx_client(
        "GET", "/services/data/v59.0/limits", b"", headers, h2=False)))

    (f,) = collected.finding("oauth_token_reuse")
    assert (f.tenant, f.crm_instance, f.severity) == ("globex", "acme", "critical")
    assert f.evidence["first_tenant"] == "acme"
    assert f.evidence["excerpt"] == "authorization: Bearer ****9f3a"


def test_safetensors_upload_is_a_model_artifact(lab, monitor, collected):
    mon, _ = monitor
    import numpy as np

    weights = np.random.default_rng(7).normal(0, 0.02, 8192).astype(np.float16).tobytes()
    header = json.dumps({"w": {"dtype": "F16", "shape": [8192], "data_offsets": [0,
                                                                           len(weights)]}},
                        separators=(",", ":")).encode()
    payload = struct.pack("<Q", len(header)) + header + weights
    run_probed(mon, in_cgroup(lab["mount"], "lt-pt-acme", requests_client(
        "POST", "/services/data/v59.0/sobjects/ContentVersion", payload,
        {**SF, "Content-Type": "application/octet-stream"})))

    found = collected.finding("model_artifact")
    assert found and found[0].evidence["format"] == "safetensors", found
    assert (found[0].tenant, found[0].crm_instance, found[0].severity) == (
        "acme", "acme", "high")


def test_openssl_s_client_write_is_joined_to_its_socket(lab, monitor, collected):
    mon, _ = monitor
    joined = mon.counters["joined_writes"]
    request = (f"GET /services/data/v59.0/query?q={CANARY} HTTP/1.1\r\n"
               f"Host: acme.my.salesforce.com\r\nContent-Length: 0\r\n\r\n").encode()
    # s_client writes through a socket BIO of its own (no SSL_set_fd): the socket
    # is learned from its write(2) of a TLS record
    argv = ["sh", "-c", "sleep 0.5; cat; sleep 0.5"]
    feeder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    client = subprocess.Popen(
        in_cgroup(lab["mount"], "lt-pt-other",
                  ["openssl", "s_client", "-quiet", "-no_ign_eof", "-connect", f"{CRM_IP}:443",
                   "-servername", "acme.my.salesforce.com"], uid=4712),
        stdin=feeder.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert feeder.stdin is not None
    feeder.stdin.write(request)
    feeder.stdin.close()
    try:
        (f,) = collected.finding("canary_token")
        assert (f.tenant, f.crm_instance) == ("initech", "acme")
        assert collected.wait(lambda: [1] if mon.counters["joined_writes"] > joined else [])
    finally:
        client.wait(timeout=10)
        feeder.wait(timeout=10)


HOLD = """
import socket, ssl, sys
print("started", flush=True)
sys.stdin.readline()  # the test says go once the monitor has probed this process
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
raw = socket.create_connection(("{ip}", 443))
with ctx.wrap_socket(raw, server_hostname={sni!r}) as tls:
    body = {body!r}
    head = b"POST {path} HTTP/1.1\\r\\nHost: {host}\\r\\nContent-Length: %d\\r\\n\\r\\n"
    tls.sendall(head % len(body) + body)
    assert b"200" in tls.recv(4096)
    print("ready", flush=True)
    sys.stdin.read()
"""


def hold_client(path: str, body: bytes, host: str = "acme.my.salesforce.com",
                sni: str | None = None) -> list[str]:
    return py(HOLD.format(ip=CRM_IP, path=path, body=body, host=host, sni=sni))


def wait_probed(mon: Any, pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not mon.probed_pids().get(pid):  # [] when every attach failed
        assert time.monotonic() < deadline, f"pid {pid} was never probed"
        time.sleep(0.01)


SSL_WRITE_EX_OFFSET = None


def ssl_write_ex_byte(pid: int) -> int:
    """The first instruction byte of SSL_write_ex in `pid`'s libssl (0xCC: a uprobe)."""
    global SSL_WRITE_EX_OFFSET
    if SSL_WRITE_EX_OFFSET is None:
        out = subprocess.run(["nm", "-D", "--defined-only", LIBSSL], capture_output=True,
                             text=True, check=True).stdout
        SSL_WRITE_EX_OFFSET = next(int(line.split()[0], 16) for line in out.splitlines()
                                   if line.split()[-1].split("@")[0] == "SSL_write_ex")
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5].endswith("/libssl.so.3") and int(parts[2], 16) == 0:
            base = int(parts[0].split("-")[0], 16)
            with open(f"/proc/{pid}/mem", "rb") as mem:
                mem.seek(base + SSL_WRITE_EX_OFFSET)
                return mem.read(1)[0]
    raise AssertionError(f"pid {pid} maps no libssl.so.3")


def test_unselected_process_is_not_probed_at_all(lab, monitor, collected):
    mon, _ = monitor
    body = json.dumps({"Body": CANARY}).encode()
    path = "/services/data/v59.0/sobjects/Note"
    procs = {}
    try:
        for name in ("lt-pt-other", "lt-pt-acme"):
            p = subprocess.Popen(in_cgroup(lab["mount"], name, hold_client(path, body)),
                                 cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            procs[name] = p
            assert p.stdout is not None and p.stdin is not None
            assert p.stdout.readline() == b"started\n"
            if name == "lt-pt-acme":
                wait_probed(mon, p.pid)  # the selected one: exec-to-probe latency
            p.stdin.write(b"go\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == b"ready"
        other, acme = procs["lt-pt-other"].pid, procs["lt-pt-acme"].pid
        (f,) = collected.finding("canary_token")
        assert f.tenant == "acme" and f.evidence["pid"] == acme
        probed = mon.probed_pids()
        assert acme in probed and other not in probed
        # the trap itself: a uprobe replaces the first instruction with int3
        assert ssl_write_ex_byte(acme) == 0xCC
        assert ssl_write_ex_byte(other) != 0xCC
    finally:
        for p in procs.values():
            p.communicate(b"", timeout=10)
    assert [f.evidence["pid"] for f in collected.findings] == [acme]
    assert collected.wait(lambda: [1] if acme not in mon.probed_pids() else []), (
        "exited process still probed")


HOSTILE = """
import os, socket, ssl, sys, threading, time
print("started", flush=True)
sys.stdin.readline()  # the test says go once the monitor has probed this process
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
def conn():
    return ctx.wrap_socket(socket.create_connection(("{ip}", 443)), server_hostname=None)
with conn() as tls:
    tls.send(b"")
    tls.send(b"G")
    tls.sendall(os.urandom(65536))
    tls.sendall(b"\\x00\\xff" * (8 << 20))
with conn() as tls:
    line = b"GET /" + b"a" * 100_000 + b" HTTP/1.1\\r\\nHost: acme.my.salesforce.com\\r\\n\\r\\n"
    tls.sendall(line)
    tls.recv(100)
with conn() as tls:
    body = b'{{"Body": "{canary}"}}'
    head = b"POST /x HTTP/1.1\\r\\nHost: acme.my.salesforce.com\\r\\nContent-Length: %d\\r\\n\\r\\n"
    tls.sendall(head % len(body) + body)
    tls.recv(100)
# exit in the middle of a 16 MB write
tls = conn()
threading.Thread(target=tls.sendall, args=(b"x" * (16 << 20),), daemon=True).start()
time.sleep(0.05)
os._exit(0)
"""


def test_hostile_writes_are_counted_and_inspection_goes_on(lab, monitor, collected):
    mon, _ = monitor
    before = mon.kernel_stats()
    errors = mon.counters["inspection_errors"]
    proc = subprocess.Popen(in_cgroup(lab["mount"], "lt-pt-acme", py(
        HOSTILE.format(ip=CRM_IP, canary=CANARY))), cwd=REPO, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
    wait_probed(mon, proc.pid)
    _, err = proc.communicate(b"go\n", timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]

    (f,) = collected.finding("canary_token")
    assert f.tenant == "acme"
    after = mon.kernel_stats()
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["ssl_cnt_empty"] >= 1
    # 64 KiB and the 100 KB request line arrive whole, in chunks; of the 16 MiB
    # writes only the head and tail are sent, the middle counted per connection
    assert delta["ssl_cnt_bytes_captured"] >= 65536 + 100_000
    assert delta["ssl_loss_chunk_bound"] >= 1
    assert delta["ssl_cnt_bytes_written"] - delta["ssl_cnt_bytes_captured"] >= 15 << 20
    assert delta["ssl_loss_read_user"] == 0
    assert mon.counters["inspection_errors"] == errors
    assert collected.wait(lambda: [1] if proc.pid not in mon.probed_pids() else [])


def test_flow_join_takes_the_crm_instance_from_the_sni(lab, monitor, collected):
    """With the TC probes feeding the attributor, a write is joined through its
    socket to the flow: the instance comes from the ClientHello, not the Host header.
    The kernel named the hello (lt_names) and no poll drained it before the write: the
    join reads it in place, as the agent's does."""
    from leaktap.controller.kernel import loader
    from leaktap.controller.kernel.maps import MapReader
    from leaktap.controller.kernel.ringbuf import RingDrainer

    mon, _ = monitor
    probes = loader.load("tc", loader.KernelOptions(flows_max=4096))
    try:
        drainer = RingDrainer(probes, mon.attributor.on_sample)
        reader = MapReader(probes)
        mon.attributor.peek_kernel_name = reader.peek_name
        named_before = mon.attributor.kernel_names.stats.named
        with loader.attached(probes, [lab["net"].host_if]):
            drainer.start()
            try:
                body = json.dumps({"operation": "query", "query": "SELECT Id FROM Contact"})
                p = subprocess.Popen(
                    in_cgroup(lab["mount"], "lt-pt-acme", hold_client(
                        "/services/data/v59.0/jobs/query", body.encode(),
                        host="gateway.internal", sni="globex.my.salesforce.com")),
                    cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                # exec-to-probe takes up to ~100 ms (documented): start writing after it
                assert p.stdout is not None and p.stdout.readline() == b"started\n"
                wait_probed(mon, p.pid)
                p.communicate(b"go\n\n", timeout=20)
                (a,) = collected.audit("salesforce:bulk2.query")
                # the reading stays for the poll's drain, which counts it once
                assert [r[6] for r in reader.drain_name_rows()] == ["globex.my.salesforce.com"]
            finally:
                drainer.stop()
                mon.attributor.peek_kernel_name = None
    finally:
        probes.close()
    assert (a.tenant, a.crm_vendor, a.crm_instance, a.destination, a.allowed) == (
        "acme", "salesforce", "globex", "globex.my.salesforce.com", True)
    assert mon.attributor.kernel_names.stats.named == named_before  # peeked, not counted


def test_raw_secrets_reach_no_database_log_sink_or_audit(lab, monitor, collected, tmp_path,
                                                         caplog):
    """Redaction guarantee: the token, canary and SSN the clients send appear in
    none of the SQLite files, the log output, the sinks' payloads or the audit records."""
    from leaktap.analytics.alerts import AlertManager, SinkRoute
    from leaktap.analytics.outbox import OutboxDispatcher
    from leaktap.analytics.sinks import build_sink
    from leaktap.controller.storage import Store
    from tests.analytics.receivers import WebhookReceiver, running

    caplog.set_level(logging.DEBUG)
    mon, _ = monitor
    secret = b"webhook-secret-0123456789"
    with running(WebhookReceiver(secret)) as hook:
        cfg = parse_config(f"""
sinks:
  - {{type: file, path: "{tmp_path / 'alerts.jsonl'}", fsync: false}}
  - {{type: webhook, url: "{hook.url}", secret: "{secret.decode()}"}}
""")
        store = Store(tmp_path / "lt.db")
        sinks = [build_sink(s) for s in cfg.sinks]
        outbox = OutboxDispatcher(store.path, sinks)
        alerts = AlertManager(store.path, [SinkRoute(s.sink_name) for s in cfg.sinks],
                              on_change=outbox.notify)
        audit_path = tmp_path / "audit.jsonl"
        outbox.start()
        saved = mon.on_finding, mon.on_audit

        def record(f: Finding) -> None:
            collected.findings.append(f)
            alerts.record(f)

        def audit(a: BulkAudit) -> None:
            collected.audits.append(a)
            with audit_path.open("a") as out:
                out.write(json.dumps(a.as_dict()) + "\n")

        mon.on_finding, mon.on_audit = record, audit
        try:
            headers = {**SF, "Authorization": f"Bearer {TOKEN2}",
                       "Content-Type": "application/json"}
            body = json.dumps({"SSN__c": SSN, "Note": CANARY}).encode()
            run_probed(mon, in_cgroup(lab["mount"], "lt-pt-acme", requests_client(
                "POST", "/services/data/v59.0/jobs/ingest", body, headers)))
            run_probed(mon, in_cgroup(lab["mount"], "lt-pt-globex", httpx_client(
                "POST", "/services/data/v59.0/jobs/ingest", body, headers, h2=True)))
            kinds = {"canary_token", "oauth_token_reuse", "unencrypted_field", "bulk_export"}
            assert collected.wait(lambda: [1] if kinds <= {f.kind for f in collected.findings}
                                  else []), [f.kind for f in collected.findings]
            deadline = time.monotonic() + DEADLINE_S
            while len(hook.documents) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            mon.on_finding, mon.on_audit = saved
            outbox.stop()
            alerts.close()
            store.close()
        documents = json.dumps(hook.documents)

    assert len(hook.documents) >= 4
    raw = [TOKEN2, CANARY, SSN, SSN.replace("-", "")]
    places = {
        "database": b"".join(p.read_bytes() for p in tmp_path.glob("lt.db*")),
        "file sink": (tmp_path / "alerts.jsonl").read_bytes(),
        "webhook": documents.encode(),
        "audit": audit_path.read_bytes(),
        "log": caplog.text.encode(),
    }
    assert b"oauth_token_reuse" in places["database"] and places["file sink"]
    for where, content in places.items():
        for value in raw:
            for form in (value, json.dumps(value)[1:-1]):
                at = content.find(form.encode())
                context = content[max(0, at - 300) : at + 80]
                assert at < 0, f"{value!r} found in the {where}: {context!r}"


FORK = """
import os, socket, ssl, sys, threading
print("started", flush=True)
sys.stdin.readline()  # the parent is probed
threading.Thread(target=lambda: None).start()  # a thread is no new process: no notice
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.close(w)
    os.read(r, 1)  # the test says go once the child is probed
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ctx.wrap_socket(socket.create_connection(("{ip}", 443)),
                         server_hostname="acme.my.salesforce.com") as tls:
        body = b'{{"Description": "{canary}"}}'
        tls.sendall(b"POST /services/data/v59.0/sobjects/Note HTTP/1.1\\r\\n"
                    b"Host: acme.my.salesforce.com\\r\\nContent-Length: %d\\r\\n\\r\\n"
                    % len(body) + body)
        ok = b"200" in tls.recv(4096)
    os._exit(0 if ok else 3)
os.close(r)
print(child, flush=True)
sys.stdin.readline()
os.write(w, b"g")
_, status = os.waitpid(child, 0)
print(status, flush=True)
"""


def test_a_forked_child_is_probed_on_its_fork_not_at_the_rescan(lab):
    """A probed process forks a child that uploads (a pre-fork worker, or a child
    sent to evade): the child shares no probe of its parent (a per-pid uprobe
    fires in its own process's memory only), so the fork is reported by the
    kernel and the child probed at once; the rescan is an hour away here."""
    config = lab_config(lab, CONFIG.replace("  max_bytes: 4096",
                                            "  max_bytes: 4096\n  rescan_interval_s: 3600"),
                        "fork.db")
    with running_monitor(lab, config) as (mon, got):
        before = mon.kernel_stats()
        proc = subprocess.Popen(
            in_cgroup(lab["mount"], "lt-pt-acme", py(FORK.format(ip=CRM_IP, canary=CANARY))),
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline() == b"started\n"
            wait_probed(mon, proc.pid)
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            child = int(proc.stdout.readline())
            forked = time.monotonic()
            wait_probed(mon, child, timeout=3)
            logger.warning("fork -> child probed within %.1f ms",
                           (time.monotonic() - forked) * 1000)
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == b"0\n"
            (f,) = got.finding("canary_token")
        finally:
            _, err = proc.communicate(b"", timeout=30)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert f.tenant == "acme" and f.evidence["pid"] == child
        after = mon.kernel_stats()
        assert after["ssl_cnt_fork"] - before.get("ssl_cnt_fork", 0) == 1  # not the thread
        # both are unprobed on their exit notices (the exit is reported from inside it,
        # before the process is a zombie: looked at again until it is gone)
        assert got.wait(lambda: [] if {proc.pid, child} & set(mon.probed_pids()) else [1],
                        timeout=2), mon.probed_pids()
        assert mon.counters["rescans"] == 1  # the one at start
