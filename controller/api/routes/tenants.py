from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, Query, status

from leaktap.controller.api.deps import AgentDep, ReaderDep
from leaktap.controller.config import UNASSIGNED_TENANT
from leaktap.controller.storage import minute_of

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])

DAY_S = 86400
# the band drawn around the expected volume: this many of the detector's sigmas (log space)
BAND_SIGMAS = 2.0


@router.get("")
def read_tenants(
    agent: AgentDep,
    _: ReaderDep,
    since: float | None = Query(None, description="epoch seconds (default: last 24 h)"),
) -> dict[str, list[dict[str, Any]]]:
    since = since if since is not None else time.time() - DAY_S
    seen = {row["tenant"]: row for row in agent.store.tenants(since)}
    names = [t.name for t in agent.config.tenants] + [UNASSIGNED_TENANT]
    names += sorted(n for n in seen if n not in names)
    out = []
    for name in names:
        row = seen.get(name, {})
        out.append(
            {
                "tenant": name,
                "configured": name != UNASSIGNED_TENANT and name in agent.config_tenant_names,
                "bytes_out": row.get("bytes_out") or 0,
                "bytes_in": row.get("bytes_in") or 0,
                "destinations": row.get("destinations") or 0,
                "last_minute": row.get("last_minute"),
            }
        )
    return {"tenants": out}


@router.get("/{tenant}/volume")
def read_tenant_volume(
    tenant: str,
    agent: AgentDep,
    _: ReaderDep,
    since: float | None = Query(None, description="epoch seconds (default: last 24 h)"),
    until: float | None = Query(None, description="epoch seconds (default: now)"),
    vendor: str | None = None,
) -> dict[str, Any]:
    until = until if until is not None else time.time() + 60
    since = since if since is not None else until - DAY_S
    if since >= until:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "since must be before until")
    known = tenant in agent.config_tenant_names or tenant == UNASSIGNED_TENANT
    series = agent.store.volume(tenant, since, until, vendor)
    if not known and not series:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown tenant {tenant!r}")
    # the detector baselines each tenant's CRM total (crm_bytes_out), not a vendor's share
    detection = getattr(agent, "detection", None)
    bands = (
        detection.baseline(tenant, [p["ts"] for p in series], BAND_SIGMAS)
        if detection is not None and vendor is None else [None] * len(series)
    )
    # the open minute is already in the store after the agent's next poll (once a
    # second); it is still counting, so readers must not compare it as a whole minute
    open_minute = minute_of(time.time())
    for point, band in zip(series, bands, strict=True):
        point["baseline"] = None if band is None else {
            "expected": round(band[0]), "low": round(band[1]), "high": round(band[2])}
        point["partial"] = point["ts"] >= open_minute
    return {"tenant": tenant, "step_s": 60, "band_sigmas": BAND_SIGMAS, "series": series}
