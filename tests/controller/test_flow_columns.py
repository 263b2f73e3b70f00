"""The columnar flow drain (issue 16.5): the agent's poll folds drained flows into
numpy columns (attribution/live.py) and must store, bucket and attribute exactly
what the object poll (one ConversationTable object per conversation) does."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from leaktap.controller import agent as agent_module
from leaktap.controller.agent import Agent
from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.attribution.flows import FF_SYN
from leaktap.controller.attribution.live import LiveConversations, TrackedAttributor
from leaktap.controller.config import parse_config
from leaktap.controller.kernel.flow_batch import FlowBatch
from leaktap.controller.kernel.maps import FlowCounters, FlowKey, KernelName
from leaktap.controller.storage import Store
from tests.controller.map_doubles import IdleMapReader

CONFIG = """
tenants:
  - name: acme
    match: {sni: "{tenant}.my.salesforce.com"}
    allow: ["salesforce:acme"]
"""
LOCAL, CRM, OTHER = "198.18.70.1", "198.18.71.1", "198.18.72.1"
OUT, IN = 0, 1


class _Script(IdleMapReader):
    """A map reader replaying a scripted drain per poll: (flows, kernel names)."""

    def __init__(self, polls: list[tuple[list[FlowCounters], list[KernelName]]]) -> None:
        self.polls = polls
        self.at = -1

    def drain_flows(self) -> list[FlowCounters]:
        self.at += 1
        return self.polls[self.at][0] if self.at < len(self.polls) else []

    def drain_names(self) -> list[KernelName]:
        return self.polls[self.at][1] if self.at < len(self.polls) else []


def _flow(src: tuple[str, int], dst: tuple[str, int], nbytes: int, direction: int = OUT,
          proto: int = 6, flags: int = 0, uid: int = 1000) -> FlowCounters:
    now = time.monotonic_ns()
    key = FlowKey(7 if direction == OUT else 0, 4, proto, direction, src[0], dst[0], src[1],
                  dst[1])
    return FlowCounters(key, nbytes, nbytes // 1000 + 1, now - 5_000_000, now, uid, flags)


def _name(src: tuple[str, int], dst: tuple[str, int], name: str) -> KernelName:
    key = FlowKey(7, 4, 6, OUT, src[0], dst[0], src[1], dst[1])
    return KernelName(key, name, "named", False, 1000, 1, time.monotonic_ns(), 2)


def _script() -> list[tuple[list[FlowCounters], list[KernelName]]]:
    a, crm = (LOCAL, 40001), (CRM, 443)  # a SYN: waits for its hello, named at poll 2
    b, other = (LOCAL, 40002), (OTHER, 443)  # established: named at once, renamed later
    u, dns = (LOCAL, 5353), (OTHER, 53)  # UDP both ways
    return [
        ([_flow(a, crm, 900, flags=FF_SYN), _flow(b, other, 5000),
          _flow(u, dns, 80, proto=17), _flow(dns, u, 200, IN, proto=17)], []),
        ([_flow(a, crm, 70_000), _flow(crm, a, 3000, IN), _flow(b, other, 1200)], []),
        ([_flow(a, crm, 50_000), _flow(b, other, 800), _flow(other, b, 9000, IN)],
         [_name(a, crm, "acme.my.salesforce.com"), _name(b, other, "acme.my.salesforce.com")]),
        ([_flow(b, other, 100), _flow(u, dns, 80, proto=17)], []),
    ]


def _run(tmp_path: Path, drain: str, monkeypatch: pytest.MonkeyPatch,
         row_budget: int | None = None) -> tuple[Agent, list[dict[str, Any]],
                                                 list[dict[str, Any]]]:
    monkeypatch.setenv(agent_module.FLOW_DRAIN_ENV, drain)
    config = parse_config(CONFIG)
    store = Store(tmp_path / f"{drain}.db")
    agent = Agent(config, ["lt-none"], store)
    agent.attributor = (TrackedAttributor if agent.columnar else Attributor)(config)
    agent.reader = _Script(_script())  # type: ignore[assignment]
    for _ in range(4):
        agent.poll_once(row_budget=row_budget)
    rows = sorted(store.flows(limit=100), key=lambda r: (r["src"], r["sport"]))
    buckets = sorted(store.buckets(0, time.time() + 120),
                     key=lambda r: (r["tenant"], r["destination"]))
    store.close()
    return agent, rows, buckets


def _comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # ids follow insertion order; times are read from two clocks a moment apart
    return [{k: v for k, v in r.items() if k not in ("id", "first_seen", "last_seen")}
            for r in rows]


@pytest.mark.parametrize("slice_rows", [agent_module.POLL_SLICE_ROWS, 1])
def test_columns_store_bucket_and_attribute_as_the_object_poll(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slice_rows: int) -> None:
    monkeypatch.setattr(agent_module, "POLL_SLICE_ROWS", slice_rows)  # 1: a row at a time
    objects, rows_o, buckets_o = _run(tmp_path, "objects", monkeypatch)
    columns, rows_c, buckets_c = _run(tmp_path, "columns", monkeypatch)
    assert isinstance(columns.table, LiveConversations)
    assert len(rows_c) == 3 and _comparable(rows_c) == _comparable(rows_o)
    assert buckets_c == buckets_o
    assert columns.egress_by_destination == objects.egress_by_destination
    assert columns.attributed_bytes == objects.attributed_bytes == 140_360
    _, syn, renamed = rows_c  # by source port: the UDP one first
    # waited for its hello; the established one named again when the kernel read its name
    assert (syn["sni"], syn["tenant"], syn["bytes_out"], syn["bytes_in"]) == (
        "acme.my.salesforce.com", "acme", 120_900, 3000)
    assert (renamed["sni"], renamed["bytes_out"], renamed["bytes_in"]) == (
        "acme.my.salesforce.com", 7100, 9000)
    assert all(abs(r["last_seen"] - time.time()) < 5 for r in rows_c)


def test_a_row_budget_refreshes_the_least_recently_written_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(agent_module.FLOW_DRAIN_ENV, "columns")
    config = parse_config("tenants: []\n")
    store = Store(tmp_path / "lt.db")
    agent = Agent(config, ["lt-none"], store)
    agent.attributor = TrackedAttributor(config)
    ends = [((LOCAL, 41000 + i), (OTHER, 443)) for i in range(3)]
    again = [_flow(s, d, 10) for s, d in ends]
    agent.reader = _Script([(again, [])] * 4)  # type: ignore[assignment]
    agent.poll_once(row_budget=1)  # new rows: all written in full
    stored = [[r["bytes_out"] for r in sorted(store.flows(limit=9), key=lambda r: r["sport"])]]
    for _ in range(2):
        agent.poll_once(row_budget=1)  # one refreshed per poll, the longest unwritten first
        stored.append([r["bytes_out"] for r in sorted(store.flows(limit=9),
                                                     key=lambda r: r["sport"])])
    agent.poll_once()  # an explicit poll writes every row
    stored.append([r["bytes_out"] for r in sorted(store.flows(limit=9),
                                                 key=lambda r: r["sport"])])
    store.close()
    assert stored[0] == [10, 10, 10]
    assert sorted(stored[1]) == [10, 10, 20] and sorted(stored[2]) == [10, 20, 30]
    assert stored[3] == [40, 40, 40]


def test_batch_rows_round_trip_and_conversations_expire(
        monkeypatch: pytest.MonkeyPatch) -> None:
    flows = [_flow((LOCAL, 42000 + i), (OTHER, 443), 100 + i) for i in range(5)]
    flows.append(_flow((OTHER, 443), (LOCAL, 42000), 7, IN))
    flows.append(_flow(("2001:db8::1", 5000), ("2001:db8::2", 443), 9))
    flows[-1].key = FlowKey(7, 6, 6, OUT, "2001:db8::1", "2001:db8::2", 5000, 443)
    batch = FlowBatch.from_counters(flows)
    for i, f in enumerate(flows):  # every row's last packet is the drain time
        assert batch.counters(i) == FlowCounters(f.key, f.tx_bytes, f.tx_packets,
                                                 f.first_seen_ns, batch.now_ns, f.uid, f.flags)
    table = LiveConversations()
    slots, sent_by_a, created = table.locate(batch)
    assert len(table) == 6 and created == [0, 1, 2, 3, 4, 6]
    assert slots[5] == slots[0] and sent_by_a[5] != sent_by_a[0]  # the reply: same one
    table.accumulate(batch, slots, sent_by_a)
    conv = table.conversation(int(slots[0]))
    assert (conv.a, conv.b) == ((LOCAL, 42000), (OTHER, 443))  # conversation_id's order
    assert (conv.a_to_b.bytes, conv.b_to_a.bytes) == (100, 7) and conv.local_is_a is True
    again, _, created = table.locate(batch)
    assert created == [] and np.array_equal(again, slots)
    assert table.slot_of((4, 6, (LOCAL, 42000), (OTHER, 443))) == int(slots[0])
    gone = table.expire(time.monotonic_ns() + 1)
    assert len(gone) == 6 and len(table) == 0
    assert table.slot_of((4, 6, (LOCAL, 42000), (OTHER, 443))) is None
    _, _, created = table.locate(batch)
    assert len(created) == 6  # the freed slots are used again
