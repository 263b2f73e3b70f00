"""Each sink against a local receiver speaking the real protocol."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from leaktap.analytics.sinks import build_sink
from leaktap.analytics.sinks.base import AlertEvent, PermanentDelivery, RetryableDelivery
from leaktap.analytics.sinks.file import FileSettings, FileSink
from leaktap.analytics.sinks.pagerduty import PagerDutySettings, PagerDutySink
from leaktap.analytics.sinks.syslog import SyslogSettings, SyslogSink, cef_header, cef_value
from leaktap.analytics.sinks.webhook import WebhookSettings, WebhookSink
from tests.analytics.receivers import (
    PagerDutyReceiver,
    SyslogTcpReceiver,
    SyslogUdpReceiver,
    WebhookReceiver,
    running,
)

KEY = "R0UTINGKEY0123456789abcdef012345"
SECRET = "webhook-secret-0123456789"
T0 = 1_704_110_400.0  # 2024-01-01 12:00:00 UTC


def alert(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": 7, "dedup_key": "d" * 64, "kind": "unsanctioned_destination", "tenant": "acme",
        "crm_vendor": "salesforce", "crm_instance": "globex", "destination": "salesforce:globex",
        "severity": "high", "score": 1.0, "status": "open", "count": 1,
        "summary": "acme sent 3 MB to salesforce:globex, outside its allow list",
        "evidence": {"bytes_out": 3_000_000, "allow": ["salesforce:acme"]},
        "first_seen": T0 - 120, "last_seen": T0 + 60, "raised_ts": T0, "environment": "prod",
    }
    base.update(over)
    return base


def event(action: str = "trigger", delivery_id: int = 1, **over: Any) -> AlertEvent:
    return AlertEvent(delivery_id, delivery_id, action, "leaktap", T0 + 61, alert(**over))  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- PagerDuty Events v2 ----------------------------------------------------------------


def pd_sink(url: str, key: str = KEY) -> PagerDutySink:
    return PagerDutySink(PagerDutySettings(type="pagerduty", routing_key=key, url=url,
                                           source="node-1", timeout_s=2))


def test_pagerduty_trigger_follows_the_events_v2_contract() -> None:
    with running(PagerDutyReceiver({KEY})) as pd:
        sink = pd_sink(pd.url)
        sink.send(event(summary="x" * 2000, severity="medium"))
        sink.close()
    (body,) = pd.accepted
    assert body["routing_key"] == KEY and body["event_action"] == "trigger"
    assert body["dedup_key"] == "d" * 64
    payload = body["payload"]
    assert payload["summary"] == "x" * 1024
    assert payload["source"] == "node-1"
    assert payload["severity"] == "warning"
    assert payload["timestamp"] == "2024-01-01T12:00:00.000Z"
    assert (payload["component"], payload["group"], payload["class"]) == (
        "salesforce:globex", "acme", "unsanctioned_destination")
    details = payload["custom_details"]
    assert details["tenant"] == "acme" and details["destination"] == "salesforce:globex"
    assert details["evidence"] == {"bytes_out": 3_000_000, "allow": ["salesforce:acme"]}
    assert details["environment"] == "prod"
    assert details["first_seen"] == "2024-01-01T11:58:00.000Z"


@pytest.mark.parametrize(("ours", "theirs"), [
    ("critical", "critical"), ("high", "error"), ("medium", "warning"), ("low", "info"),
    ("info", "info"),
])
def test_pagerduty_severity_is_one_of_the_four(ours: str, theirs: str) -> None:
    body = pd_sink("http://127.0.0.1:9/").body(event(severity=ours))
    assert body["payload"]["severity"] == theirs


def test_pagerduty_acknowledge_and_resolve_follow_the_trigger() -> None:
    with running(PagerDutyReceiver({KEY})) as pd:
        sink = pd_sink(pd.url)
        for action in ("trigger", "acknowledge", "resolve"):
            sink.send(event(action))
        sink.close()
    assert [b["event_action"] for b in pd.accepted] == ["trigger", "acknowledge", "resolve"]
    assert set(pd.accepted[1]) == {"routing_key", "event_action", "dedup_key"}
    assert pd.incidents["d" * 64].status == "resolved" and pd.pages == 1


def test_pagerduty_400_is_permanent_and_keeps_the_reason() -> None:
    with running(PagerDutyReceiver({KEY})) as pd:
        sink = pd_sink(pd.url, key="not-a-known-routing-key")
        with pytest.raises(PermanentDelivery, match="HTTP 400") as info:
            sink.send(event())
        sink.close()
    assert "Invalid routing key" in str(info.value)
    assert pd.accepted == []


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_pagerduty_429_and_5xx_are_retryable(status: int) -> None:
    with running(PagerDutyReceiver({KEY})) as pd:
        pd.script = [status]
        pd.retry_after = "7"
        sink = pd_sink(pd.url)
        with pytest.raises(RetryableDelivery, match=f"HTTP {status}") as info:
            sink.send(event())
        sink.send(event())  # the receiver is fine again
        sink.close()
    assert info.value.retry_after_s == (7.0 if status == 429 else None)
    assert len(pd.accepted) == 1


def test_network_errors_are_retryable() -> None:
    sink = pd_sink(f"http://127.0.0.1:{free_port()}/v2/enqueue")
    with pytest.raises(RetryableDelivery, match="ConnectError"):
        sink.send(event())
    sink.close()


# -- webhook --------------------------------------------------------------------------


def test_webhook_body_is_signed_and_the_receiver_verifies_it() -> None:
    with running(WebhookReceiver(SECRET.encode())) as hook:
        sink = WebhookSink(WebhookSettings(type="webhook", url=hook.url, secret=SECRET))
        sink.send(event(delivery_id=42))
        sink.close()
        _, headers, _ = hook.requests[0]
    assert hook.bad_signatures == 0
    (doc,) = hook.documents
    assert doc["action"] == "trigger" and doc["alert"]["tenant"] == "acme"
    assert doc["delivery_id"] == 42 and hook.delivery_ids == ["42"]
    assert headers["X-Leaktap-Signature"].startswith("sha256=")
    assert abs(int(headers["X-Leaktap-Timestamp"]) - int(
        __import__("datetime").datetime.fromisoformat(doc["sent_at"].replace("Z", "+00:00"))
        .timestamp())) <= 1


def test_webhook_with_a_wrong_secret_is_refused_and_retried_later() -> None:
    # a 401 is about credentials, not the event: the secret may be rotated back
    with running(WebhookReceiver(SECRET.encode())) as hook:
        sink = WebhookSink(WebhookSettings(type="webhook", url=hook.url,
                                           secret="another-secret-0123456789"))
        with pytest.raises(RetryableDelivery, match="HTTP 401"):
            sink.send(event())
        sink.close()
    assert hook.bad_signatures == 1 and hook.documents == []


def test_webhook_secret_from_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "hook.secret"
    secret_file.write_text(SECRET + "\n")
    with running(WebhookReceiver(SECRET.encode())) as hook:
        sink = build_sink(WebhookSettings(type="webhook", url=hook.url,
                                          secret_file=str(secret_file)))
        sink.send(event())
        sink.close()
    assert len(hook.documents) == 1 and hook.bad_signatures == 0


# -- syslog + CEF ---------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "escaped"), [
    ("a|b", "a\\|b"), ("back\\slash", "back\\\\slash"), ("x=y", "x=y"), ("two\nlines", "two lines"),
])
def test_cef_header_escaping(raw: str, escaped: str) -> None:
    assert cef_header(raw) == escaped


@pytest.mark.parametrize(("raw", "escaped"), [
    ("a=b", "a\\=b"), ("back\\slash", "back\\\\slash"), ("a|b", "a|b"),
    ("l1\nl2", "l1\\nl2"), ("l1\r\nl2", "l1\\nl2"), ("cr\r", "cr\\r"),
])
def test_cef_extension_escaping(raw: str, escaped: str) -> None:
    assert cef_value(raw) == escaped


TRICKY = "tenant|x\\y: key=value\nsecond line"


def test_syslog_udp_rfc5424_with_escaped_cef() -> None:
    receiver = SyslogUdpReceiver()
    sink = SyslogSink(SyslogSettings(type="syslog", address=receiver.address,
                                     hostname="node-1", facility="local4"))
    try:
        sink.send(event(summary=TRICKY, severity="critical"))
        record = receiver.receive()
    finally:
        sink.close()
        receiver.close()
    assert record["pri"] == 20 * 8 + 2  # local4, critical
    assert (record["host"], record["app"], record["msgid"]) == ("node-1", "leaktap", "trigger")
    assert record["ts"] == "2024-01-01T12:01:01.000Z"
    cef = record["cef"]
    assert (cef["version"], cef["vendor"], cef["signature"], cef["severity"]) == (
        "CEF:0", "leaktap", "unsanctioned_destination", 10)
    assert cef["name"] == TRICKY.replace("\n", " ")  # the header has no line breaks
    assert "tenant\\|x\\\\y" in record["msg"]  # escaped in the header
    assert cef["ext"]["msg"] == TRICKY  # and round-trips through the extension escaping
    assert "key\\=value\\nsecond" in record["msg"]
    assert cef["ext"]["cs1Label"] == "tenant" and cef["ext"]["cs1"] == "acme"
    assert json.loads(cef["ext"]["cs6"]) == {"allow": ["salesforce:acme"], "bytes_out": 3000000}
    assert cef["ext"]["act"] == "trigger" and cef["ext"]["dhost"] == "salesforce:globex"


def test_syslog_tcp_octet_counting_and_reconnect() -> None:
    receiver = SyslogTcpReceiver()
    sink = SyslogSink(SyslogSettings(type="syslog", address=receiver.address))
    try:
        sink.send(event("trigger", summary="a=b"))
        sink.send(event("resolve", summary="second\\"))
        messages = receiver.wait_for(2)
        assert [m["msgid"] for m in messages] == ["trigger", "resolve"]
        assert messages[0]["cef"]["ext"]["msg"] == "a=b"
        assert messages[1]["cef"]["ext"]["msg"] == "second\\"
        assert receiver.connections == 1  # one connection, frames split by their length
        receiver.drop_connections()
        time.sleep(0.05)  # the FIN reaches the sink's socket
        sink.send(event("acknowledge"))  # noticed the close: reconnects, nothing lost
        assert [m["msgid"] for m in receiver.wait_for(3)][-1] == "acknowledge"
        assert receiver.connections == 2
    finally:
        sink.close()
        receiver.close()
    with pytest.raises(RetryableDelivery):
        sink.send(event())  # nobody listens any more


def test_syslog_leaves_evidence_out_of_an_oversized_message() -> None:
    receiver = SyslogUdpReceiver()
    sink = SyslogSink(SyslogSettings(type="syslog", address=receiver.address,
                                     max_message_bytes=1024))
    try:
        sink.send(event(evidence={"blob": "z" * 5000}))
        record = receiver.receive()
    finally:
        sink.close()
        receiver.close()
    assert "cs6" not in record["cef"]["ext"] and record["cef"]["ext"]["cs1"] == "acme"


# -- file -----------------------------------------------------------------------------


def test_file_sink_rotates_by_size_and_keeps_n(tmp_path: Path) -> None:
    path = tmp_path / "out" / "alerts.jsonl"
    sink = FileSink(FileSettings(type="file", path=str(path), max_bytes=2048, keep=2))
    for i in range(1, 31):
        sink.send(event(delivery_id=i))
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["alerts.jsonl", "alerts.jsonl.1", "alerts.jsonl.2"]
    ids = []
    for name in ("alerts.jsonl.2", "alerts.jsonl.1", "alerts.jsonl"):
        f = path.parent / name
        assert f.stat().st_size <= 2048
        ids += [json.loads(line)["delivery_id"] for line in f.read_text().splitlines()]
    assert ids == list(range(31 - len(ids), 31))  # the newest lines, in order, none torn


def test_file_sink_unwritable_path_is_retryable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    sink = FileSink(FileSettings(type="file", path=str(tmp_path / "file" / "a.jsonl")))
    with pytest.raises(RetryableDelivery):
        sink.send(event())
