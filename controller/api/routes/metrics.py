"""Prometheus text exposition of the agent's kernel counters."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from leaktap.controller.api.deps import AgentDep, ReaderDep

router = APIRouter(tags=["metrics"])


class _AgentCollector:
    def __init__(self, agent: object) -> None:
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
            "leaktap_cgroup_egress_bytes", "egress bytes per cgroup id", labels=["cgroup_id"]
        )
        for cgid, (b, _p) in sorted(a.cgroup_totals.items()):
            cg.add_metric([str(cgid)], b)
        yield cg
        yield CounterMetricFamily(
            "leaktap_unattributed_bytes",
            "bytes counted in the totals but in no flow record (LRU evictions)",
            value=a.unattributed_bytes,
        )
        yield GaugeMetricFamily(
            "leaktap_conversations", "conversations in memory", value=len(a.table)
        )


@router.get("/metrics")
def read_metrics(agent: AgentDep, _: ReaderDep) -> Response:
    registry = CollectorRegistry()
    registry.register(_AgentCollector(agent))  # type: ignore[arg-type]
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
