"""GET /v1/dataflows and the attempted calls of /v1/audit (issue 14.3, 14.4) over a real
SQLite file and a real uvicorn server, fed by DataFlowMap.on_exchange with the vendor
fixtures: exact request and record counts per object; and the redaction scan: no
body, field value, record id or query-string value in the database or the answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from leaktap.analytics.alert_settings import AlertsSettings
from leaktap.analytics.alerts import AlertManager
from leaktap.analytics.plaintext.dataflows import DataFlowMap, DataFlowSettings
from leaktap.controller.api.main import create_app
from leaktap.controller.storage import Store
from tests.analytics.crm_fixtures import ALL_CALLS, SECRETS, T0, exchange
from tests.controller.test_dashboard import ADMIN, READER, serve

ACME_ROUNDS = 3  # every fixture call made this many times by acme


class AgentView:
    """What the data-flow and audit routes read from a running Agent."""

    def __init__(self, store: Store, alerts: AlertManager, dataflows: DataFlowMap) -> None:
        self.store, self.alerts, self.dataflows = store, alerts, dataflows


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentView, str, Path]]:
    tmp = tmp_path_factory.mktemp("dataflows")
    store = Store(tmp / "lt.db")
    alerts = AlertManager(store.path, [], AlertsSettings())
    fmap = DataFlowMap(DataFlowSettings(warmup_s=3600, flush_interval_s=3600),
                       on_finding=alerts.record,
                       on_audits=lambda calls: store.add_audit_calls(
                           [a.as_dict() for a in calls]),
                       write=store.put_dataflows)
    for i in range(ACME_ROUNDS):
        for call in ALL_CALLS:
            fmap.on_exchange(exchange(call, ts=T0 + i))
    fmap.flush()  # a periodic write; the rest is written by the request's flush
    for call in ALL_CALLS:
        fmap.on_exchange(exchange(call, tenant="globex", instance=None, ts=T0 + 7200,
                                  exe="/usr/bin/python3.11"))
    agent = AgentView(store, alerts, fmap)
    with serve(agent) as url:
        yield agent, url, tmp
    alerts.close()
    store.close()


def get(url: str, path: str, token: str | None = READER, **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(url + path, params=params, headers=headers, timeout=10)


def test_dataflows_give_exact_requests_and_records_per_object(lab: Any) -> None:
    _, url, _ = lab
    r = get(url, "/v1/dataflows", tenant="acme")
    assert r.status_code == 200
    rows = r.json()["dataflows"]
    got = {(d["crm_vendor"], d["crm_instance"], d["object"], d["operation"], d["direction"]):
           (d["requests"], d["records"]) for d in rows}
    expected: dict[tuple[str, str, str, str, str], tuple[int, int]] = {}
    for c in ALL_CALLS:
        key = (c.vendor, "acme", c.object, c.operation, c.direction)
        n, records = expected.get(key, (0, 0))
        expected[key] = (n + ACME_ROUNDS, records + ACME_ROUNDS * c.records)
    assert got == expected
    contact = next(d for d in rows if d["object"] == "Contact" and d["operation"] == "query")
    assert contact["outcomes"] == {"2xx": 3, "3xx": 0, "4xx": 0, "5xx": 0, "none": 0}
    assert contact["exe"] == "/opt/assistant/bin/crm-sync"
    assert contact["data_classes"] == ["email", "free_text", "national_id", "phone"]
    assert (contact["first_seen"], contact["last_seen"]) == (T0, T0 + 2)
    lead = next(d for d in rows if d["object"] == "Lead")
    assert lead["outcomes"]["4xx"] == 3 and lead["records"] == 0


def test_dataflows_filter_by_tenant_and_since_and_need_a_token(lab: Any) -> None:
    _, url, _ = lab
    everyone = get(url, "/v1/dataflows").json()["dataflows"]
    globex = get(url, "/v1/dataflows", tenant="globex").json()["dataflows"]
    recent = get(url, "/v1/dataflows", since=T0 + 3600).json()["dataflows"]
    assert {d["tenant"] for d in everyone} == {"acme", "globex"}
    assert len(globex) == len(everyone) // 2 and {d["crm_instance"] for d in globex} == {None}
    assert sorted(json.dumps(d, sort_keys=True) for d in recent) == sorted(
        json.dumps(d, sort_keys=True) for d in globex)
    assert sum(d["requests"] for d in globex) == len(ALL_CALLS)
    assert get(url, "/v1/dataflows", token=None).status_code == 401
    assert get(url, "/v1/dataflows", token="wrong-token-0123456789").status_code == 401
    assert get(url, "/v1/dataflows", since=-1).status_code == 422
    assert get(url, "/v1/dataflows", tenant="").status_code == 422


def test_audit_lists_attempted_calls_with_their_status(lab: Any) -> None:
    _, url, _ = lab
    attempts = get(url, "/v1/audit", attempted="true", tenant="acme").json()["calls"]
    assert [(c["operation"], c["status"], c["outcome"], c["path"]) for c in attempts] == [
        ("salesforce:query.Lead", 403, "refused", "/services/data/v59.0/query?q")] * ACME_ROUNDS
    every = get(url, "/v1/audit").json()["calls"]
    assert len(every) == ACME_ROUNDS + 1  # the globex attempt too


def test_admin_actions_and_no_new_flow_alerts_in_the_warm_up(lab: Any) -> None:
    agent, _, _ = lab
    alerts = agent.alerts.list_alerts()
    kinds = sorted({(a["kind"], a["tenant"]) for a in alerts})
    assert kinds == [("crm_admin_action", "acme"), ("crm_admin_action", "globex")]
    acme = sorted((a["evidence"]["object"], a["severity"], a["count"]) for a in alerts
                  if a["tenant"] == "acme")
    assert acme == [("PermissionSetAssignment", "high", 3), ("permissionSets", "low", 3),
                    ("profiles", "low", 3), ("systemusers", "high", 3), ("users", "high", 3),
                    ("users", "high", 3)]


def test_no_body_value_or_query_value_at_rest_or_in_answers(lab: Any) -> None:
    _, url, tmp = lab
    answers = (get(url, "/v1/dataflows").content + get(url, "/v1/audit").content)
    database = b"".join(p.read_bytes() for p in tmp.glob("lt.db*"))
    assert b"PermissionSetAssignment" in database and b"crm_admin_action" in database
    for where, content in (("database", database), ("API answers", answers)):
        for value in SECRETS:
            for form in (value, json.dumps(value)[1:-1], value.replace(" ", "+")):
                assert form.encode() not in content, f"{value!r} found in the {where}"


def test_the_agent_wires_the_map_to_the_read_side_and_the_store(tmp_path: Path) -> None:
    """Agent._start_dataflows: the map joins the inspector's exchange sinks, resumes from
    the stored rows, is written when due and at stop, and its findings become alerts."""
    from types import SimpleNamespace

    from leaktap.controller.agent import Agent
    from leaktap.controller.config import parse_config

    now = time.time()  # the stored rows are restored within the retention
    store = Store(tmp_path / "lt.db")
    config = parse_config("plaintext: {enabled: true, dataflows: {warmup_s: 0}}")
    agent = Agent(config, ["lt-none"], store)
    agent.alerts = AlertManager(store.path, [], AlertsSettings())
    sinks: list[Any] = []
    agent.plaintext = SimpleNamespace(inspector=SimpleNamespace(exchange_sinks=sinks))
    query = next(c for c in ALL_CALLS if c.object == "Contact" and c.operation == "query")
    psa = next(c for c in ALL_CALLS if c.object == "PermissionSetAssignment")
    store.put_dataflows([{
        "tenant": "acme", "exe": "/opt/assistant/bin/crm-sync", "crm_vendor": "salesforce",
        "crm_instance": "acme", "object": "Contact", "operation": "query",
        "direction": "from_crm", "requests": 10, "records": 30, "records_unknown": 0,
        "request_bytes": 0, "response_bytes": 100, "status_2xx": 10, "status_3xx": 0,
        "status_4xx": 0, "status_5xx": 0, "status_none": 0, "data_classes": ["email"],
        "templates": ["/services/data/v59.0/query?q"], "first_seen": now - 60,
        "last_seen": now - 1}])
    try:
        agent._start_dataflows()
        assert sinks == [agent.dataflows]
        sinks[0].on_exchange(exchange(query, ts=now))  # known before: no new_data_flow
        sinks[0].on_exchange(exchange(psa, ts=now + 1))
        assert agent.dataflows.due(agent.dataflows.clock() + 3600)
    finally:
        agent._exit.close()  # the stop writes what is left
    rows = {(r["object"], r["operation"]): r for r in store.dataflows()}
    assert (rows[("Contact", "query")]["requests"], rows[("Contact", "query")]["records"]) == (
        11, 33)
    assert rows[("PermissionSetAssignment", "admin")]["requests"] == 1
    assert [a["kind"] for a in agent.alerts.list_alerts()] == ["crm_admin_action"]
    agent.alerts.close()
    store.close()


def test_stats_show_the_maps_counters(lab: Any) -> None:
    from fastapi.testclient import TestClient

    agent, _, _ = lab

    class StatsView(AgentView):
        stats: dict[str, int] = {}
        unattributed_bytes = 0
        interfaces: list[str] = []
        attached = False
        probes = None

    view = StatsView(agent.store, agent.alerts, agent.dataflows)
    with TestClient(create_app(view, readers=[READER], admins=[ADMIN], manage=False)) as c:
        body = c.get("/v1/stats", headers={"Authorization": f"Bearer {READER}"}).json()
    assert body["dataflows"]["exchanges"] == (ACME_ROUNDS + 1) * len(ALL_CALLS)
    assert body["dataflows"]["finding_crm_admin_action"] == 6 * (ACME_ROUNDS + 1)
