"""Kernel counters and losses as JSON, each loss with what to do about it: the numbers
behind /metrics, for the dashboard and for a person with curl."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from leaktap.controller.api.deps import AgentDep, ReaderDep
from leaktap.controller.api.routes.metrics import LOSS_RING
from leaktap.controller.attribution import losses as userspace
from leaktap.controller.kernel import loss

router = APIRouter(prefix="/v1/stats", tags=["stats"])


@router.get("")
def read_stats(agent: AgentDep, _: ReaderDep) -> dict[str, Any]:
    kernel = dict(agent.stats)
    monitor = getattr(agent, "plaintext", None)
    inspection = monitor.stats() if monitor is not None else {}
    plaintext_remedies: dict[str, str] = {}
    if monitor is not None:  # the inspection's modules are loaded only when it runs
        from leaktap.controller.plaintext.monitor import REMEDIES as plaintext_remedies
    losses = [
        {"ring": LOSS_RING.get(name, "lt_events"), "reason": name.removeprefix("loss_"),
         "count": value, "remedy": loss.REMEDIES.get(name)}
        for name, value in sorted(kernel.items()) if name.startswith("loss_")
    ] + [
        # server names the kernel handed to the ring (issue 12): named there unless lost
        {"ring": "lt_names", "reason": name, "count": value, "remedy": loss.REMEDIES.get(name)}
        for name, value in sorted(kernel.items()) if name.startswith("sni_giveup_")
    ] + [
        {"ring": "lt_ssl_events", "reason": name.removeprefix("ssl_loss_"), "count": value,
         "remedy": plaintext_remedies.get(name)}
        for name, value in sorted(inspection.items()) if name.startswith("ssl_loss_")
    ]
    attributor = getattr(agent, "attributor", None)
    losses += [
        {"ring": stage, "stage": stage, "reason": reason, "count": value,
         "remedy": userspace.remedy(stage, reason)}
        for (stage, reason), value in sorted(userspace.drops(attributor).items())
    ]
    modes = dict(getattr(agent.probes, "attach_modes", None) or {})
    return {
        "losses": losses,
        "kernel": {k: v for k, v in sorted(kernel.items()) if not k.startswith("loss_")},
        "plaintext": {k: v for k, v in sorted(inspection.items())
                      if not k.startswith("ssl_loss_")},
        "userspace": userspace.counters(attributor),
        "coverage": agent.coverage.stats() if getattr(agent, "coverage", None) else {},
        # the CRM data-flow map: calls mapped, flows, give-ups by reason, findings
        "dataflows": dict(agent.dataflows.stats) if getattr(agent, "dataflows", None) else {},
        "unattributed_bytes": agent.unattributed_bytes,
        "interfaces": {i: (modes.get(i) if agent.attached else None) for i in agent.interfaces},
    }
