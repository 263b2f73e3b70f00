"""No silent loss in user space (issue 11.5): ClientHello reassembly, QUIC and DNS-cache
give-ups provoked through the attribution pipeline appear in /metrics as
leaktap_userspace_dropped_total{stage,reason} and in /v1/stats with a remedy; a
counter added to a stats dataclass later is exported without wiring."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.dns import DNS, DNSQR, DNSRR

from leaktap.controller.api.main import create_app
from leaktap.controller.attribution import losses
from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.attribution.dns_cache import DnsCache
from leaktap.controller.config import parse_config
from leaktap.controller.kernel.ringbuf import Sample
from leaktap.controller.storage import Store
from tests.controller.test_shared_hosts import client_hello

TOKEN = "reader-token-0123456789"


class AgentView:
    """What the routes read from a running Agent, with a real Attributor."""

    def __init__(self, store: Store, attributor: Attributor) -> None:
        self.config = parse_config("{}")
        self.config_tenant_names: set[str] = set()
        self.store, self.attributor = store, attributor
        self.alerts = self.outbox = self.plaintext = None
        self.stats: dict[str, int] = {"loss_ringbuf_full": 0}
        self.totals: dict[int, tuple[int, int]] = {}
        self.cgroup_totals: dict[int, tuple[int, int]] = {}
        self.unattributed_bytes = 0
        self.table: list[object] = []
        self.interfaces = ["lt-ul0"]
        self.attached = True
        self.probes = SimpleNamespace(attach_modes={"lt-ul0": "tc"})
        self.egress_by_destination: dict[tuple[str, str, str], tuple[int, int]] = {}

    def ready(self) -> tuple[bool, str]:
        return True, "ok"

    def flow_records(self, **filters: Any) -> list[dict[str, Any]]:
        return self.store.flows(**filters)


def _sample(kind: str, sport: int, data: bytes, seq: int = 0, proto: int = 6,
            dport: int = 443) -> Sample:
    return Sample(kind, time.monotonic_ns(), 0, 1, 4, proto, 0, "198.18.70.1", "198.18.70.2",
                  sport, dport, 0x18, seq, 1001, len(data), 0, data)


def _provoke(attributor: Attributor) -> None:
    # a ClientHello cut into more one-byte segments than the reassembler follows
    hello = client_hello("acme.my.salesforce.com")
    for i in range(attributor.hellos.max_segments + 1):
        attributor.on_sample(_sample("tls_hello", 41000, hello[i : i + 1], seq=1000 + i))
    # a QUIC long-header Initial (version 1) whose protection does not decrypt
    initial = bytes([0xC3, 0, 0, 0, 1, 8]) + os.urandom(8) + b"\x00\x00\x44\xd0" + bytes(1200)
    attributor.on_sample(_sample("quic_initial", 41001, initial, proto=17))
    # three answers into a DNS cache bounded at two addresses
    for n in range(3):
        name = f"h{n}.example.com"
        answer = DNS(id=n, qr=1, qd=DNSQR(qname=name),
                     an=DNSRR(rrname=name, type="A", rdata=f"198.18.71.{n + 1}", ttl=300))
        attributor.dns.learn_bytes(bytes(answer))


@pytest.fixture
def view(tmp_path: Path) -> Iterator[AgentView]:
    attributor = Attributor(parse_config("{}"), live=False)
    attributor.dns = DnsCache(max_entries=2)
    _provoke(attributor)
    store = Store(tmp_path / "lt.db")
    yield AgentView(store, attributor)
    store.close()


def test_userspace_give_ups_are_in_metrics_and_stats(view: AgentView) -> None:
    a = view.attributor
    assert a.hellos.stats.gave_up_segments == 1
    quic_reasons = {k: v for k, v in dataclasses.asdict(a.quic.stats).items()
                    if v and k not in losses.OUTCOMES["quic"]}
    assert sum(quic_reasons.values()) == 1, a.quic.stats  # the Initial was given up, once
    assert a.dns.stats.evictions == 1
    client = TestClient(create_app(view, readers=[TOKEN], admins=[], manage=False))
    headers = {"Authorization": f"Bearer {TOKEN}"}

    text = client.get("/metrics", headers=headers).text
    dropped = {
        (s.labels["stage"], s.labels["reason"]): s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == "leaktap_userspace_dropped"
        for s in fam.samples if s.name == "leaktap_userspace_dropped_total"
    }
    assert dropped[("tls_reassembly", "gave_up_segments")] == 1
    assert dropped[("dns_cache", "evictions")] == 1
    (quic_reason,) = quic_reasons
    assert dropped[("quic", quic_reason)] == 1
    # every drop field of every stage is exported (zeros included), outcomes are not
    for stage, attr in losses.STAGES.items():
        fields = {f.name for f in dataclasses.fields(getattr(a, attr).stats)}
        assert {r for s, r in dropped if s == stage} == fields - losses.OUTCOMES[stage]
    assert ("tls_reassembly", "completed") not in dropped

    stats = client.get("/v1/stats", headers=headers).json()
    user = {(entry["stage"], entry["reason"]): entry for entry in stats["losses"]
            if "stage" in entry}
    assert user[("tls_reassembly", "gave_up_segments")]["count"] == 1
    assert user[("dns_cache", "evictions")]["count"] == 1
    assert user[("quic", quic_reason)]["count"] == 1
    assert "max_segments" in user[("tls_reassembly", "gave_up_segments")]["remedy"]
    assert "max_entries" in user[("dns_cache", "evictions")]["remedy"]
    assert all(entry["remedy"] for entry in user.values())
    assert stats["userspace"]["dns_cache"]["learned"] == 3


def test_a_counter_added_later_is_exported_with_a_default_remedy() -> None:
    @dataclasses.dataclass
    class GrownDnsStats:
        learned: int = 0
        query_mismatch: int = 0  # e.g. DNS query-matching rejects, added later

    attributor = SimpleNamespace(dns=SimpleNamespace(stats=GrownDnsStats(learned=4,
                                                                         query_mismatch=2)))
    assert losses.drops(attributor) == {("dns_cache", "query_mismatch"): 2}
    assert losses.remedy("dns_cache", "query_mismatch") == losses.DEFAULT_REMEDY["dns_cache"]
    assert losses.remedy("new_stage", "x") == losses.FALLBACK_REMEDY


def test_rises_are_logged_with_their_remedy(caplog: pytest.LogCaptureFixture) -> None:
    attributor = Attributor(parse_config("{}"), live=False)
    monitor = losses.UserspaceLossMonitor()
    assert monitor.check(attributor) == {}
    attributor.dns = DnsCache(max_entries=2)
    _provoke(attributor)
    with caplog.at_level(logging.WARNING, logger="leaktap.controller.attribution.losses"):
        rises = monitor.check(attributor)
    assert rises[("tls_reassembly", "gave_up_segments")] == 1
    assert rises[("dns_cache", "evictions")] == 1
    assert any("dns_cache/evictions" in m and "max_entries" in m for m in caplog.messages)
    assert monitor.check(attributor) == {}  # logged once per rise


def test_names_the_kernel_handed_to_the_ring_are_in_stats_with_a_remedy(view: AgentView) -> None:
    view.stats["sni_giveup_names_full"] = 3
    view.attributor.kernel_names.stats.malformed = 2
    client = TestClient(create_app(view, readers=[TOKEN], admins=[], manage=False))

    stats = client.get("/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"}).json()

    kernel = {e["reason"]: e for e in stats["losses"] if e["ring"] == "lt_names"}
    assert kernel["sni_giveup_names_full"]["count"] == 3
    assert "LT_NAMES_MAX" in kernel["sni_giveup_names_full"]["remedy"]
    user = {e["reason"]: e for e in stats["losses"] if e.get("stage") == "kernel_names"}
    assert user["malformed"]["count"] == 2 and "ring" in user["malformed"]["remedy"]
    assert stats["userspace"]["kernel_names"]["named"] == 0
