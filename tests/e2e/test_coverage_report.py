"""The coverage report end to end (issue 13.3): the agent watches a veth to a local
TLS server posing as Salesforce while real clients hold a connection open to it:

- Python's ssl in the selected cgroup: openssl-shared, inspected;
- a C client built here -static against libssl.a/libcrypto.a, selected:
  openssl-static, inspected (its own SSL_write probed);
- the same Python client in a cgroup no rule selects: inspected false, "not selected";
- a JSSE client run from source by the distribution's JDK (`java Client.java`),
  selected: java, inspected false (JSSE is Java code, no native TLS library);
- Node.js's https, selected: openssl-static where node carries its own OpenSSL
  (NodeSource's, this image's), openssl-shared where it links libssl.so.3 (Debian's);
  inspected either way.

Each process is found from its connection's socket, and GET /v1/coverage lists
exactly these five, with their executables, tenants and destination; /metrics
splits the bytes to the CRM by `inspected`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from leaktap.controller.agent import Agent
from leaktap.controller.api.main import create_app
from leaktap.controller.config import parse_config
from leaktap.controller.plaintext import coverage, tls_class
from leaktap.controller.storage import Store
from tests.e2e.test_plaintext_executables import (
    CLIENTS,
    LIBSSL,
    NODE,
    build_static_client,
    exports_ssl_write,
)
from tests.e2e.test_plaintext_tls import crm_tls_lab, in_cgroup, wait_probed

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
HOST_IP, CRM_IP = "198.18.114.1", "198.18.114.2"
SNI = "acme.my.salesforce.com"
SELECTED, FREE = "lt-c13-acme", "lt-c13-free"
TOKEN = "reader-token-coverage-13"
SECRET = "CANARY-COV13-e5a9d1"  # in every body: no report or metric may carry it

CONFIG = f"""
tenants:
  - name: acme
    match: {{cgroup: "/lt-c13-*"}}
plaintext:
  enabled: true
  select: {{cgroups: ["/{SELECTED}*"]}}
"""

# the static client's protocol in Python: "started", a line, post, "sent", hold
PYTHON_CLIENT = """
import socket, ssl, sys
ip, sni, body = sys.argv[1:4]
print("started", flush=True)
sys.stdin.readline()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
tls = ctx.wrap_socket(socket.create_connection((ip, 443)), server_hostname=sni)
tls.sendall(b"POST /services/data/v59.0/sobjects/Account HTTP/1.1\\r\\nHost: %s\\r\\n"
            b"Content-Length: %d\\r\\n\\r\\n%s" % (sni.encode(), len(body), body.encode()))
assert b" 200" in tls.recv(4096)
print("sent", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with crm_tls_lab(tmp_path_factory.mktemp("coverage13"), "lt-c13", HOST_IP, CRM_IP,
                     (SELECTED, FREE)) as where:
        yield where


def start(lab: dict[str, Any], cgroup: str, argv: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(in_cgroup(lab["mount"], cgroup, argv), cwd=lab["tmp"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == b"started\n", (line, proc.stderr.read() if proc.stderr else b"")
    return proc


def post(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    assert line == b"sent\n", proc.stderr.read() if proc.stderr else b""


def test_coverage_lists_each_crm_client_with_its_tls_and_inspection(lab, tmp_path):
    static_exe = build_static_client(tmp_path)
    cfg = parse_config(CONFIG)
    config = cfg.model_copy(update={"storage": cfg.storage.model_copy(
        update={"path": str(tmp_path / "lt.db")})})
    agent = Agent(config, [lab["net"].host_if], Store(tmp_path / "lt.db"), pin=False)
    agent.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        body = json.dumps({"Name": SECRET})
        args = [CRM_IP, SNI, body]
        python = start(lab, SELECTED, [sys.executable, "-c", PYTHON_CLIENT, *args])
        static = start(lab, SELECTED, [str(static_exe), *args])
        free = start(lab, FREE, [sys.executable, "-c", PYTHON_CLIENT, *args])
        java = start(lab, SELECTED, ["java", str(CLIENTS / "Client.java"), *args])
        node = start(lab, SELECTED, [NODE, str(CLIENTS / "node_client.js"), *args])
        procs = [python, static, free, java, node]
        for p in (python, static, java, node):
            wait_probed(agent.plaintext, p.pid)
        for p in procs:
            post(p)
        agent.poll_once()
        agent.poll_once()
        agent.coverage.refresh()
        with TestClient(create_app(agent, [TOKEN], [], manage=False)) as client:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            got = client.get("/v1/coverage", headers=headers)
            metrics = client.get("/metrics", headers=headers).text
            assert client.get("/v1/coverage").status_code == 401
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
            p.wait(timeout=30)
        agent.stop()

    assert got.status_code == 200
    assert SECRET not in got.text and SECRET not in metrics
    listed = {e["pid"]: e for e in got.json()["processes"]}
    python_exe = os.path.realpath(sys.executable)
    node_tls = tls_class.OPENSSL_STATIC if exports_ssl_write(NODE) else tls_class.OPENSSL_SHARED
    assert os.path.exists(LIBSSL)
    java_exe = os.path.realpath("/usr/bin/java")

    def expect(p: subprocess.Popen[bytes], exe: str, comm: str, tls: str, inspected: bool,
               reason: str) -> dict[str, Any]:
        return {"pid": p.pid, "exe": exe, "comm": comm, "tenant": "acme",
                "destinations": ["salesforce:acme"], "tls": tls, "inspected": inspected,
                "reason": reason}

    assert listed == {
        python.pid: expect(python, python_exe, Path(sys.executable).name[:15],
                           tls_class.OPENSSL_SHARED, True, coverage.REASON_INSPECTED),
        static.pid: expect(static, str(static_exe), static_exe.name[:15],
                           tls_class.OPENSSL_STATIC, True, coverage.REASON_INSPECTED),
        free.pid: expect(free, python_exe, Path(sys.executable).name[:15],
                         tls_class.OPENSSL_SHARED, False, coverage.REASON_NOT_SELECTED),
        java.pid: expect(java, java_exe, "java", tls_class.JAVA, False, tls_class.REASON_JSSE),
        node.pid: expect(node, NODE, "node", node_tls, True, coverage.REASON_INSPECTED),
    }, got.json()
    series = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines() if line.startswith("leaktap_c")}
    inspected = series['leaktap_crm_egress_bytes_by_coverage_total{inspected="true",tenant="acme"}']
    unseen = series['leaktap_crm_egress_bytes_by_coverage_total{inspected="false",tenant="acme"}']
    assert inspected > 2 * len(body) and unseen > 2 * len(body)
    assert series['leaktap_coverage_processes{inspected="true",tls="openssl-shared"}'] == (
        1 if node_tls == tls_class.OPENSSL_STATIC else 2)
    assert series['leaktap_coverage_processes{inspected="false",tls="openssl-shared"}'] == 1
    assert series['leaktap_coverage_processes{inspected="true",tls="openssl-static"}'] == (
        2 if node_tls == tls_class.OPENSSL_STATIC else 1)
    assert series['leaktap_coverage_processes{inspected="false",tls="java"}'] == 1
