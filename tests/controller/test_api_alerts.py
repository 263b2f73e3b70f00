"""The REST API on real objects (Store, AlertManager, OutboxDispatcher) through
TestClient: every path without a token, with a reader and an admin token, invalid
parameters (422, never 500), alert transitions, the audit and the metrics."""

from __future__ import annotations

import json
import logging
import sqlite3
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from leaktap.analytics.alert_settings import AlertsSettings, OutboxSettings
from leaktap.analytics.alerts import AlertManager, Finding, SinkRoute
from leaktap.analytics.outbox import OutboxDispatcher
from leaktap.analytics.sinks.file import FileSettings, FileSink
from leaktap.controller.agent import api_server, is_loopback
from leaktap.controller.api.main import create_app
from leaktap.controller.config import TlsConfig, parse_config
from leaktap.controller.storage import Store

READER = "reader-token-0123456789"
ADMIN = "admin-token-0123456789ab"
T0 = 1_704_110_400.0
SYN, SYNACK, FIN, RST = 1, 2, 4, 8

CONFIG = """
tenants:
  - name: acme
    match: {sni: "{tenant}.my.salesforce.com"}
    allow: ["salesforce:acme"]
"""


class AgentView:
    """What the routes read from a running Agent, without the kernel."""

    def __init__(self, store: Store, alerts: AlertManager, outbox: OutboxDispatcher) -> None:
        self.config = parse_config(CONFIG)
        self.config_tenant_names = {t.name for t in self.config.tenants}
        self.store, self.alerts, self.outbox = store, alerts, outbox
        self.stats = {"cnt_flow_new": 10, "loss_ringbuf_full": 3, "loss_flow_insert": 1,
                      "parse_not_ip": 2}
        self.totals = {0: (5000, 50), 1: (2500, 25)}
        self.cgroup_totals = {1234: (5000, 50)}
        self.unattributed_bytes = 17
        self.table: list[object] = []
        self.interfaces = ["lt-test0"]
        self.attached = True
        self.probes = SimpleNamespace(attach_modes={"lt-test0": "tc"})
        self.egress_by_destination = {("acme", "salesforce", "acme"): (4096, 8),
                                      ("unassigned", "", ""): (904, 42)}

    def ready(self) -> tuple[bool, str]:
        return True, "ok"

    def flow_records(self, **filters: Any) -> list[dict[str, Any]]:
        return self.store.flows(**filters)


def flow(n: int, flags_out: int, flags_in: int, proto: str = "tcp") -> dict[str, Any]:
    return {
        "id": None, "family": 4, "proto": proto, "src": "198.18.0.1", "sport": 40000 + n,
        "dst": "198.18.0.2", "dport": 443, "sni": "acme.my.salesforce.com", "dns_names": [],
        "crm_vendor": "salesforce", "crm_instance": "acme", "tenant": "acme", "cgroup": None,
        "uid": None, "bytes_out": 100 * n, "packets_out": n, "bytes_in": 0, "packets_in": 0,
        "first_seen": T0 + n, "last_seen": T0 + n, "flags_out": flags_out, "flags_in": flags_in,
    }


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentView]:
    store = Store(tmp_path / "lt.db")
    store.write({}, [
        flow(1, SYN | FIN, SYNACK | FIN),  # completed
        flow(2, SYN, 0),  # unanswered
        flow(3, SYN, RST),  # refused
        flow(4, SYN | RST, SYNACK),  # reset after the handshake
        flow(5, 0, 0, proto="udp"),  # not TCP: no handshake to audit
    ])
    sink = FileSink(FileSettings(type="file", path=str(tmp_path / "alerts.jsonl")))
    outbox = OutboxDispatcher(store.path, [sink], OutboxSettings(backoff_base_s=0.01))
    alerts = AlertManager(store.path, [SinkRoute("file"), SinkRoute("gone")], AlertsSettings(),
                          on_change=outbox.notify)
    alerts.record(Finding(kind="unsanctioned_destination", tenant="acme", severity="critical",
                          summary="acme -> salesforce:globex", crm_vendor="salesforce",
                          crm_instance="globex", ts=T0))
    alerts.record(Finding(kind="canary_token", tenant="globex", severity="high",
                          summary="canary seen", ts=T0 + 100))
    outbox.start()
    yield AgentView(store, alerts, outbox)
    outbox.stop()
    alerts.close()
    store.close()


@pytest.fixture
def client(agent: AgentView) -> Iterator[TestClient]:
    app = create_app(agent, readers=[READER], admins=[ADMIN], manage=False)
    with TestClient(app) as c:
        yield c


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


READ_PATHS = [
    "/v1/dataflows",
    "/readyz", "/v1/flows", "/v1/tenants", "/v1/tenants/acme/volume", "/v1/alerts",
    "/v1/alerts/1", "/v1/audit", "/v1/sinks", "/v1/stats", "/v1/whoami", "/metrics",
    "/openapi.json", "/docs", "/", "/ui/app.js", "/v1/fingerprints", "/v1/coverage",
]
# served to browsers, not part of the API schema
UNDOCUMENTED = ("/docs", "/openapi.json", "/", "/ui/app.js")
ADMIN_PATHS = ["/v1/alerts/1/ack", "/v1/alerts/1/resolve", "/v1/canaries",
               "/v1/sinks/file/retry", "/v1/fingerprints", "/v1/config/reload"]
DELETE_PATHS = ["/v1/fingerprints/acme/contacts"]


def _template(path: str) -> str:
    return (path.replace("/1", "/{alert_id}").replace("/acme", "/{tenant}")
            .replace("/file/", "/{name}/").replace("/contacts", "/{name}"))


def test_the_lists_above_cover_every_route(client: TestClient) -> None:
    schema = client.get("/openapi.json", headers=auth(READER)).json()
    routes = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    templated = {_template(p) for p in READ_PATHS + ADMIN_PATHS + DELETE_PATHS
                 if p not in UNDOCUMENTED}
    assert {p for _, p in routes} == templated | {"/healthz"}
    assert {p for m, p in routes if m == "POST"} == {_template(p) for p in ADMIN_PATHS}
    assert {p for m, p in routes if m == "DELETE"} == {_template(p) for p in DELETE_PATHS}


@pytest.mark.parametrize("path", DELETE_PATHS)
def test_a_delete_needs_an_admin(client: TestClient, path: str) -> None:
    assert client.delete(path).status_code == 401
    response = client.delete(path, headers=auth(READER))
    assert response.status_code == 403 and response.json()["detail"] == "admin token required"


@pytest.mark.parametrize("path", READ_PATHS + ADMIN_PATHS)
@pytest.mark.parametrize("header", [None, "Bearer wrong-token-0123456789", "Basic abc",
                                    f"bearer{READER}", ""])
def test_every_path_but_healthz_needs_a_valid_token(
    client: TestClient, path: str, header: str | None
) -> None:
    headers = {} if header is None else {"Authorization": header}
    method = client.post if path in ADMIN_PATHS else client.get
    response = method(path, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("path", READ_PATHS)
def test_a_reader_reads(client: TestClient, path: str) -> None:
    assert client.get(path, headers=auth(READER)).status_code == 200


@pytest.mark.parametrize("path", ADMIN_PATHS)
def test_a_reader_cannot_change_state(client: TestClient, path: str) -> None:
    # the canary body is valid, so only the role can refuse it
    response = client.post(path, headers=auth(READER), json={"token": "CANARY-0123456789"})
    assert response.status_code == 403 and response.json()["detail"] == "admin token required"
    assert client.get("/v1/alerts/1", headers=auth(READER)).json()["status"] == "open"


@pytest.mark.parametrize("path", READ_PATHS)
def test_an_admin_reads_too(client: TestClient, path: str) -> None:
    assert client.get(path, headers=auth(ADMIN)).status_code == 200


def test_tokens_never_reach_the_logs(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        client.get("/v1/alerts", headers=auth("bad-token-but-logged?-0123"))
        client.post("/v1/alerts/1/ack", headers=auth(ADMIN))
    assert "bad-token-but-logged" not in caplog.text and ADMIN not in caplog.text


def test_admin_acknowledges_then_resolves(client: TestClient, agent: AgentView) -> None:
    response = client.post("/v1/alerts/1/ack", headers=auth(ADMIN), json={"actor": "alice"})
    assert response.status_code == 200
    body = response.json()
    assert body["changed"] is True
    assert (body["alert"]["status"], body["alert"]["acknowledged_by"]) == (
        "acknowledged", "api:alice")
    again = client.post("/v1/alerts/1/ack", headers=auth(ADMIN)).json()
    assert again["changed"] is False
    resolved = client.post("/v1/alerts/1/resolve", headers=auth(ADMIN)).json()
    assert resolved["alert"]["status"] == "resolved"
    assert resolved["alert"]["resolved_by"] == "api:admin"
    conflict = client.post("/v1/alerts/1/ack", headers=auth(ADMIN))
    assert conflict.status_code == 409 and "resolved" in conflict.json()["detail"]
    missing = client.post("/v1/alerts/999/resolve", headers=auth(ADMIN))
    assert missing.status_code == 404
    assert agent.outbox.wait_idle(5)
    deliveries = client.get("/v1/alerts/1", headers=auth(READER)).json()["deliveries"]
    states = {(d["sink"], d["action"]): d["state"] for d in deliveries}
    assert states == {("file", "trigger"): "delivered", ("file", "acknowledge"): "delivered",
                      ("file", "resolve"): "delivered", ("gone", "trigger"): "pending",
                      ("gone", "acknowledge"): "pending", ("gone", "resolve"): "pending"}
    (file_delivery,) = [d for d in deliveries if d == deliveries[0]]
    assert file_delivery["attempts"] == 1 and file_delivery["delivered_ts"] is not None


def test_alert_filters(client: TestClient) -> None:
    def tenants(query: str) -> list[str]:
        response = client.get(f"/v1/alerts?{query}", headers=auth(READER))
        assert response.status_code == 200, response.text
        return [a["tenant"] for a in response.json()["alerts"]]

    assert tenants("") == ["globex", "acme"]
    assert tenants("status=open&tenant=acme") == ["acme"]
    assert tenants("kind=canary_token") == ["globex"]
    assert tenants(f"since={T0 + 50}") == ["globex"]
    assert tenants("status=resolved") == []
    assert tenants("limit=1&offset=1") == ["acme"]


def test_cached_alert_pages_follow_every_change(client: TestClient, agent: AgentView) -> None:
    def statuses() -> list[tuple[str, str]]:
        body = client.get("/v1/alerts", headers=auth(READER)).json()
        return [(a["tenant"], a["status"]) for a in body["alerts"]]

    # The outbox's first deliveries commit too; a page is cached only between commits.
    assert agent.outbox.wait_idle(5)
    assert statuses() == statuses() == [("globex", "open"), ("acme", "open")]
    cache = client.app.state.response_cache  # type: ignore[attr-defined]
    assert cache.hits >= 1
    client.post("/v1/alerts/1/ack", headers=auth(ADMIN))  # through the same manager
    assert statuses() == [("globex", "open"), ("acme", "acknowledged")]
    other = AlertManager(agent.store.path)  # another connection, as another process would
    other.record(Finding(kind="bulk_export", tenant="initech", severity="low", summary="x"))
    other.close()
    assert [t for t, _ in statuses()] == ["initech", "globex", "acme"]
    def gone_states() -> set[str]:
        body = client.get("/v1/alerts", headers=auth(READER)).json()
        return {d["state"] for a in body["alerts"] for d in a["deliveries"] if d["sink"] == "gone"}

    assert gone_states() == gone_states() == {"pending"}
    with sqlite3.connect(agent.store.path) as db:  # a delivery state written elsewhere
        db.execute("UPDATE outbox SET state = 'failed' WHERE sink = 'gone'")
    assert gone_states() == {"failed"}


@pytest.mark.parametrize(("method", "path", "body"), [
    ("get", "/v1/alerts?status=bogus", None),
    ("get", "/v1/alerts?kind=not_a_kind", None),
    ("get", "/v1/alerts?limit=-1", None),
    ("get", "/v1/alerts?limit=0", None),
    ("get", "/v1/alerts?limit=100000", None),
    ("get", "/v1/alerts?offset=-1", None),
    ("get", "/v1/alerts?offset=99999999999999999999999", None),
    ("get", "/v1/alerts?since=yesterday", None),
    ("get", "/v1/alerts?since=nan", None),
    ("get", "/v1/alerts?since=-5", None),
    ("get", "/v1/alerts?tenant=", None),
    ("get", "/v1/alerts/0", None),
    ("get", "/v1/alerts/abc", None),
    ("get", "/v1/alerts/99999999999999999999", None),
    ("post", "/v1/alerts/1/ack", {"actor": "has spaces"}),
    ("post", "/v1/alerts/1/ack", {"who": "alice"}),
    ("post", "/v1/alerts/1/resolve", "not json"),
    ("post", "/v1/alerts/-3/resolve", None),
    ("get", "/v1/audit?limit=-1", None),
    ("get", "/v1/audit?attempted=maybe", None),
    ("get", "/v1/audit?since=inf", None),
    ("get", "/v1/flows?limit=0", None),
    ("get", "/v1/flows?since=-inf", None),
    ("get", "/v1/tenants/acme/volume?since=10&until=5", None),
])
def test_invalid_parameters_are_422_with_a_message(
    client: TestClient, method: str, path: str, body: Any
) -> None:
    kwargs: dict[str, Any] = {"headers": auth(ADMIN)}
    if isinstance(body, str):
        kwargs["content"] = body
        kwargs["headers"] = {**kwargs["headers"], "Content-Type": "application/json"}
    elif body is not None:
        kwargs["json"] = body
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/v1/alerts", "/v1/audit", "/v1/flows", "/v1/tenants"]),
    params=st.dictionaries(
        st.sampled_from(["status", "tenant", "kind", "since", "limit", "offset", "attempted",
                         "vendor", "until"]),
        st.one_of(st.text(max_size=30), st.integers(-2**70, 2**70).map(str),
                  st.floats().map(str)),
        max_size=4,
    ),
)
def test_no_query_makes_a_500(client: TestClient, path: str, params: dict[str, str]) -> None:
    response = client.get(path, params=params, headers=auth(READER))
    assert response.status_code in (200, 422), (path, params, response.text)


def test_audit_classifies_transfers_and_attempts(client: TestClient) -> None:
    transfers = client.get("/v1/audit", headers=auth(READER)).json()["transfers"]
    assert {t["sport"]: t["outcome"] for t in transfers} == {
        40001: "completed", 40002: "unanswered", 40003: "refused", 40004: "reset"}
    attempts = client.get("/v1/audit?attempted=true", headers=auth(READER)).json()["transfers"]
    assert sorted(t["sport"] for t in attempts) == [40002, 40003, 40004]
    recent = client.get(f"/v1/audit?since={T0 + 3}&tenant=acme", headers=auth(READER))
    assert sorted(t["sport"] for t in recent.json()["transfers"]) == [40003, 40004]


def test_sink_states(client: TestClient, agent: AgentView) -> None:
    assert agent.outbox.wait_idle(5)
    sinks = {s["sink"]: s for s in client.get("/v1/sinks", headers=auth(READER)).json()["sinks"]}
    assert sinks["file"]["configured"] and sinks["file"]["delivered"] == 2
    assert not sinks["gone"]["configured"] and sinks["gone"]["pending"] == 2


def test_metrics(client: TestClient, agent: AgentView) -> None:
    assert agent.outbox.wait_idle(5)
    text = client.get("/metrics", headers=auth(READER)).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("leaktap_egress_bytes_total", tenant="acme", vendor="salesforce",
                 instance="acme") == 4096
    assert value("leaktap_egress_packets_total", tenant="unassigned", vendor="",
                 instance="") == 42
    assert value("leaktap_unattributed_bytes_total") == 17
    assert value("leaktap_events_dropped_total", ring="lt_events", reason="ringbuf_full") == 3
    assert value("leaktap_events_dropped_total", ring="lt_flows", reason="flow_insert") == 1
    assert not any(n == "leaktap_events_dropped_total" and ("reason", "not_ip") in labels
                   for n, labels in samples)
    assert value("leaktap_alerts_total", kind="unsanctioned_destination", severity="critical") == 1
    assert value("leaktap_alerts_total", kind="canary_token", severity="high") == 1
    assert value("leaktap_sink_deliveries_total", sink="file", outcome="delivered") == 2
    assert value("leaktap_outbox_pending", sink="file") == 0
    assert value("leaktap_outbox_pending", sink="gone") == 2
    assert value("leaktap_probe_attached", interface="lt-test0", mode="tc") == 1


def test_config_sections_for_alerting() -> None:
    config = parse_config("""
environment: prod
tls: {certfile: /etc/leaktap/tls.crt, keyfile: /etc/leaktap/tls.key}
alerts:
  suppression: {unsanctioned_destination: 900}
  auto_resolve_after_s: 1800
  outbox: {backoff_base_s: 2, backoff_max_s: 600}
sinks:
  - {type: pagerduty, routing_key: "R0UTINGKEY0123456789abcdef012345", min_severity: high}
  - {type: webhook, url: "https://soc.example.net/hook", secret: "0123456789abcdef0123"}
  - {type: syslog, address: "tcp://127.0.0.1:6514", facility: local4}
  - {type: file, path: /var/log/leaktap/alerts.jsonl, max_bytes: 1048576, keep: 3}
""")
    assert [s.sink_name for s in config.sinks] == ["pagerduty", "webhook", "syslog", "file"]
    assert config.alerts.suppression == {"unsanctioned_destination": 900}
    assert config.tls is not None and config.environment == "prod"


@pytest.mark.parametrize(("text", "message"), [
    ("sinks:\n  - {type: pagerduty}\n", "<config>:2: sinks[0]: routing_key or routing_key_file"),
    ("sinks:\n  - type: webhook\n    url: ftp://x\n", "<config>:3: sinks[0].url: expected an http"),
    ("sinks:\n  - {type: syslog, address: '127.0.0.1:514'}\n", "sinks[0].address: expected udp://"),
    ("sinks:\n  - {type: file, path: /x, keep: -1}\n", "<config>:2: sinks[0].keep:"),
    ("sinks:\n  - {type: file, path: /x, colour: red}\n", "sinks[0].colour: unknown key"),
    ("sinks:\n  - {type: carrier_pigeon}\n", "<config>:2: sinks[0]: Input tag 'carrier_pigeon'"),
    ("sinks:\n  - {type: file, path: /a}\n  - {type: file, path: /b}\n",
     "more than one sink named file"),
    ("alerts:\n  suppression: {volume_anomly: 60}\n",
     "<config>:2: alerts.suppression.volume_anomly"),
    ("tls: {certfile: /a}\n", "tls.keyfile: Field required"),
])
def test_config_errors_name_the_key_and_line(text: str, message: str) -> None:
    from leaktap.controller.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert message in str(info.value)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("::1", True), ("localhost", True), ("127.8.0.1", True),
    ("0.0.0.0", False), ("::", False), ("198.18.0.1", False), ("api.example.net", False),
])
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_plain_http_off_loopback_warns(agent: AgentView, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(agent, readers=[READER], admins=[ADMIN], manage=False)
    with caplog.at_level(logging.WARNING):
        api_server(app, "198.18.0.1", 8470, None)  # built, never bound
    assert "without TLS" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        api_server(app, "127.0.0.1", 8470, None)
    assert caplog.text == ""


def test_tls_is_served_with_the_configured_certificate(agent: AgentView, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=leaktap", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    app = create_app(agent, readers=[READER], admins=[ADMIN], manage=False)
    server = api_server(app, "127.0.0.1", 0, TlsConfig(certfile=str(cert), keyfile=str(key)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as c:
            response = c.get(f"https://127.0.0.1:{port}/v1/alerts", headers=auth(READER))
        assert response.status_code == 200 and len(response.json()["alerts"]) == 2
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)  # no plain HTTP
    finally:
        server.should_exit = True
        thread.join(10)


def test_file_sink_output_is_json_lines(agent: AgentView, tmp_path: Path) -> None:
    assert agent.outbox.wait_idle(5)
    lines = (tmp_path / "alerts.jsonl").read_text().splitlines()
    assert [json.loads(line)["alert"]["kind"] for line in lines] == [
        "unsanctioned_destination", "canary_token"]


def test_canaries_need_plaintext_inspection_and_a_valid_body(client: TestClient) -> None:
    token = "CANARY-7f3a9c2e41"
    response = client.post("/v1/canaries", headers=auth(ADMIN), json={"token": token})
    assert response.status_code == 409
    assert "plaintext.enabled" in response.json()["detail"] and token not in response.text
    short = client.post("/v1/canaries", headers=auth(ADMIN), json={"token": "abc"})
    assert short.status_code == 422
