"""End to end (issue 11.2, 11.4): a tenant allowed only salesforce:acme signs in over
TLS to login.salesforce.com and test.salesforce.com through the live agent: no
unsanctioned page, the sign-ins are shared flows named by SNI and counted under the
tenant; an upload to another instance still pages. The agent's buckets, exported
from its store, are analysed with nothing skipped. Replay prints shared/named_by."""

from __future__ import annotations

import io
import sqlite3
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from leaktap.analytics.buckets import RowReport
from leaktap.analytics.cli import analyze_lines
from leaktap.controller.agent import Agent
from leaktap.controller.commands.export import export_buckets
from leaktap.controller.commands.replay import replay
from leaktap.controller.config import parse_config
from leaktap.controller.storage import Store
from tests.controller.test_shared_hosts import client_hello
from tests.netlab import make_cert, tls_sink, tls_upload, veth_lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

HOST_IP, PEER_IP = "198.18.61.1", "198.18.61.2"
CONFIG = f"""
tenants:
  - name: acme
    match: {{cidrs: ["{HOST_IP}/32"]}}
    allow: ["salesforce:acme"]
"""
SIGN_IN = 60_000


def _alerts(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT kind, crm_vendor, crm_instance FROM alerts").fetchall()


def test_sign_in_hosts_never_page_and_buckets_round_trip(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "crm.test")
    db = tmp_path / "lt.db"
    store = Store(db)
    config = parse_config(CONFIG)
    try:
        with veth_lab("lt-sh", HOST_IP, PEER_IP) as lab, tls_sink(lab, cert, key):
            agent = Agent(config, [lab.host_if], store, pin=False)
            agent.start()
            try:
                tls_upload(lab.peer_ip, 443, "login.salesforce.com", SIGN_IN)
                tls_upload(lab.peer_ip, 443, "test.salesforce.com", SIGN_IN)
                tls_upload(lab.peer_ip, 443, "acme.my.salesforce.com", SIGN_IN)
                tls_upload(lab.peer_ip, 443, "globex.my.salesforce.com", SIGN_IN)
                deadline = time.monotonic() + 10
                while not _alerts(db) and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(2.5)  # more polls: a page for the sign-ins would have come
                egress = dict(agent.egress_by_destination)
            finally:
                agent.stop()
        # only the instance outside the allow list pages
        assert _alerts(db) == [("unsanctioned_destination", "salesforce", "globex")]
        flows = {f["sni"]: f for f in store.flows(tenant="acme") if f["dport"] == 443}
        for host in ("login.salesforce.com", "test.salesforce.com"):
            f = flows[host]
            assert (f["crm_vendor"], f["crm_instance"], f["shared"], f["named_by"]) == (
                "salesforce", None, True, "sni")
            assert f["bytes_out"] > SIGN_IN
        assert (flows["acme.my.salesforce.com"]["crm_instance"],
                flows["acme.my.salesforce.com"]["shared"]) == ("acme", False)
        # the sign-ins count in the tenant's vendor series (instance unknown) and total
        shared_out = flows["login.salesforce.com"]["bytes_out"] + \
            flows["test.salesforce.com"]["bytes_out"]
        assert egress[("acme", "salesforce", "")][0] == shared_out
        now = time.time()
        volume = store.volume("acme", now - 3600, now + 60)
        assert sum(r["crm_bytes_out"] for r in volume) >= shared_out + 2 * SIGN_IN

        # 11.4: the agent's buckets, exported, are read with nothing skipped
        out = io.StringIO()
        written = export_buckets(store, out)
        lines = out.getvalue().splitlines()
        assert written == len(lines) > 0
        assert any('"crm_instance":null' in line and '"crm_vendor":"salesforce"' in line
                   for line in lines)
        report = RowReport()
        incidents = analyze_lines(lines, config.detection,
                                  {t.name: list(t.allow) for t in config.tenants},
                                  source="export", report=report)
        assert report.bad == {} and report.rows == written
        assert report.rows - report.not_crm > 0
        assert {(i.kind, i.crm_instance) for i in incidents} == {
            ("unsanctioned_destination", "globex")}
    finally:
        store.close()


def test_replay_prints_shared_and_named_by(tmp_path: Path) -> None:
    client, server = ("198.18.61.5", 41000), ("198.18.61.6", 443)
    hello = client_hello("login.salesforce.com")
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    up = eth / IP(src=client[0], dst=server[0])
    down = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / IP(
        src=server[0], dst=client[0])
    frames = [
        up / TCP(sport=client[1], dport=server[1], flags="S", seq=100),
        down / TCP(sport=server[1], dport=client[1], flags="SA", seq=900, ack=101),
        up / TCP(sport=client[1], dport=server[1], flags="A", seq=101, ack=901),
        up / TCP(sport=client[1], dport=server[1], flags="PA", seq=101, ack=901) / hello,
    ]
    path = tmp_path / "sign-in.pcap"
    wrpcap(str(path), frames)
    records, _ = replay(str(path), parse_config(CONFIG))
    (rec,) = records
    assert (rec["sni"], rec["crm_vendor"], rec["crm_instance"], rec["shared"],
            rec["crm_region"], rec["named_by"]) == (
        "login.salesforce.com", "salesforce", None, True, None, "sni")
