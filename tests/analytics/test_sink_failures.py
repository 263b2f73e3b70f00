"""Sink answers that must not drop an alert for good (issue 17.3), and what of a
receiver's answer may be kept (17.4): real local receivers, the real outbox,
the API through TestClient."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from leaktap.analytics.alert_settings import AlertsSettings, OutboxSettings
from leaktap.analytics.alerts import AlertManager, Finding, SinkRoute
from leaktap.analytics.outbox import OutboxDispatcher
from leaktap.analytics.sinks.base import Sink
from leaktap.analytics.sinks.pagerduty import PagerDutySettings, PagerDutySink
from leaktap.analytics.sinks.redact import EXCERPT_MAX, Redactor
from leaktap.analytics.sinks.webhook import WebhookSettings, WebhookSink
from leaktap.controller.api.main import create_app
from leaktap.controller.storage import Store
from tests.analytics.receivers import HttpReceiver, PagerDutyReceiver, running

KEY = "R0UTINGKEY0123456789abcdef012345"
ROTATED_KEY = "NEWR0UTINGKEY9876543210fedcba98"
BEARER = "proxy-bearer-token-7f3a9c1e5b"
HMAC_SECRET = "webhook-hmac-secret-0123456789"
PATH_TOKEN = "T0K3N1nTheUrlPath9f8e7d6c"  # as in Slack-style webhook URLs
READER, ADMIN = "reader-token-0123456789", "admin-token-0123456789ab"
FAST = OutboxSettings(backoff_base_s=0.01, backoff_max_s=0.05)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    store = Store(tmp_path / "lt.db")
    yield store.path
    store.close()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def finding(n: int) -> Finding:
    return Finding(kind="unsanctioned_destination", tenant=f"tenant{n}", severity="high",
                   summary=f"tenant{n} -> salesforce:globex", crm_vendor="salesforce",
                   crm_instance="globex", ts=1_704_110_400 + n)


def pd_sink(url: str, key: str = KEY) -> PagerDutySink:
    return PagerDutySink(PagerDutySettings(type="pagerduty", routing_key=key, url=url,
                                           source="node-1", timeout_s=2))


def wire(db: Path, sinks: list[Sink]) -> tuple[AlertManager, OutboxDispatcher]:
    outbox = OutboxDispatcher(db, sinks, FAST)
    alerts = AlertManager(db, [SinkRoute(s.name) for s in sinks], AlertsSettings(),
                          on_change=outbox.notify)
    return alerts, outbox


def states(db: Path) -> list[str]:
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("SELECT state FROM outbox ORDER BY id")]


def agent_view(alerts: AlertManager, outbox: OutboxDispatcher) -> Any:
    """What the API routes read from a running agent, without the kernel."""
    return SimpleNamespace(
        alerts=alerts, outbox=outbox, stats={}, totals={}, cgroup_totals={},
        unattributed_bytes=0, table=[], interfaces=[], attached=True, plaintext=None,
        probes=SimpleNamespace(attach_modes={}), egress_by_destination={},
        ready=lambda: (True, "ok"),
    )


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


# -- 17.3: only the receiver's verdict on the payload is permanent -----------------------


@pytest.mark.parametrize("status", [401, 403, 302, 404])
def test_auth_redirect_and_other_4xx_are_retried_until_every_alert_is_delivered(
    db: Path, status: int
) -> None:
    # a rotated routing key or a proxy answers `status` for a while, then PagerDuty's 202
    with running(PagerDutyReceiver({KEY})) as pd:
        pd.script = [status] * 6
        alerts, outbox = wire(db, [pd_sink(pd.url)])
        outbox.start()
        try:
            for n in range(40):
                alerts.record(finding(n))
            assert outbox.wait_idle(10)
        finally:
            outbox.stop()
            alerts.close()
    assert pd.pages == 40  # before: 40 of 40 marked failed after one attempt each
    assert states(db) == ["delivered"] * 40
    assert outbox.deliveries == {("pagerduty", "retry"): 6, ("pagerduty", "delivered"): 40}


def test_webhook_200_is_success_and_422_is_permanent(db: Path) -> None:
    with running(HttpReceiver()) as hook:  # answers 200 {} to anything
        hook.script = [422]
        sink = WebhookSink(WebhookSettings(type="webhook", url=hook.url, timeout_s=2))
        alerts, outbox = wire(db, [sink])
        outbox.start()
        try:
            alerts.record(finding(1))
            alerts.record(finding(2))
            assert outbox.wait_idle(5)
        finally:
            outbox.stop()
            alerts.close()
    assert states(db) == ["failed", "delivered"] and len(hook.requests) == 2


def test_pagerduty_400_is_permanent_counted_visible_and_can_be_resent(db: Path) -> None:
    with running(PagerDutyReceiver({ROTATED_KEY})) as pd:
        sink = pd_sink(pd.url)  # the key PagerDuty no longer knows: 400 Invalid routing key
        alerts, outbox = wire(db, [sink])
        outbox.start()
        app = create_app(agent_view(alerts, outbox), readers=[READER], admins=[ADMIN],
                         manage=False)
        try:
            with TestClient(app) as client:
                changes = [alerts.record(finding(n)) for n in range(3)]
                assert all(c is not None for c in changes)
                wait_until(lambda: states(db) == ["failed"] * 3)
                alerts.resolve(changes[0].alert_id, "api:alice")  # type: ignore[union-attr]
                wait_until(lambda: states(db) == ["failed"] * 4)
                assert len(pd.requests) == 4  # one attempt each: never retried
                head = {"Authorization": f"Bearer {READER}"}
                text = client.get("/metrics", headers=head).text
                assert metric(text, "leaktap_sink_deliveries_total", sink="pagerduty",
                              outcome="failed") == 4
                assert metric(text, "leaktap_outbox_failed", sink="pagerduty") == 4
                ready = client.get("/readyz", headers=head).json()
                assert ready["status"] == "degraded" and "sink pagerduty: 4 failed" in \
                    ready["degraded"][0]
                (state,) = client.get("/v1/sinks", headers=head).json()["sinks"]
                assert state["failed"] == 4 and "Invalid routing key" in state["last_error"]
                # the operator fixes the key at PagerDuty's end, then re-sends
                pd.routing_keys.add(KEY)
                assert client.post("/v1/sinks/pagerduty/retry", headers=head).status_code == 403
                admin = {"Authorization": f"Bearer {ADMIN}"}
                assert client.post("/v1/sinks/nosuch/retry", headers=admin).status_code == 404
                answer = client.post("/v1/sinks/pagerduty/retry", headers=admin)
                assert answer.json() == {"sink": "pagerduty", "requeued": 4}
                assert outbox.wait_idle(5)
                assert client.get("/readyz", headers=head).json()["status"] == "ready"
                text = client.get("/metrics", headers=head).text
                assert metric(text, "leaktap_outbox_failed", sink="pagerduty") == 0
                assert metric(text, "leaktap_sink_deliveries_total", sink="pagerduty",
                              outcome="delivered") == 4
        finally:
            outbox.stop()
            alerts.close()
    assert states(db) == ["delivered"] * 4 and pd.pages == 3
    # the resolve went after its trigger: the first incident is closed at PagerDuty
    by_key = {i.trigger["payload"]["summary"]: i.status for i in pd.incidents.values()}
    assert by_key["tenant0 -> salesforce:globex"] == "resolved"


def test_a_resolve_delivered_before_its_failed_trigger_is_sent_again_after_it(db: Path) -> None:
    with running(PagerDutyReceiver({KEY})) as pd:
        pd.script = [400]  # the trigger is refused, the resolve accepted
        alerts, outbox = wire(db, [pd_sink(pd.url)])
        outbox.start()
        try:
            change = alerts.record(finding(1))
            wait_until(lambda: states(db) == ["failed"])
            alerts.resolve(change.alert_id, "api:alice")  # type: ignore[union-attr]
            wait_until(lambda: states(db) == ["failed", "delivered"])
            assert outbox.retry("pagerduty") == 2
            assert outbox.wait_idle(5)
        finally:
            outbox.stop()
            alerts.close()
    actions = [json.loads(body)["event_action"] for _, _, body in pd.requests]
    assert actions == ["trigger", "resolve", "trigger", "resolve"]
    (incident,) = pd.incidents.values()
    assert incident.status == "resolved"


# -- 17.4: no secret in error text -------------------------------------------------------


class EchoingProxy(HttpReceiver):
    """A proxy that answers with the request it got (what the excerpt keeps comes first)."""

    def __init__(self, statuses: list[int], body_first: bool) -> None:
        super().__init__()
        self.statuses = statuses
        self.body_first = body_first

    def accept(self, headers: dict[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        status = self.statuses.pop(0) if self.statuses else 400
        parts = [("body", body.decode()), ("headers", headers)]
        return status, {"you_sent": dict(parts if self.body_first else parts[::-1])}, {}


def test_an_echoing_receiver_leaks_no_secret_to_db_logs_or_api(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pd_proxy = EchoingProxy([401, 400], body_first=True)
    hook_proxy = EchoingProxy([403, 500, 422], body_first=False)
    with running(pd_proxy), running(hook_proxy):
        hook = WebhookSink(WebhookSettings(
            type="webhook", url=f"{hook_proxy.url}/{PATH_TOKEN}", secret=HMAC_SECRET, timeout_s=2,
            headers={"Authorization": f"Bearer {BEARER}", "X-Api-Key": "tenant-api-key-55aa"},
        ))
        alerts, outbox = wire(db, [pd_sink(pd_proxy.url), hook])
        outbox.start()
        app = create_app(agent_view(alerts, outbox), readers=[READER], admins=[ADMIN],
                         manage=False)
        try:
            with caplog.at_level(logging.DEBUG), TestClient(app) as client:
                alerts.record(finding(1))
                wait_until(lambda: states(db) == ["failed", "failed"])
                head = {"Authorization": f"Bearer {READER}"}
                answers = [client.get(p, headers=head).text for p in (
                    "/v1/sinks", "/v1/alerts", "/v1/alerts/1", "/metrics", "/readyz")]
        finally:
            outbox.stop()
            alerts.close()
        # both proxies really saw the secrets they echoed
        assert KEY.encode() in pd_proxy.requests[0][2]
        assert hook_proxy.requests[0][1]["Authorization"] == f"Bearer {BEARER}"
    sinks = json.loads(answers[0])["sinks"]
    errors = {s["sink"]: s["last_error"] for s in sinks}
    assert errors["pagerduty"].startswith("HTTP 400: ") and "***" in errors["pagerduty"]
    assert errors["webhook"].startswith("HTTP 422: ") and "***" in errors["webhook"]
    assert all(len(e) <= EXCERPT_MAX for e in errors.values())
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))  # db, -wal, -shm
    assert (db.parent / (db.name + "-wal")).exists()
    for secret in (KEY, BEARER, HMAC_SECRET, "tenant-api-key-55aa", PATH_TOKEN):
        assert secret.encode() not in stored, secret
        assert secret not in caplog.text, secret
        assert all(secret not in a for a in answers), secret


def test_redactor_masks_configured_secrets_in_every_encoding_and_common_shapes() -> None:
    redact = Redactor(["s3cr3t/with+plus", "Bearer tok-123456", None, b"bytes-secret"])
    text = ('{"x":"s3cr3t/with+plus", "q":"s3cr3t%2Fwith%2Bplus", "h":"tok-123456", '
            '"b":"bytes-secret", "password":"hunter22", "other_token": "zzzzzz", '
            'Authorization: Bearer abcdefgh12345 sig sha256=' + "ab" * 32 + "\n\x00end")
    out = redact(text)
    for leaked in ("s3cr3t", "tok-123456", "bytes-secret", "hunter22", "zzzzzz", "abcdefgh12345",
                   "ab" * 32, "\n", "\x00"):
        assert leaked not in out, (leaked, out)
    assert out.endswith("end")
    assert len(redact("x" * 100_000)) == EXCERPT_MAX
