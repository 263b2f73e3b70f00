from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from leaktap.controller.api.deps import AgentDep, ReaderDep, json_response

router = APIRouter(prefix="/v1/flows", tags=["flows"])


@router.get("")
def read_flows(
    agent: AgentDep,
    _: ReaderDep,
    tenant: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    vendor: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    since: Annotated[float | None, Query(ge=0, allow_inf_nan=False,
                                         description="epoch seconds; flows seen at or after")]
    = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="most recent first")] = 100,
) -> Response:
    rows = agent.flow_records(tenant=tenant, vendor=vendor, since=since, limit=limit)
    return json_response({"flows": rows})
