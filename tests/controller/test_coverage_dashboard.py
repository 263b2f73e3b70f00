"""The dashboard's plaintext coverage panel (issue 13.3) in a real browser: the rows
of GET /v1/coverage, the not-inspected ones marked, with their reason.

Reuses the dashboard test's agent stand-in (empty: no volume, no alert), server and
browser (test_dashboard.py); the coverage report is a fixed one here: the tracker
has its own tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from leaktap.analytics.alert_settings import AlertsSettings
from leaktap.analytics.alerts import AlertManager
from leaktap.controller.config import parse_config
from leaktap.controller.detection import LiveDetection
from leaktap.controller.storage import Store
from tests.controller.test_dashboard import (  # noqa: F401 - the browser fixture, by name
    CONFIG,
    READER,
    AgentView,
    Session,
    browser,
    serve,
)

REPORT = [
    {"pid": 4242, "exe": "/usr/bin/python3.11", "comm": "python3", "tenant": "acme",
     "destinations": ["salesforce:acme"], "tls": "openssl-shared", "inspected": True,
     "reason": "probed"},
    {"pid": 4343, "exe": "/usr/lib/jvm/java-17-openjdk-amd64/bin/java", "comm": "java",
     "tenant": "globex", "destinations": ["hubspot:globex", "salesforce:globex"],
     "tls": "java", "inspected": False,
     "reason": "JSSE: Java's own TLS, no native library to probe"},
    {"pid": None, "exe": None, "comm": None, "tenant": "acme",
     "destinations": ["salesforce:acme"], "tls": "unknown", "inspected": False,
     "reason": "exited before the probe attached"},
]


class FixedReport:
    def report(self) -> list[dict[str, Any]]:
        return REPORT

    def stats(self) -> dict[str, int]:
        return {}


@pytest.fixture
def session(browser: Any, tmp_path: Any) -> Iterator[Session]:  # noqa: F811
    store = Store(tmp_path / "lt.db")
    alerts = AlertManager(store.path, [], AlertsSettings())
    agent = AgentView(store, alerts, LiveDetection(parse_config(CONFIG), store, print))
    agent.coverage = FixedReport()  # type: ignore[attr-defined]
    with serve(agent) as url:
        s = Session(browser, url)
        yield s
        s.context.close()
    alerts.close()
    store.close()


def test_coverage_panel_lists_the_report(session: Session) -> None:
    page = session.sign_in(READER)
    rows = page.eval_on_selector_all(
        "#coverage tbody tr",
        "rs => rs.map(r => [r.className, ...[...r.cells].map(c => c.textContent)])")
    count = page.text_content("#coverage-count")
    empty_hidden = page.eval_on_selector("#no-coverage", "e => e.hidden")
    assert rows == [
        ["zero", "4242", "python3", "acme", "salesforce:acme", "openssl-shared", "yes", ""],
        ["lost", "4343", "java", "globex", "hubspot:globex, salesforce:globex", "java", "no",
         "JSSE: Java's own TLS, no native library to probe"],
        ["lost", "—", "(exited)", "acme", "salesforce:acme", "unknown", "no",
         "exited before the probe attached"],
    ]
    assert (count, empty_hidden) == ("1 of 3 inspected", True)
    assert session.errors == []


def test_doctor_reads_the_running_agents_report_over_http(tmp_path: Any) -> None:
    from leaktap.controller.commands.doctor import Status, check_coverage

    store = Store(tmp_path / "lt.db")
    alerts = AlertManager(store.path, [], AlertsSettings())
    agent = AgentView(store, alerts, LiveDetection(parse_config(CONFIG), store, print))
    agent.coverage = FixedReport()  # type: ignore[attr-defined]
    try:
        with serve(agent) as url:
            result = check_coverage(f"{url}/v1/coverage", READER)
            refused = check_coverage(f"{url}/v1/coverage", "not-a-reader-token-at-all")
    finally:
        alerts.close()
        store.close()
    assert (result.status, result.detail) == (
        Status.WARN, "1 of 3 process(es) talking to CRMs inspected (1 JSSE: Java's own TLS, "
        "no native library to probe; 1 exited before the probe attached)")
    assert result.fix == "GET /v1/coverage gives each process's reason"
    assert (refused.status, refused.detail) == (
        Status.WARN, f"the agent at {url}/v1/coverage answered HTTP 401")
