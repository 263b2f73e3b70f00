"""Prometheus text exposition: kernel counters, egress by destination, loss,
alerts and deliveries."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from leaktap.controller.api.deps import AgentDep, ReaderDep
from leaktap.controller.attribution import losses as userspace

router = APIRouter(tags=["metrics"])


# the kernel object each loss counter is about (every other loss is the event ring)
LOSS_RING = {
    "loss_flow_insert": "lt_flows",
    "loss_cgroup_full": "lt_cgtot",
    "loss_hello_pending": "lt_hello",
    "loss_hello_walk": "lt_hello",
    "loss_hello_gap": "lt_hello",
}


class _AgentCollector:
    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self):  # type: ignore[no-untyped-def]
        a = self.agent
        kernel = CounterMetricFamily(
            "leaktap_kernel_events", "kernel counters by reason (lt_stats)", labels=["reason"]
        )
        for reason, value in sorted(a.stats.items()):
            kernel.add_metric([reason], value)
        yield kernel
        totals = CounterMetricFamily(
            "leaktap_interface_bytes", "bytes seen by the probes", labels=["direction"]
        )
        for d, (b, _p) in sorted(a.totals.items()):
            totals.add_metric(["egress" if d == 0 else "ingress"], b)
        yield totals
        cg = CounterMetricFamily(
            "leaktap_cgroup_egress_bytes", "egress bytes per cgroup id (other: cgroups beyond "
            "the series cap and removed cgroups)", labels=["cgroup_id"]
        )
        accounting = getattr(a, "cgroup_accounting", None)
        by_label = accounting.series() if accounting is not None else {
            str(k): v for k, v in a.cgroup_totals.items()}
        for label, (b, _p) in sorted(by_label.items()):
            cg.add_metric([label], b)
        yield cg
        folded = CounterMetricFamily(
            "leaktap_metric_series_folded", "label values counted under `other` because their "
            "metric reached its series cap", labels=["metric"],
        )
        for metric, cap in (("leaktap_egress_bytes", getattr(a, "egress_series", None)),
                            ("leaktap_cgroup_egress_bytes", getattr(accounting, "cap", None)),
                            ("leaktap_enforcement_decisions",
                             getattr(getattr(a, "enforcement", None), "series", None)),
                            ("leaktap_crm_egress_bytes_by_coverage",
                             getattr(getattr(a, "coverage", None), "tenant_series", None))):
            if cap is not None:
                folded.add_metric([metric], cap.folded)
        yield folded
        yield CounterMetricFamily(
            "leaktap_unattributed_bytes",
            "bytes counted in the totals but in no flow record (LRU evictions)",
            value=a.unattributed_bytes,
        )
        yield GaugeMetricFamily(
            "leaktap_conversations", "conversations in memory", value=len(a.table)
        )
        yield CounterMetricFamily(
            "leaktap_flow_entries_drained", "flow entries the polls took from the kernel",
            value=getattr(a, "flow_entries_drained", 0),  # agent views of tests lack it
        )
        egress_bytes = CounterMetricFamily(
            "leaktap_egress_bytes", "egress bytes attributed to a flow",
            labels=["tenant", "vendor", "instance"],
        )
        egress_packets = CounterMetricFamily(
            "leaktap_egress_packets", "egress packets attributed to a flow",
            labels=["tenant", "vendor", "instance"],
        )
        for (tenant, vendor, instance), (b, p) in sorted(a.egress_by_destination.items()):
            egress_bytes.add_metric([tenant, vendor, instance], b)
            egress_packets.add_metric([tenant, vendor, instance], p)
        yield egress_bytes
        yield egress_packets
        dropped = CounterMetricFamily(
            "leaktap_events_dropped", "kernel samples and updates lost, by ring/map and reason",
            labels=["ring", "reason"],
        )
        for reason, value in sorted(a.stats.items()):
            if reason.startswith("loss_"):
                dropped.add_metric([LOSS_RING.get(reason, "lt_events"),
                                    reason.removeprefix("loss_")], value)
        plaintext = a.plaintext.stats() if getattr(a, "plaintext", None) is not None else {}
        for name, value in sorted(plaintext.items()):
            if name.startswith("ssl_loss_"):
                dropped.add_metric(["lt_ssl_events", name.removeprefix("ssl_loss_")], value)
        yield dropped
        user = CounterMetricFamily(
            "leaktap_userspace_dropped", "user-space give-ups by stage and reason (ClientHello "
            "reassembly, QUIC Initials, DNS cache); /v1/stats gives the remedy",
            labels=["stage", "reason"],
        )
        attributor = getattr(a, "attributor", None)
        for (stage, reason), value in sorted(userspace.drops(attributor).items()):
            user.add_metric([stage, reason], value)
        yield user
        if plaintext:
            inspected = CounterMetricFamily(
                "leaktap_plaintext", "TLS plaintext inspection counters", labels=["counter"]
            )
            for name, value in sorted(plaintext.items()):
                if not name.startswith("ssl_loss_"):
                    inspected.add_metric([name], value)
            yield inspected
        yield from _enforcement_metrics(getattr(a, "enforcement", None))
        attached = GaugeMetricFamily(
            "leaktap_probe_attached",
            "1 when the programs are attached to the interface (mode: tc, native, generic)",
            labels=["interface", "mode"],
        )
        modes = dict(getattr(a.probes, "attach_modes", None) or {})
        for iface in a.interfaces:
            up = a.attached and iface in modes
            attached.add_metric([iface, modes.get(iface, "")], 1 if up else 0)
        yield attached
        yield from _coverage_metrics(getattr(a, "coverage", None))
        yield from _alert_metrics(getattr(a, "alerts", None), getattr(a, "outbox", None))
        yield from _detector_metrics(getattr(a, "detection", None))


def _detector_metrics(detection: Any) -> Iterator[Metric]:
    """The streaming detector's series table (issue 17.5; controller/detection.py)."""
    if detection is None:
        return
    live, evicted, refused = detection.series_stats()
    yield GaugeMetricFamily(
        "leaktap_detector_series", "series the streaming detector keeps state for "
        "(tenant x destination, and tenant totals)", value=live,
    )
    dropped = CounterMetricFamily(
        "leaktap_detector_series_evicted", "detector series dropped with their baseline, by "
        "reason (idle: no traffic for detection.series_idle_days; capacity: the least "
        "recently active, to admit a new series at the cap)", labels=["reason"],
    )
    for reason, n in sorted(evicted.items()):
        dropped.add_metric([reason], n)
    yield dropped
    yield CounterMetricFamily(
        "leaktap_detector_rows_refused", "minute rows of new series not admitted because "
        "every detector series had traffic in that minute (counted in the tenant total)",
        value=refused,
    )


def _coverage_metrics(coverage: Any) -> Iterator[Metric]:
    """Bytes to CRMs and CRM-talking processes by whether their plaintext is inspected
    (issue 13.3; controller/plaintext/coverage.py)."""
    if coverage is None:
        return
    by_coverage = CounterMetricFamily(
        "leaktap_crm_egress_bytes_by_coverage", "egress bytes to CRMs by tenant and whether "
        "the sending process's TLS plaintext is inspected", labels=["tenant", "inspected"],
    )
    for (tenant, inspected), n in sorted(coverage.bytes_by_coverage.items()):
        by_coverage.add_metric([tenant, "true" if inspected else "false"], n)
    yield by_coverage
    processes = GaugeMetricFamily(
        "leaktap_coverage_processes", "processes that talked to a CRM in the last 24 h, by "
        "TLS implementation and whether they are inspected", labels=["tls", "inspected"],
    )
    for (tls, inspected), n in sorted(coverage.processes_by_class().items()):
        processes.add_metric([tls, "true" if inspected else "false"], n)
    yield processes


def _enforcement_metrics(enforcement: Any) -> Iterator[Metric]:
    decisions = CounterMetricFamily(
        "leaktap_enforcement_decisions", "enforcement decisions (blocked, would_block) by "
        "tenant and destination; label sets beyond the cap count as other",
        labels=["tenant", "vendor", "crm_instance", "action"],
    )
    counts = enforcement.counts if enforcement is not None else {}
    for labels, n in sorted(counts.items()):
        decisions.add_metric(list(labels), n)
    yield decisions


def _alert_metrics(alerts: Any, outbox: Any) -> Iterator[Metric]:
    raised = CounterMetricFamily(
        "leaktap_alerts", "alerts raised (paged) since start", labels=["kind", "severity"]
    )
    for (kind, severity), n in sorted((alerts.raised if alerts else {}).items()):
        raised.add_metric([kind, severity], n)
    yield raised
    deliveries = CounterMetricFamily(
        "leaktap_sink_deliveries", "delivery attempts by sink and outcome (delivered, retry, "
        "failed: rejected for good, gave_up: still failing at the give-up age)",
        labels=["sink", "outcome"],
    )
    pending = GaugeMetricFamily(
        "leaktap_outbox_pending", "outbox entries waiting for delivery", labels=["sink"]
    )
    failed = GaugeMetricFamily(
        "leaktap_outbox_failed", "outbox entries that failed for good and were not re-sent",
        labels=["sink"],
    )
    if outbox is not None:
        for (sink, outcome), n in sorted(outbox.deliveries.items()):
            deliveries.add_metric([sink, outcome], n)
        waiting = outbox.pending_by_sink()
        for sink in sorted(set(outbox.sinks) | set(waiting)):
            pending.add_metric([sink], waiting.get(sink, 0))
        lost = outbox.failed_by_sink()
        for sink in sorted(set(outbox.sinks) | set(lost)):
            failed.add_metric([sink], lost.get(sink, 0))
    yield deliveries
    yield pending
    yield failed


@router.get("/metrics")
def read_metrics(agent: AgentDep, _: ReaderDep) -> Response:
    registry = CollectorRegistry()
    registry.register(_AgentCollector(agent))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
