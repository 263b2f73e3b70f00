from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from leaktap.controller.api.deps import AgentDep, ReaderDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def read_health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def read_ready(agent: AgentDep, _: ReaderDep) -> dict[str, object]:
    ok, detail = agent.ready()
    if not ok:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail)
    # per interface: tc, or the XDP mode the driver allowed (native | generic)
    body: dict[str, object] = {"status": "ready", "attached": dict(agent.probes.attach_modes)}
    # off | dry-run | block, the tenants in each, when the policy was loaded
    enforcement = getattr(agent, "enforcement", None)
    if enforcement is not None:
        body["enforcement"] = enforcement.state()
    # still serving, but alerts that never reached a sink need an operator
    outbox = getattr(agent, "outbox", None)
    failed = outbox.failed_by_sink() if outbox is not None else {}
    if any(failed.values()):
        body["status"] = "degraded"
        body["degraded"] = [
            f"sink {sink}: {n} failed deliveries (POST /v1/sinks/{sink}/retry re-sends them)"
            for sink, n in sorted(failed.items()) if n
        ]
    return body
