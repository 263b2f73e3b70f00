"""CRM data flows end to end (issue 14.1, 14.6): real clients in a tenant cgroup call a
TLS server in a network namespace that answers each vendor's REST grammar with
JSON bodies of known record counts (tests/e2e/crm_api_server.py, the calls of
tests/analytics/crm_fixtures.py). The monitor's uprobes see the requests
written and the responses read, pair them, and the data-flow map must count
exactly the requests and records per (vendor, instance, object, operation,
direction), read back from GET /v1/dataflows (a real SQLite store and uvicorn);
a 403 is an attempted transfer in /v1/audit (refused), a request the server
never answers one too (unanswered); nothing of the bodies is kept, in the
database or the answers.

Clients: `requests` (HTTP/1.1, keep-alive; gzip and chunked answers),
`http.client` (HTTP/1.1, identity), httpx (HTTP/2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leaktap.analytics.alert_settings import AlertsSettings
from leaktap.analytics.alerts import AlertManager
from leaktap.analytics.plaintext import crm_api
from leaktap.analytics.plaintext.dataflows import DataFlowMap, DataFlowSettings
from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.commands.doctor import find_cgroup2_mount
from leaktap.controller.config import parse_config
from leaktap.controller.plaintext.monitor import PlaintextMonitor
from leaktap.controller.storage import Store
from tests.analytics.crm_fixtures import FIXTURES, SECRETS, Call
from tests.controller.test_api_dataflows import AgentView, get, serve
from tests.e2e.crm_api_server import REFUSED_TARGET, SILENT_TARGET
from tests.e2e.test_plaintext_tls import GATE, in_cgroup, py, run_probed
from tests.netlab import make_cert, veth_lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
HOST_IP, CRM_IP = "198.18.141.1", "198.18.141.2"
LIBSSL = "/lib/x86_64-linux-gnu/libssl.so.3"
CGROUP = "lt-df-acme"
TIMEOUT_S = 2.0  # plaintext.streams.exchange_timeout_s: the silent call comes out after it
HOSTS = {"salesforce": "acme.my.salesforce.com", "hubspot": "api.hubapi.com",
         "dynamics365": "contoso.crm.dynamics.com", "zendesk": "acme.zendesk.com",
         "zoho": "www.zohoapis.com", "pipedrive": "acme.pipedrive.com"}
INSTANCES = {"salesforce": "acme", "hubspot": "", "dynamics365": "contoso", "zendesk": "acme",
             "zoho": "", "pipedrive": "acme"}
CONFIG = f"""
tenants:
  - name: acme
    match: {{cgroup: "/{CGROUP}*"}}
plaintext:
  enabled: true
  select: {{cgroups: ["/{CGROUP}*"]}}
  streams: {{exchange_timeout_s: {TIMEOUT_S}}}
"""

# argv[1]: JSON [[host, method, target, body, status], ...]; status -1: never answered.
# Each client calls only once told that it is probed (`go`): the exec-to-probe
# race is test_plaintext_tls's subject, counting the calls is this file's
REQUESTS_CLIENT = f"""
import json, sys, requests, urllib3
{GATE}
urllib3.disable_warnings()
with requests.Session() as s:
    for host, method, target, body, status in json.loads(sys.argv[1]):
        try:
            r = s.request(method, "https://{CRM_IP}" + target, data=body.encode() or None,
                          headers={{"Host": host}}, verify=False, timeout=1.5)
        except requests.exceptions.ReadTimeout:
            assert status == -1, target
            continue
        assert r.status_code == status, (target, r.status_code)
        assert status == 204 or r.content, target
print("ok")
"""
HTTP_CLIENT = f"""
import http.client, json, ssl, sys
{GATE}
c = http.client.HTTPSConnection("{CRM_IP}", 443, context=ssl._create_unverified_context(),
                                timeout=10)
for host, method, target, body, status in json.loads(sys.argv[1]):
    c.request(method, target, body=body.encode() or None, headers={{"Host": host}})
    r = c.getresponse()
    data = r.read()
    assert r.status == status, (target, r.status)
print("ok")
"""
HTTPX_CLIENT = f"""
import httpx, json, sys
{GATE}
with httpx.Client(http2=True, verify=False, timeout=10) as c:
    for host, method, target, body, status in json.loads(sys.argv[1]):
        r = c.request(method, "https://{CRM_IP}" + target, content=body.encode() or None,
                      headers={{"Host": host}})
        assert (r.status_code, r.http_version) == (status, "HTTP/2"), (target, r.status_code)
print("ok")
"""


def plan(calls: list[Call]) -> str:
    return json.dumps([[HOSTS[c.vendor], c.method, c.target, c.request.decode(), c.status]
                       for c in calls])


def expected_flows() -> dict[tuple[str, str, str, str, str], dict[str, int]]:
    """(vendor, instance, object, operation, direction) -> requests, records, outcomes."""
    want: dict[tuple[str, str, str, str, str], dict[str, int]] = defaultdict(
        lambda: {"requests": 0, "records": 0, "status_2xx": 0, "status_4xx": 0,
                 "status_none": 0})
    for vendor, calls in FIXTURES.items():
        for c in calls:
            row = want[vendor, INSTANCES[vendor], c.object, c.operation, c.direction]
            row["requests"] += 1
            row["records"] += c.records
            row[f"status_{c.status // 100}xx"] += 1
    for target, outcome in ((REFUSED_TARGET, "status_4xx"), (SILENT_TARGET, "status_none")):
        (call,) = crm_api.classify("salesforce", "GET", target, b"")
        row = want["salesforce", "acme", call.object, call.operation, "from_crm"]
        row["requests"] += 1
        row[outcome] += 1
    return dict(want)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    mount = find_cgroup2_mount()
    assert mount is not None, "no cgroup2 mount"
    tmp = tmp_path_factory.mktemp("dataflows")
    (mount / CGROUP).mkdir(exist_ok=True)
    cert, key = make_cert(tmp, "crm.test")
    try:
        with veth_lab("lt-df14", HOST_IP, CRM_IP, prefix=24) as net:
            server = subprocess.Popen(
                net.in_ns(sys.executable, "-m", "tests.e2e.crm_api_server", str(cert), str(key),
                          CRM_IP, "443"),
                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert server.stdout is not None and server.stdout.readline().strip() == "ready"
                yield {"mount": mount, "tmp": tmp}
            finally:
                server.kill()
                server.wait()
    finally:
        (mount / CGROUP).rmdir()


def client(lab: dict[str, Any], mon: PlaintextMonitor, code: str, calls: str) -> None:
    out = run_probed(mon, in_cgroup(lab["mount"], CGROUP, [*py(code), calls]), timeout=60)
    assert out.strip() == "ok", out[-2000:]


def test_each_vendors_calls_are_counted_per_object_with_refused_and_unanswered_ones(lab):
    config = parse_config(CONFIG)
    config = config.model_copy(update={"storage": config.storage.model_copy(
        update={"path": str(lab["tmp"] / "lt.db")})})
    store = Store(lab["tmp"] / "flows.db")
    alerts = AlertManager(store.path, [], AlertsSettings())
    flows = DataFlowMap(DataFlowSettings(flush_interval_s=3600), on_finding=alerts.record,
                        on_audits=lambda calls: store.add_audit_calls(
                            [a.as_dict() for a in calls]),
                        write=store.put_dataflows)
    mon = PlaintextMonitor(config, Attributor(config, cgroup_mount=lab["mount"]),
                           lambda f: None, lambda a: None, system_library=LIBSSL)
    mon.inspector.exchange_sinks.append(flows)
    refused = Call("salesforce", "GET", REFUSED_TARGET, b"", "Opportunity", "read", "from_crm",
                   0, status=403)
    silent = Call("salesforce", "GET", SILENT_TARGET, b"", "Lead", "read", "from_crm", 0,
                  status=-1)
    mon.start()
    try:
        client(lab, mon, REQUESTS_CLIENT,
               plan([*FIXTURES["salesforce"], *FIXTURES["dynamics365"], refused, silent]))
        client(lab, mon, HTTP_CLIENT,
               plan([*FIXTURES["zendesk"], *FIXTURES["zoho"], *FIXTURES["pipedrive"]]))
        client(lab, mon, HTTPX_CLIENT, plan(FIXTURES["hubspot"]))
        calls = sum(len(c) for c in FIXTURES.values()) + 2
        deadline = time.monotonic() + TIMEOUT_S + 5
        while flows.stats["exchanges"] < calls and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = mon.stats()
    finally:
        mon.stop()
    assert flows.stats["exchanges"] == calls, (dict(flows.stats), stats)
    assert stats["ssl_cnt_bytes_read"] == stats["ssl_cnt_bytes_read_captured"] > 0
    try:
        with serve(AgentView(store, alerts, flows)) as url:
            r = get(url, "/v1/dataflows", tenant="acme")
            a = get(url, "/v1/audit", tenant="acme", attempted="true")
        assert r.status_code == a.status_code == 200
        rows, attempts = r.json()["dataflows"], a.json()["calls"]
        kept = b"".join(Path(f"{store.path}{ext}").read_bytes()
                        for ext in ("", "-wal") if Path(f"{store.path}{ext}").exists())
    finally:
        alerts.close()
        store.close()
    got = {(r["crm_vendor"], r["crm_instance"] or "", r["object"], r["operation"],
            r["direction"]): {"requests": r["requests"], "records": r["records"],
                              **{f"status_{c}": r["outcomes"][c] for c in ("2xx", "4xx", "none")}}
           for r in rows}
    assert got == expected_flows()
    assert {r["exe"] for r in rows} == {os.path.realpath(sys.executable)}
    assert all(r["records_unknown"] == 0 for r in rows)
    # the 403s and the unanswered call are attempted transfers
    assert sorted((c["status"] or 0, c["outcome"], c["path"]) for c in attempts) == [
        (0, "unanswered", "/services/data/v59.0/sobjects/Lead/{id}"),
        (403, "refused", "/services/data/v59.0/query?q"),
        (403, "refused", "/services/data/v59.0/sobjects/Opportunity/{id}")]
    # nothing of the bodies or query values is kept, or served
    served = (r.text + a.text).encode()
    assert not [x for x in SECRETS if x.encode() in kept or x.encode() in served]
