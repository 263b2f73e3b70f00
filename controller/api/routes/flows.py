from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from leaktap.controller.api.deps import AgentDep, ReaderDep

router = APIRouter(prefix="/v1/flows", tags=["flows"])


@router.get("")
def read_flows(
    agent: AgentDep,
    _: ReaderDep,
    tenant: str | None = None,
    vendor: str | None = None,
    since: float | None = Query(None, description="epoch seconds; flows seen at or after"),
) -> dict[str, list[dict[str, Any]]]:
    return {"flows": agent.flow_records(tenant=tenant, vendor=vendor, since=since)}
