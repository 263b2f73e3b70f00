"""The outbox dispatcher against local receivers: outages, restarts, 429 storms,
permanent rejections, ordering, and independence of sinks."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from leaktap.analytics.alert_settings import AlertsSettings, OutboxSettings
from leaktap.analytics.alerts import AlertManager, Finding, SinkRoute
from leaktap.analytics.outbox import OutboxDispatcher
from leaktap.analytics.sinks.base import AlertEvent, Sink
from leaktap.analytics.sinks.pagerduty import PagerDutySettings, PagerDutySink
from leaktap.analytics.sinks.webhook import WebhookSettings, WebhookSink
from leaktap.controller.storage import Store
from tests.analytics.receivers import PagerDutyReceiver, WebhookReceiver, running

KEY = "R0UTINGKEY0123456789abcdef012345"
SECRET = b"webhook-secret-0123456789"
FAST = OutboxSettings(backoff_base_s=0.02, backoff_max_s=0.2)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    store = Store(tmp_path / "lt.db")
    yield store.path
    store.close()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def finding(n: int, severity: str = "high") -> Finding:
    return Finding(kind="unsanctioned_destination", tenant=f"tenant{n}", severity=severity,
                   summary=f"tenant{n} -> salesforce:globex", crm_vendor="salesforce",
                   crm_instance="globex", ts=1_704_110_400 + n)


def pd_sink(url: str, key: str = KEY, name: str = "pagerduty") -> PagerDutySink:
    return PagerDutySink(PagerDutySettings(type="pagerduty", name=name, routing_key=key, url=url,
                                           source="node-1", timeout_s=2))


def hook_sink(url: str) -> WebhookSink:
    return WebhookSink(WebhookSettings(type="webhook", url=url, secret=SECRET.decode(),
                                       timeout_s=2))


def wire(db: Path, sinks: list[Sink], settings: OutboxSettings = FAST,
         **dispatcher: Any) -> tuple[AlertManager, OutboxDispatcher]:
    outbox = OutboxDispatcher(db, sinks, settings, **dispatcher)
    alerts = AlertManager(db, [SinkRoute(s.name) for s in sinks], AlertsSettings(),
                          on_change=outbox.notify)
    return alerts, outbox


def rows(db: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as c:
        c.row_factory = sqlite3.Row
        return [dict(r) for r in c.execute("SELECT * FROM outbox ORDER BY id")]


def events_by_key(pd: PagerDutyReceiver) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for body in pd.accepted:
        out.setdefault(body["dedup_key"], []).append(body["event_action"])
    return out


def test_sink_down_then_up_delivers_everything_once(db: Path) -> None:
    pd = PagerDutyReceiver({KEY}).start()
    port = pd.port
    pd.stop()  # down: connections refused
    alerts, outbox = wire(db, [pd_sink(f"http://127.0.0.1:{port}/v2/enqueue")])
    outbox.start()
    try:
        changes = [alerts.record(finding(n)) for n in range(3)]
        alerts.ack(changes[0].alert_id, "api:alice")  # type: ignore[union-attr]
        wait_until(lambda: all(r["attempts"] >= 2 for r in rows(db)[:1]))
        first = rows(db)[0]
        assert first["state"] == "pending" and "ConnectError" in first["last_error"]
        assert first["next_attempt_ts"] > first["last_attempt_ts"]
        assert outbox.pending_by_sink() == {"pagerduty": 4}
        (state,) = outbox.sink_states()
        assert state["consecutive_failures"] >= 2 and "ConnectError" in state["last_error"]
        pd = PagerDutyReceiver({KEY}, port=port).start()  # back up
        assert outbox.wait_idle(5)
    finally:
        outbox.stop()
        pd.stop()
    assert pd.pages == 3
    keys = [a["dedup_key"] for a in reversed(alerts.list_alerts())]
    assert events_by_key(pd) == {keys[0]: ["trigger", "acknowledge"], keys[1]: ["trigger"],
                                 keys[2]: ["trigger"]}
    assert {r["state"] for r in rows(db)} == {"delivered"}
    assert outbox.deliveries[("pagerduty", "delivered")] == 4
    assert outbox.deliveries[("pagerduty", "retry")] >= 2
    alerts.close()


def test_restart_delivers_what_was_pending(db: Path) -> None:
    with running(PagerDutyReceiver({KEY})) as pd:
        # the agent recorded alerts and stopped before its dispatcher delivered them
        alerts, outbox = wire(db, [pd_sink(pd.url)])
        for n in range(5):
            alerts.record(finding(n))
        alerts.close()
        outbox.stop()
        assert pd.requests == []
        alerts, outbox = wire(db, [pd_sink(pd.url)])  # the next start, same database
        outbox.start()
        try:
            assert outbox.wait_idle(5)
        finally:
            outbox.stop()
            alerts.close()
    assert pd.pages == 5 and len(pd.accepted) == 5


class CrashAfterSend:
    """Delivers, then dies before the outbox row is marked (a crash mid-delivery)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.name = sink.name

    def send(self, event: AlertEvent) -> None:
        self.sink.send(event)
        raise SystemExit("killed")

    def close(self) -> None:
        self.sink.close()


def test_crash_between_send_and_commit_resends_and_the_receiver_dedups(db: Path) -> None:
    with running(PagerDutyReceiver({KEY})) as pd:
        alerts, outbox = wire(db, [CrashAfterSend(pd_sink(pd.url))])  # type: ignore[list-item]
        alerts.record(finding(1))
        with pytest.raises(SystemExit):
            outbox.deliver_due("pagerduty")
        outbox.stop()
        alerts.close()
        assert rows(db)[0]["state"] == "pending"
        alerts, outbox = wire(db, [pd_sink(pd.url)])
        outbox.start()
        try:
            assert outbox.wait_idle(5)
        finally:
            outbox.stop()
            alerts.close()
    assert [b["event_action"] for b in pd.accepted] == ["trigger", "trigger"]  # at least once
    assert pd.pages == 1  # exactly one page: same dedup_key


def test_429_storm_backs_off_exponentially_then_delivers(db: Path) -> None:
    with running(PagerDutyReceiver({KEY})) as pd:
        pd.script = [429] * 5
        alerts, outbox = wire(db, [pd_sink(pd.url)],
                              OutboxSettings(backoff_base_s=0.02, backoff_max_s=5))
        outbox.start()
        try:
            alerts.record(finding(1))
            assert outbox.wait_idle(10)
        finally:
            outbox.stop()
            alerts.close()
    times = [t for t, _, _ in pd.requests]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 6
    # failure n waits base * 2^(n-1) * [0.5, 1): at least 10, 20, 40, 80, 160 ms
    for n, gap in enumerate(gaps[:5], start=1):
        assert gap >= 0.02 * 2 ** (n - 1) * 0.5 * 0.9, gaps
    assert gaps[4] > gaps[0]
    assert outbox.deliveries == {("pagerduty", "retry"): 5, ("pagerduty", "delivered"): 1}
    assert rows(db)[0]["attempts"] == 6 and pd.pages == 1


def test_429_retry_after_is_honoured(db: Path) -> None:
    with running(PagerDutyReceiver({KEY})) as pd:
        pd.script, pd.retry_after = [429], "0.3"
        alerts, outbox = wire(db, [pd_sink(pd.url)],
                              OutboxSettings(backoff_base_s=0.02, backoff_max_s=1))
        outbox.start()
        try:
            alerts.record(finding(1))
            assert outbox.wait_idle(5)
        finally:
            outbox.stop()
            alerts.close()
    (t0, _, _), (t1, _, _) = pd.requests
    assert t1 - t0 >= 0.29  # not the 20 ms backoff


def test_400_is_not_retried_and_is_visible(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    with running(PagerDutyReceiver({KEY})) as pd, running(WebhookReceiver(SECRET)) as hook:
        bad = pd_sink(pd.url, key="wrong-routing-key")
        alerts, outbox = wire(db, [bad, hook_sink(hook.url)])
        outbox.start()
        try:
            with caplog.at_level(logging.ERROR):
                change = alerts.record(finding(1))
                assert outbox.wait_idle(5)
                time.sleep(0.1)  # room for a wrong retry
        finally:
            outbox.stop()
    assert len(pd.requests) == 1 and pd.accepted == []
    assert "Invalid routing key" in caplog.text
    assert change is not None
    alert = alerts.get(change.alert_id)
    assert alert is not None
    by_sink = {d["sink"]: d for d in alert["deliveries"]}
    assert by_sink["pagerduty"]["state"] == "failed" and by_sink["pagerduty"]["attempts"] == 1
    assert "HTTP 400" in by_sink["pagerduty"]["last_error"]
    assert by_sink["webhook"]["state"] == "delivered"  # the other sink is unaffected
    assert outbox.deliveries[("pagerduty", "failed")] == 1
    alerts.close()


def test_a_resolve_never_overtakes_its_trigger(db: Path) -> None:
    with running(PagerDutyReceiver({KEY})) as pd:
        pd.script = [503, 503]
        alerts, outbox = wire(db, [pd_sink(pd.url)])
        outbox.start()
        try:
            change = alerts.record(finding(1))
            assert change is not None
            alerts.resolve(change.alert_id, "api:alice")
            alerts.record(finding(2))
            assert outbox.wait_idle(5)
        finally:
            outbox.stop()
            alerts.close()
    assert [b["event_action"] for b in pd.accepted] == ["trigger", "resolve", "trigger"]
    assert pd.pages == 2 and pd.incidents[pd.accepted[0]["dedup_key"]].status == "resolved"


def test_a_down_sink_does_not_delay_the_others(db: Path) -> None:
    pd = PagerDutyReceiver({KEY}).start()
    pd_port = pd.port
    pd.stop()
    with running(WebhookReceiver(SECRET)) as hook:
        alerts, outbox = wire(db, [pd_sink(f"http://127.0.0.1:{pd_port}/x"), hook_sink(hook.url)])
        outbox.start()
        try:
            for n in range(10):
                alerts.record(finding(n))
            wait_until(lambda: len(hook.documents) == 10)
            # the receiver keeps a document before the worker marks its entry delivered
            wait_until(lambda: outbox.pending_by_sink() == {"pagerduty": 10})
        finally:
            outbox.stop()
            alerts.close()
    assert [d["alert"]["tenant"] for d in hook.documents] == [f"tenant{n}" for n in range(10)]
    assert len(set(hook.delivery_ids)) == 10


def test_gives_up_after_the_configured_age(db: Path) -> None:
    pd = PagerDutyReceiver({KEY}).start()
    port = pd.port
    pd.stop()
    alerts, outbox = wire(db, [pd_sink(f"http://127.0.0.1:{port}/x")],
                          OutboxSettings(backoff_base_s=0.01, backoff_max_s=0.02,
                                         give_up_after_s=0.2))
    outbox.start()
    try:
        alerts.record(finding(1))
        wait_until(lambda: rows(db)[0]["state"] == "failed")
    finally:
        outbox.stop()
        alerts.close()
    assert rows(db)[0]["last_error"].startswith("gave up: ConnectError")


def test_entries_for_a_removed_sink_wait(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    with running(WebhookReceiver(SECRET)) as hook:
        alerts, outbox = wire(db, [pd_sink("http://127.0.0.1:9/x", name="old-pager")])
        alerts.record(finding(1))
        outbox.stop()
        alerts.close()
        _, outbox = wire(db, [hook_sink(hook.url)])
        with caplog.at_level(logging.WARNING):
            outbox.start()
        outbox.stop()
    assert "sink 'old-pager', which is not configured" in caplog.text
    assert rows(db)[0]["state"] == "pending"


@pytest.mark.parametrize(("failures", "jitter", "delay"), [
    (1, 0.0, 0.5), (1, 1.0, 1.0), (3, 1.0, 4.0), (10, 1.0, 300.0), (100, 0.0, 150.0),
])
def test_backoff_doubles_with_jitter_and_caps(
    db: Path, failures: int, jitter: float, delay: float
) -> None:
    outbox = OutboxDispatcher(db, [], OutboxSettings(), jitter=lambda: jitter)
    assert outbox.backoff(failures) == pytest.approx(delay)
    outbox.stop()
