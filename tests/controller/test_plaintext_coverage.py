"""The monitor's accounting of kernel plaintext losses (issue 19.2, 19.4), fed
lt_ssl_lost records as the drain reads them: blinding by a flood alerts, the
middle of one huge write does not, a mostly unseen CRM connection is audited."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from leaktap.analytics.alerts import Finding
from leaktap.analytics.plaintext.inspector import BulkAudit
from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.config import parse_config
from leaktap.controller.plaintext.monitor import PlaintextMonitor, lost_reason_names

PID, SSL = 4321, 0x5000


@pytest.fixture
def monitor(tmp_path: Path) -> tuple[PlaintextMonitor, list[Finding], list[BulkAudit]]:
    config = parse_config(f"""
tenants: [{{name: acme, match: {{uids: [1001]}}}}]
plaintext:
  enabled: true
  select: {{uids: [1001]}}
  hmac_secret_file: {tmp_path / 'hmac.key'}
""")
    findings: list[Finding] = []
    audits: list[BulkAudit] = []
    mon = PlaintextMonitor(config, Attributor(config), findings.append, audits.append)
    return mon, findings, audits


def record(writes: int = 1) -> SimpleNamespace:
    return SimpleNamespace(cgroup_id=0, uid=1001, fd=-1, comm=b"crm-sync\0\0", writes=writes)


def talking_to_salesforce(mon: PlaintextMonitor, captured: int = 0) -> None:
    ev = SimpleNamespace(tgid=PID, ssl_ptr=SSL, cgroup_id=0, uid=1001, fd=-1, comm="crm-sync")
    cov = mon._coverage(mon.context(ev))  # type: ignore[arg-type]
    cov.crm = ("salesforce", "acme")
    cov.captured = captured


def test_the_lost_reasons_come_from_the_header():
    assert lost_reason_names() == ["rate_limited", "budget", "chunk_bound", "ringbuf_full",
                                   "read_user"]


def test_a_flood_to_a_crm_is_inspection_evaded_without_plaintext(monitor):
    mon, findings, _ = monitor
    talking_to_salesforce(mon)
    mon._account_lost(PID, SSL, record(writes=1800), {"rate_limited": 57_600})

    (f,) = findings
    assert (f.kind, f.tenant, f.crm_vendor, f.crm_instance, f.severity) == (
        "inspection_evaded", "acme", "salesforce", "acme", "high")
    assert f.evidence["source"] == "kernel" and f.evidence["lost"] == "rate_limited"
    assert (f.evidence["lost_bytes"], f.evidence["writes"], f.evidence["pid"]) == (
        57_600, 1800, PID)
    assert mon.counters["uncaptured_bytes_rate_limited"] == 57_600
    assert mon.process_lost[PID] == {"rate_limited": 57_600}
    # the inspector was told too (its streams show the gap)
    assert mon.inspector.process_loss[PID]["rate_limited"] == 57_600


def test_the_middle_of_one_huge_write_is_counted_not_alerted(monitor):
    mon, findings, audits = monitor
    talking_to_salesforce(mon, captured=256 << 10)
    mon._account_lost(PID, SSL, record(), {"chunk_bound": 1 << 20})

    assert not [f for f in findings if f.evidence.get("source") == "kernel"]
    assert mon.coverage[PID, SSL].lost == {"chunk_bound": 1 << 20}
    # 1 MiB of 1.25 MiB unseen on a CRM connection: audited once
    (a,) = audits
    assert (a.operation, a.tenant, a.crm_vendor, a.request_bytes, a.pid) == (
        "inspection:unseen", "acme", "salesforce", (1 << 20) + (256 << 10), PID)
    mon._account_lost(PID, SSL, record(), {"chunk_bound": 1 << 20})
    assert len(audits) == 1


def test_losses_away_from_any_crm_are_only_counted(monitor):
    mon, findings, audits = monitor
    mon._account_lost(PID, SSL, record(), {"rate_limited": 4096, "ringbuf_full": 100})
    assert not [f for f in findings if f.evidence.get("source") == "kernel"] and not audits
    assert mon.counters["uncaptured_bytes_ringbuf_full"] == 100
