"""End to end attribution: real TLS clients in a cgroup, as another uid and
from another source address, with and without SNI (a DNS answer names the
SNI-less one); the agent's API shows each under its tenant, vendor and
instance, and the bytes match the interface counter within 1%."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from leaktap.controller.agent import Agent
from leaktap.controller.api.main import create_app
from leaktap.controller.config import parse_config
from leaktap.controller.kernel.hostfs import find_cgroup2_mount
from leaktap.controller.storage import Store
from tests.netlab import dns_query, dns_responder, make_cert, tls_sink, veth_lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
CONFIG = """
tenants:
  - name: acme
    match: {cgroup: "/lt-e2e-acme*"}
  - name: globex
    match: {uids: [4711]}
  - name: initech
    match: {cidrs: ["198.18.30.11/32"]}
tokens: {reader: [reader-token-0123456789]}
"""
UPLOAD = 1_500_000


def _client(sni: str | None, source: str | None, prefix: list[str]) -> subprocess.Popen[str]:
    code = (
        "from tests.netlab import tls_upload; "
        f"tls_upload('198.18.30.2', 443, {sni!r}, {UPLOAD}, source={source!r})"
    )
    return subprocess.Popen(
        [*prefix, sys.executable, "-c", code], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def test_flows_attributed_by_cgroup_uid_cidr_and_dns(tmp_path: Path) -> None:
    mount = find_cgroup2_mount()
    assert mount is not None, "no cgroup2 mount"
    cgroup = mount / "lt-e2e-acme-1"
    cgroup.mkdir(exist_ok=True)
    cert, key = make_cert(tmp_path, "crm.test")
    store = Store(tmp_path / "lt.db")
    try:
        with (
            veth_lab("lt-t4", "198.18.30.1", "198.18.30.2", prefix=24,
                     extra_host_ips=("198.18.30.11",)) as lab,
            tls_sink(lab, cert, key),
            dns_responder(lab, "198.18.30.2"),
        ):
            config = parse_config(CONFIG)
            agent = Agent(config, [lab.host_if], store, pin=False)
            agent.start()
            try:
                before = lab.tx_bytes()
                answer = dns_query("198.18.30.2", "initech.zendesk.com")
                assert len(answer) > 12
                in_cgroup = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$@"']
                as_uid = ["setpriv", "--reuid", "4711", "--regid", "4711", "--clear-groups"]
                clients = [
                    _client("acme.my.salesforce.com", "198.18.30.1", in_cgroup),
                    _client("api.hubapi.com", "198.18.30.1", as_uid),
                    _client(None, "198.18.30.11", []),
                ]
                for c in clients:
                    _, err = c.communicate(timeout=60)
                    assert c.returncode == 0, err
                time.sleep(0.3)
                tx = lab.tx_bytes() - before
                agent.poll_once()
                client = TestClient(create_app(agent, ["reader-token-0123456789"], [],
                                               manage=False))
                auth = {"Authorization": "Bearer reader-token-0123456789"}
                flows = client.get("/v1/flows", headers=auth).json()["flows"]
                by_tenant = client.get("/v1/flows?tenant=acme", headers=auth).json()["flows"]
                tenants = client.get("/v1/tenants", headers=auth).json()["tenants"]
                volume = client.get("/v1/tenants/globex/volume", headers=auth).json()
                metrics = client.get("/metrics", headers=auth).text
                kernel_names = agent.attributor.kernel_names.stats
                stats = dict(agent.stats)
            finally:
                agent.stop()
    finally:
        store.close()
        cgroup.rmdir()

    tls = {f["tenant"]: f for f in flows if f["dport"] == 443}
    assert set(tls) == {"acme", "globex", "initech"}, [
        (f["tenant"], f["uid"], f["sni"], f["cgroup"], f["src"]) for f in flows]
    acme, globex, initech = tls["acme"], tls["globex"], tls["initech"]
    assert (acme["sni"], acme["crm_vendor"], acme["crm_instance"]) == (
        "acme.my.salesforce.com", "salesforce", "acme")
    assert acme["cgroup"] == "/lt-e2e-acme-1"
    assert (globex["sni"], globex["crm_vendor"], globex["uid"]) == (
        "api.hubapi.com", "hubspot", 4711)
    assert initech["sni"] is None
    assert initech["dns_names"] == ["initech.zendesk.com"]
    assert (initech["crm_vendor"], initech["crm_instance"]) == ("zendesk", "initech")
    assert initech["src"] == "198.18.30.11"
    assert [f["tenant"] for f in by_tenant] == ["acme"]
    # issue 12: the two SNI hellos were named in the kernel (lt_names), not from the ring;
    # the SNI-less one went to the ring, counted by reason
    assert (kernel_names.named, kernel_names.no_name) == (2, 1)
    assert (stats["cnt_sni_named"], stats["cnt_sni_no_name"], stats["cnt_sni_to_ring"]) == (
        2, 1, 1)
    assert 'leaktap_kernel_events_total{reason="cnt_sni_to_ring"} 1.0' in metrics
    assert 'leaktap_userspace_dropped_total{reason="malformed",stage="kernel_names"} 0.0' in (
        metrics)
    counted = sum(f["bytes_out"] for f in tls.values())
    assert 3 * UPLOAD < counted
    assert abs(counted - tx) <= 0.01 * tx, (counted, tx)
    assert {t["tenant"] for t in tenants} >= {"acme", "globex", "initech", "unassigned"}
    assert sum(p["bytes_out"] for p in volume["series"]) == globex["bytes_out"]
    with sqlite3.connect(tmp_path / "lt.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        stored = db.execute("SELECT SUM(bytes_out) FROM minute_buckets").fetchone()[0]
    assert stored >= counted
