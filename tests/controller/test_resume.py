"""Resuming conversations after a restart (issue 11.1): a flow row written by the
previous run is re-bound to the conversation that continues it, with its names and
totals; a new connection on the same 5-tuple, or a stale row, starts afresh."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.attribution.flows import FF_SYN, ConversationTable
from leaktap.controller.attribution.resume import ResumableFlows, names_from_row
from leaktap.controller.config import parse_config
from leaktap.controller.kernel.maps import FlowCounters, FlowKey
from leaktap.controller.storage import Store

CONFIG = """
tenants:
  - name: acme
    match: {sni: "{tenant}.my.salesforce.com"}
    allow: ["salesforce:acme"]
"""
IDLE_S = 300.0
LOCAL, REMOTE = ("198.18.22.1", 54004), ("198.18.22.2", 443)


def _row(now: float, **changes: Any) -> dict[str, Any]:
    row = {
        "family": 4, "proto": "tcp", "src": LOCAL[0], "sport": LOCAL[1], "dst": REMOTE[0],
        "dport": REMOTE[1], "sni": "acme.my.salesforce.com", "dns_names": [],
        "crm_vendor": "salesforce", "crm_instance": "acme", "tenant": "acme", "cgroup": "/",
        "uid": 1001, "bytes_out": 2_867_225, "packets_out": 2093, "bytes_in": 13_695,
        "packets_in": 179, "first_seen": now - 4.0, "last_seen": now - 1.5,
        "flags_out": FF_SYN, "flags_in": 0, "named_by": "sni",
    }
    row.update(changes)
    return row


def _stored(tmp_path: Path, rows: list[dict[str, Any]], since: float) -> list[dict[str, Any]]:
    """The rows as the previous run wrote them, read back as a restart reads them."""
    store = Store(tmp_path / "lt.db")
    try:
        store.write({}, rows)
        return store.live_flows(since)
    finally:
        store.close()


def _egress(nbytes: int, first_ago_s: float, flags: int = 0) -> FlowCounters:
    key = FlowKey(0, 4, 6, 0, LOCAL[0], REMOTE[0], LOCAL[1], REMOTE[1])
    first = time.monotonic_ns() - int(first_ago_s * 1e9)
    return FlowCounters(key, nbytes, nbytes // 1400 + 1, first, time.monotonic_ns(), 1001, flags)


def test_continuation_keeps_row_names_and_totals(tmp_path: Path) -> None:
    now = time.time()
    rows = _stored(tmp_path, [_row(now)], now - IDLE_S)
    resumable = ResumableFlows(rows, IDLE_S)
    counters = _egress(9_198_508, first_ago_s=1.0)
    claimed = resumable.claim(counters, now)
    assert claimed is not None and resumable.counts["resumed"] == 1 and len(resumable) == 0
    conv, names = claimed
    table = ConversationTable()
    table.adopt(conv)
    assert table.add(counters) is conv
    (src, _), _, out, back = conv.oriented(prefer_local=True)
    assert src == LOCAL[0] and conv.row_id == rows[0]["id"] and conv.named
    assert (out.bytes, back.bytes) == (2_867_225 + 9_198_508, 13_695)

    attributor = Attributor(parse_config(CONFIG), live=True)
    attributor.resume(conv, names)
    # no ClientHello this run: the names are the previous run's
    got = attributor.names(conv)
    assert (got.sni, got.tenant, got.crm_vendor, got.crm_instance) == (
        "acme.my.salesforce.com", "acme", "salesforce", "acme")
    assert names_from_row(rows[0]) == got
    # a plaintext write on that connection is joined to the same destination
    sni, _, crm = attributor.destination(4, LOCAL, REMOTE)
    assert sni == "acme.my.salesforce.com" and crm is not None
    assert (crm.vendor, crm.instance) == ("salesforce", "acme")
    attributor.forget(conv)
    assert attributor.names(conv).tenant == "unassigned"  # forgotten with the conversation


@pytest.mark.parametrize(
    ("counters_args", "row_changes", "reason"),
    [
        # the 5-tuple reused by a new connection: its SYN was drained
        ({"nbytes": 74, "first_ago_s": 0.2, "flags": FF_SYN}, {}, "new_handshake"),
        # packets older than the row's first: not this row's conversation
        ({"nbytes": 500, "first_ago_s": 10.0}, {}, "started_before_row"),
        # the row went quiet longer than the idle window before these packets
        # (seconds before the test runs, not before the suite was collected)
        ({"nbytes": 500, "first_ago_s": 1.0},
         {"first_seen": -2 * IDLE_S, "last_seen": -IDLE_S - 5}, "idle"),
    ],
)
def test_other_traffic_on_the_5_tuple_starts_afresh(
    tmp_path: Path, counters_args: dict[str, Any], row_changes: dict[str, Any], reason: str
) -> None:
    now = time.time()
    changes = {k: now + v for k, v in row_changes.items()}  # times relative to now
    rows = _stored(tmp_path, [_row(now, **changes)], now - 2 * IDLE_S)
    assert len(rows) == 1
    resumable = ResumableFlows(rows, IDLE_S)
    assert resumable.claim(_egress(**counters_args), now) is None
    assert resumable.counts[reason] == 1 and resumable.counts["resumed"] == 0
    assert len(resumable) == 0  # consumed: a later entry of the same conversation is new


def test_rows_not_seen_again_leave_after_the_idle_window(tmp_path: Path) -> None:
    now = time.time()
    rows = _stored(tmp_path, [_row(now), _row(now, sport=54005, last_seen=now - 200)],
                   now - IDLE_S)
    resumable = ResumableFlows(rows, IDLE_S)
    resumable.expire(now + 150)  # the second row is now 350 s quiet
    assert len(resumable) == 1 and resumable.counts["not_seen_again"] == 1
    resumable.expire(now + IDLE_S)
    assert len(resumable) == 0 and resumable.counts["not_seen_again"] == 2
