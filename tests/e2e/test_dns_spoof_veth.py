"""Spoofed DNS answers do not rename destinations (issue 17.1), live on a veth.

Reproduces the report: the lab's CRM-posing namespace sends the host one DNS
answer nobody asked for, mapping its own address to acme.my.salesforce.com,
and a process on the host forges the same answer on egress; then the tenant
uploads 100 KB of plain TCP to that address. Before the fix the upload counted
as the tenant's allowed salesforce:acme; now it names nothing, and both
answers are counted where they were turned down. A query the host really sent
is still answered and learned (the control that the pairing works live).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from scapy.layers.dns import DNS, DNSQR, DNSRR

from leaktap.controller.agent import Agent
from leaktap.controller.api.main import create_app
from leaktap.controller.config import parse_config
from leaktap.controller.storage import Store
from tests.netlab import dns_query, dns_responder, ns_server, veth_lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

HOST, CRM = "198.18.44.1", "198.18.44.2"
NAME = "acme.my.salesforce.com"
UPLOAD = 100_000
TOKEN = "reader-token-0123456789"
CONFIG = f"""
tenants:
  - name: acme
    match: {{cidrs: ["{HOST}/32"]}}
    allow: ["salesforce:acme"]
tokens: {{reader: [{TOKEN}]}}
"""

# a plain TCP sink: reads until the peer closes, then answers with the byte count
PLAIN_SINK = textwrap.dedent(
    """
    import socket, sys
    srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            got = 0
            while chunk := conn.recv(65536):
                got += len(chunk)
                if got >= int(sys.argv[3]):
                    conn.sendall(b"ok")
                    break
    """
)


def forged_answer(ident: int, name: str = NAME, ip: str = CRM) -> bytes:
    return bytes(DNS(id=ident, qr=1, aa=1, rd=1, ra=1, qd=DNSQR(qname=name),
                     an=DNSRR(rrname=name, type="A", ttl=3600, rdata=ip)))


def send_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes,
             netns: str | None = None) -> None:
    code = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.bind((sys.argv[1], int(sys.argv[2]))); "
        "s.sendto(bytes.fromhex(sys.argv[5]), (sys.argv[3], int(sys.argv[4])))"
    )
    cmd = [sys.executable, "-c", code, src[0], str(src[1]), dst[0], str(dst[1]), payload.hex()]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    subprocess.run(cmd, check=True, timeout=10)


def plain_upload(nbytes: int) -> None:
    with socket.create_connection((CRM, 8080), timeout=10, source_address=(HOST, 0)) as s:
        s.sendall(b"x" * nbytes)
        assert s.recv(2) == b"ok"


def test_spoofed_answers_do_not_name_a_plain_upload(tmp_path: Path) -> None:
    store = Store(tmp_path / "lt.db")
    try:
        with (
            veth_lab("lt-dnsf", HOST, CRM, prefix=24) as lab,
            ns_server(lab, PLAIN_SINK, CRM, "8080", str(UPLOAD)),
        ):
            agent = Agent(parse_config(CONFIG), [lab.host_if], store, pin=False)
            agent.start()
            try:
                # 1. unsolicited, from the CRM namespace to the host (TC ingress)
                send_udp((CRM, 53), (HOST, 40053), forged_answer(0x1701), netns=lab.netns)
                # 2. forged by a local process, leaving the host (TC egress)
                send_udp((HOST, 53), (CRM, 40054), forged_answer(0x1702))
                # control: a query the host sent is answered and learned
                with dns_responder(lab, "198.18.44.9"):
                    assert len(dns_query(CRM, "initech.zendesk.com")) > 12
                time.sleep(0.2)  # let the drain thread hand over the samples
                plain_upload(UPLOAD)
                for _ in range(4):  # past the wait for a ClientHello that never comes
                    agent.poll_once()
                client = TestClient(create_app(agent, [TOKEN], [], manage=False))
                flows = client.get(
                    "/v1/flows", headers={"Authorization": f"Bearer {TOKEN}"}
                ).json()["flows"]
                dns = agent.attributor.dns
                kernel = dict(agent.stats)
            finally:
                agent.stop()
    finally:
        store.close()

    [upload] = [f for f in flows if f["dst"] == CRM and f["dport"] == 8080]
    assert upload["bytes_out"] >= UPLOAD
    assert upload["tenant"] == "acme"
    assert (upload["crm_vendor"], upload["crm_instance"], upload["dns_names"]) == (
        None, None, [])
    assert dns.names_for(CRM) == []
    assert dns.stats.rejected_no_query == 1  # the namespace's answer arrived, turned down
    assert kernel["cnt_dns_ans_out"] == 1  # the local forgery was seen leaving, not sampled
    assert dns.names_for("198.18.44.9") == ["initech.zendesk.com"]
    assert (dns.stats.queries_matched, dns.stats.learned) == (1, 1)
