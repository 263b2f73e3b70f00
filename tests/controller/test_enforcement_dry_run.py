"""A dry-run connection is one decision, as in block mode (issue 12).

The connect program and the hello verdict both report a dry-run tenant's connection to
a refused address; the two reports come from different rings in either order and must
end as one audit row (reason `address`, on the connection's ports), one count and one
alert, while a second connection to the same address is a decision of its own.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from leaktap.analytics.incidents import Incident
from leaktap.controller.config import parse_config
from leaktap.controller.enforcement.dry_run_pairs import PAIR_WINDOW_S, PENDING_MAX, DryRunPairs
from leaktap.controller.enforcement.enforcer import Enforcement
from leaktap.controller.enforcement.kernel_policy import EnforcementDecision
from leaktap.controller.storage import Store

CONFIG = """
tenants:
  - name: globex
    match: {uids: [4242]}
    allow: ["salesforce:globex"]
    enforce: dry-run
  - name: acme
    match: {uids: [4243]}
    allow: ["salesforce:acme"]
    enforce: block
"""
DST = "198.18.7.9"


def connect(ts: float, tenant: str = "globex", action: str = "would_block",
            daddr: str = f"::ffff:{DST}") -> EnforcementDecision:
    return EnforcementDecision(
        ts=ts, tenant=tenant, action=action, reason="address",  # type: ignore[arg-type]
        vendor="salesforce", crm_instance="initech", host="initech.my.salesforce.com",
        proto=6, saddr="", sport=0, daddr=daddr, dport=443, cgroup_id=77)


def hello(ts: float, sport: int, tenant: str = "globex",
          action: str = "would_block") -> EnforcementDecision:
    return EnforcementDecision(
        ts=ts, tenant=tenant, action=action, reason="unsanctioned_instance",  # type: ignore[arg-type]
        vendor="salesforce", crm_instance="initech", host="initech.my.salesforce.com",
        proto=6, saddr="198.18.7.1", sport=sport, daddr=DST, dport=443, cgroup_id=77)


@pytest.fixture
def enforcement(tmp_path: Path) -> tuple[Enforcement, list[Incident], Path]:
    db = tmp_path / "lt.db"
    Store(db).close()  # the schema, with the enforcement_decisions table
    incidents: list[Incident] = []
    enf = Enforcement(parse_config(CONFIG), db, None, lambda _id: None, incidents.append,
                      str(tmp_path / "pins"))
    return enf, incidents, db


def rows(db: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT tenant, action, reason, src, sport, dst, dport "
                            "FROM enforcement_decisions ORDER BY id").fetchall()


@pytest.mark.parametrize("hello_first", [False, True])
def test_connect_and_hello_of_one_connection_are_one_decision(
        enforcement: tuple[Enforcement, list[Incident], Path], hello_first: bool) -> None:
    enf, incidents, db = enforcement
    reports = [connect(100.0), hello(100.2, 40001)]
    for d in reversed(reports) if hello_first else reports:
        enf.on_decision(d)
    # a second connection to the same address later: its own decision
    enf.on_decision(connect(101.0))
    enf.on_decision(hello(101.1, 40002))
    enf.log.close()
    assert rows(db) == [
        ("globex", "would_block", "address", "198.18.7.1", 40001, DST, 443),
        ("globex", "would_block", "address", "198.18.7.1", 40002, DST, 443)]
    assert enf.counts == {("globex", "salesforce", "initech", "would_block"): 2}
    assert len(incidents) == 2
    assert {i.evidence["action"] for i in incidents} == {"would_block"}


def test_reports_too_far_apart_or_of_another_tenant_stay_apart(
        enforcement: tuple[Enforcement, list[Incident], Path]) -> None:
    enf, _incidents, db = enforcement
    enf.on_decision(connect(100.0))
    enf.on_decision(hello(100.0 + PAIR_WINDOW_S + 1, 40001))  # a hello of another connection
    # block mode is one report per connection already: never folded
    enf.on_decision(connect(200.0, tenant="acme", action="blocked"))
    enf.on_decision(hello(200.1, 40003, tenant="acme", action="blocked"))
    enf.log.close()
    assert [r[:3] for r in rows(db)] == [
        ("globex", "would_block", "address"), ("globex", "would_block", "unsanctioned_instance"),
        ("acme", "blocked", "address"), ("acme", "blocked", "unsanctioned_instance")]
    assert enf.counts[("globex", "salesforce", "initech", "would_block")] == 2


def test_waiting_reports_are_bounded() -> None:
    pairs = DryRunPairs()
    for i in range(PENDING_MAX + 500):  # connects whose hellos never come (a flood)
        pairs.wait(connect(1000.0 + i * 1e-3), i + 1)
    assert len(pairs) == PENDING_MAX
    # the oldest went first: the next hello pairs with the oldest one kept
    assert pairs.partner(hello(1005.0, 1)) == 501
    # everything older than the window is forgotten on the next report
    assert pairs.partner(hello(1000.0 + PAIR_WINDOW_S + 10, 2)) is None
    assert len(pairs) == 0
