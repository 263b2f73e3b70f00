"""The alert lifecycle on a real database: dedup, suppression, states, auto-resolve,
and the outbox entries written with each change."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leaktap.analytics.alert_settings import AlertsSettings
from leaktap.analytics.alerts import (
    AlertManager,
    Finding,
    InvalidTransition,
    SinkRoute,
    UnknownAlert,
)
from leaktap.analytics.incidents import Incident
from leaktap.controller.storage import Store

T0 = 1_704_110_400


class Clock:
    def __init__(self, now: float = T0 + 120) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    store = Store(tmp_path / "lt.db")
    yield store.path
    store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def manager(db: Path, clock: Clock, **settings: Any) -> AlertManager:
    routes = [SinkRoute("pager", "high"), SinkRoute("siem"), SinkRoute("file")]
    return AlertManager(db, routes, AlertsSettings(**settings), environment="prod", clock=clock)


def incident(first_ts: int = T0, last_ts: int | None = None, **over: Any) -> Incident:
    fields: dict[str, Any] = {
        "kind": "volume_anomaly", "tenant": "acme", "crm_vendor": "salesforce",
        "crm_instance": "acme", "first_ts": first_ts, "last_ts": last_ts or first_ts,
        "raised_ts": first_ts, "severity": "high", "score": 9.5,
        "summary": "acme -> salesforce:acme: 40 MB out this minute, 12.0x the expected 3 MB",
        "evidence": {"observed_bytes": 40_000_000, "expected_bytes": 3_300_000,
                     "snippet": "[REDACTED email] sha256:1f2e"},
    }
    fields.update(over)
    return Incident(**fields)


def outbox(db: Path) -> list[tuple[int, str, str, str]]:
    with sqlite3.connect(db) as c:
        return list(c.execute("SELECT alert_id, sink, action, state FROM outbox ORDER BY id"))


def test_new_incident_opens_an_alert_and_one_outbox_entry_per_sink(db: Path, clock: Clock) -> None:
    alerts = manager(db, clock)
    inc = incident()
    change = alerts.record(inc)
    assert change is not None and change.action == "trigger"
    assert change.sinks == ("pager", "siem", "file")
    (alert,) = alerts.list_alerts()
    assert alert["id"] == change.alert_id
    assert (alert["status"], alert["count"], alert["dedup_key"]) == ("open", 1, inc.dedup_key)
    assert alert["destination"] == "salesforce:acme"
    assert alert["evidence"] == inc.evidence  # stored as the producer gave it
    assert alert["first_seen"] == alert["last_seen"] == T0 and alert["raised_ts"] == clock.now
    assert [(d["sink"], d["action"], d["state"]) for d in alert["deliveries"]] == [
        ("pager", "trigger", "pending"), ("siem", "trigger", "pending"),
        ("file", "trigger", "pending")]
    assert alerts.raised == {("volume_anomaly", "high"): 1}
    alerts.close()


def test_a_repeat_within_the_episode_counts_and_does_not_page(db: Path, clock: Clock) -> None:
    alerts = manager(db, clock)
    first = alerts.record(incident())
    assert first is not None
    for minute in range(1, 4):
        clock.now += 60
        assert alerts.record(incident(last_ts=T0 + 60 * minute, score=10.0 + minute)) is None
    alert = alerts.get(first.alert_id)
    assert alert is not None
    assert (alert["count"], alert["last_seen"], alert["score"]) == (4, T0 + 180, 13.0)
    assert len(outbox(db)) == 3  # still only the trigger's entries
    assert alerts.raised == {("volume_anomaly", "high"): 1}
    alerts.close()


def test_findings_and_dicts_are_recorded_like_incidents(db: Path, clock: Clock) -> None:
    alerts = manager(db, clock)
    finding = Finding(kind="unsanctioned_destination", tenant="acme", severity="critical",
                      summary="acme opened TLS to globex.my.salesforce.com",
                      crm_vendor="salesforce", crm_instance="globex",
                      destination="globex.my.salesforce.com", ts=T0)
    assert alerts.record(finding) is not None
    again = Finding(kind="unsanctioned_destination", tenant="acme", severity="critical",
                    summary="again", crm_vendor="salesforce", crm_instance="globex",
                    destination="globex.my.salesforce.com", ts=T0 + 5)
    assert again.dedup_key == finding.dedup_key and alerts.record(again) is None
    as_dict = incident(kind="new_destination", severity="warning").to_dict()
    change = alerts.record(as_dict)
    assert change is not None and change.sinks == ("siem", "file")  # below the pager's min
    alert = alerts.get(change.alert_id)
    assert alert is not None and alert["severity"] == "medium"
    assert [a["count"] for a in alerts.list_alerts(kind="unsanctioned_destination")] == [2]
    alerts.close()


def test_numpy_values_in_evidence_are_stored(db: Path, clock: Clock) -> None:
    import numpy as np

    alerts = manager(db, clock)
    change = alerts.record(incident(evidence={"bytes": np.int64(7), "z": np.float64(2.5),
                                              "series": ("a", "b")}, score=np.float64(3.0)))
    assert change is not None
    alert = alerts.get(change.alert_id)
    assert alert is not None and alert["evidence"] == {"bytes": 7, "z": 2.5, "series": ["a", "b"]}
    alerts.close()


def test_unknown_severity_pages_as_high(
    db: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    alerts = manager(db, clock)
    with caplog.at_level(logging.ERROR):
        change = alerts.record(incident(severity="apocalyptic"))
    assert change is not None and "pager" in change.sinks
    assert "unknown alert severity" in caplog.text
    alerts.close()


def test_ack_and_resolve_tell_the_sinks_that_got_the_trigger(db: Path, clock: Clock) -> None:
    alerts = manager(db, clock)
    alerts.record(incident(kind="new_destination", severity="medium"))  # not for the pager
    alert_id = alerts.list_alerts()[0]["id"]
    ack = alerts.ack(alert_id, "api:alice")
    assert ack is not None and ack.sinks == ("siem", "file")
    assert alerts.ack(alert_id, "api:bob") is None  # already acknowledged
    resolved = alerts.resolve(alert_id, "api:alice")
    assert resolved is not None and resolved.action == "resolve"
    assert alerts.resolve(alert_id, "api:alice") is None
    with pytest.raises(InvalidTransition):
        alerts.ack(alert_id, "api:bob")
    with pytest.raises(UnknownAlert):
        alerts.resolve(999, "api:bob")
    alert = alerts.get(alert_id)
    assert alert is not None
    assert (alert["status"], alert["acknowledged_by"], alert["resolved_by"]) == (
        "resolved", "api:alice", "api:alice")
    assert [c["action"] for c in alerts.changes(alert_id)] == ["trigger", "acknowledge", "resolve"]
    assert [(s, a) for _, s, a, _ in outbox(db)] == [
        ("siem", "trigger"), ("file", "trigger"), ("siem", "acknowledge"), ("file", "acknowledge"),
        ("siem", "resolve"), ("file", "resolve")]
    alerts.close()


def test_auto_resolve_after_the_quiet_period(db: Path, clock: Clock) -> None:
    alerts = manager(db, clock, auto_resolve_after_s=600)
    alerts.record(incident(last_ts=T0 + 60))
    alerts.record(incident(first_ts=T0 + 300, kind="egress_ratio"))
    assert alerts.tick(now=T0 + 60 + 599) == []
    (change,) = alerts.tick(now=T0 + 60 + 601)
    assert change.action == "resolve" and change.actor == "auto"
    assert [a["status"] for a in alerts.list_alerts()] == ["open", "resolved"]
    assert len(alerts.tick(now=T0 + 901)) == 1
    assert manager(db, clock, auto_resolve_after_s=0).tick(now=T0 + 10**6) == []
    alerts.close()


def test_suppression_window_is_per_kind(db: Path, clock: Clock) -> None:
    alerts = manager(db, clock, suppression={"volume_anomaly": 1800})
    first = alerts.record(incident(first_ts=T0))
    assert first is not None
    clock.now += 1200  # a new episode (new dedup key) 20 minutes after the page
    assert alerts.record(incident(first_ts=T0 + 1200)) is None
    assert alerts.record(incident(first_ts=T0 + 1260)) is None  # its key now maps to the alert
    other_kind = alerts.record(incident(first_ts=T0 + 1200, kind="egress_ratio"))
    assert other_kind is not None  # no window for that kind
    clock.now += 700  # 31 minutes after the page
    later = alerts.record(incident(first_ts=T0 + 1900))
    assert later is not None and later.alert_id != first.alert_id
    alert = alerts.get(first.alert_id)
    assert alert is not None and alert["count"] == 3 and alert["last_seen"] == T0 + 1260
    alerts.close()


def test_new_activity_after_resolution_pages_again_unless_suppressed(
    db: Path, clock: Clock
) -> None:
    alerts = manager(db, clock, suppression={"unsanctioned_destination": 600})
    finding = {"kind": "unsanctioned_destination", "tenant": "acme", "severity": "high",
               "summary": "acme -> globex", "crm_vendor": "salesforce",
               "crm_instance": "globex", "dedup_key": "k1", "ts": T0}
    change = alerts.record(finding)
    assert change is not None
    alerts.resolve(change.alert_id, "api:alice")
    clock.now += 60
    assert alerts.record({**finding, "ts": T0 + 60}) is None  # within 10 min of the page
    clock.now += 600
    assert alerts.record({**finding, "ts": T0 + 60}) is None  # nothing new since
    reopened = alerts.record({**finding, "ts": T0 + 700})
    assert reopened is not None and reopened.alert_id == change.alert_id
    alert = alerts.get(change.alert_id)
    assert alert is not None
    assert (alert["status"], alert["resolved_by"], alert["count"]) == ("open", None, 4)
    assert [c["action"] for c in alerts.changes(change.alert_id)] == [
        "trigger", "resolve", "trigger"]
    alerts.close()


def test_a_change_and_its_outbox_entries_commit_together(db: Path, clock: Clock) -> None:
    alerts = manager(db, clock)
    with sqlite3.connect(db) as c:
        c.execute("CREATE TRIGGER boom BEFORE INSERT ON outbox "
                  "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
    with pytest.raises(sqlite3.IntegrityError, match="disk on fire"):
        alerts.record(incident())
    assert alerts.list_alerts() == []  # no alert without its deliveries
    with sqlite3.connect(db) as c:
        c.execute("DROP TRIGGER boom")
    assert alerts.record(incident()) is not None
    assert len(outbox(db)) == 3
    alerts.close()


def test_concurrent_repeats_page_once(db: Path, clock: Clock) -> None:
    managers = [manager(db, clock) for _ in range(4)]  # separate connections, like threads
    results: list[object] = []

    def work(m: AlertManager) -> None:
        for _ in range(25):
            results.append(m.record(incident()))

    threads = [threading.Thread(target=work, args=(m,)) for m in managers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
    (alert,) = managers[0].list_alerts()
    assert alert["count"] == 100
    for m in managers:
        m.close()


def test_filters(db: Path, clock: Clock) -> None:
    alerts = manager(db, clock)
    alerts.record(incident(tenant="acme"))
    alerts.record(incident(tenant="globex", first_ts=T0 + 600))
    alerts.ack(alerts.list_alerts(tenant="globex")[0]["id"], "api:admin")
    assert [a["tenant"] for a in alerts.list_alerts(status="open")] == ["acme"]
    assert [a["tenant"] for a in alerts.list_alerts(since=T0 + 1)] == ["globex"]
    assert alerts.list_alerts(kind="canary_token") == []
    assert [a["tenant"] for a in alerts.list_alerts(limit=1, offset=1)] == ["acme"]
    alerts.close()


def test_needs_a_migrated_database(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "empty.db").close()
    with pytest.raises(RuntimeError, match="no alerts table"):
        AlertManager(tmp_path / "empty.db")
