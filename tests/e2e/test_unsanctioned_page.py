"""End to end: a tenant whose allow list lacks an instance opens a TLS
connection to it in the namespace lab, and the pager receiver (speaking the
Events API v2 contract) gets the trigger within 10 seconds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from leaktap.controller.agent import Agent
from leaktap.controller.config import parse_config
from leaktap.controller.storage import Store
from tests.analytics.receivers import PagerDutyReceiver, running
from tests.netlab import make_cert, tls_sink, tls_upload, veth_lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

ROUTING_KEY = "R0UT1NGKEY0123456789abcdef012345"


def test_unsanctioned_instance_pages_within_10_seconds(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "crm.test")
    store = Store(tmp_path / "lt.db")
    with running(PagerDutyReceiver({ROUTING_KEY})) as pager:
        config = parse_config(f"""
tenants:
  - name: acme
    match: {{cidrs: ["198.18.50.1/32"]}}
    allow: ["salesforce:acme"]
sinks:
  - {{type: pagerduty, routing_key: "{ROUTING_KEY}", url: "{pager.url}"}}
""")
        try:
            with veth_lab("lt-t7", "198.18.50.1", "198.18.50.2") as lab, tls_sink(lab, cert, key):
                agent = Agent(config, [lab.host_if], store, pin=False)
                agent.start()
                try:
                    tls_upload(lab.peer_ip, 443, "acme.my.salesforce.com", 50_000)  # allowed
                    started = time.monotonic()
                    tls_upload(lab.peer_ip, 443, "globex.my.salesforce.com", 50_000)
                    while not pager.accepted and time.monotonic() - started < 10:
                        time.sleep(0.05)
                    elapsed = time.monotonic() - started
                    time.sleep(2.5)  # more polls of the same episode: no second page
                finally:
                    agent.stop()
        finally:
            store.close()
    assert pager.accepted, "no page within 10 s"
    assert elapsed < 10
    (event,) = pager.accepted
    assert event["event_action"] == "trigger" and event["routing_key"] == ROUTING_KEY
    payload = event["payload"]
    assert "globex" in payload["summary"] and len(payload["summary"]) <= 1024
    assert payload["severity"] in ("critical", "error", "warning", "info")
    assert (payload["group"], payload["class"]) == ("acme", "unsanctioned_destination")
    details = payload["custom_details"]
    assert (details["tenant"], details["crm_vendor"], details["crm_instance"]) == (
        "acme", "salesforce", "globex")
    assert pager.pages == 1
