"""Delivery state per sink: pending, delivered and failed entries, backoff, last error."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel

from leaktap.controller.api.deps import AgentDep, ReaderDep

router = APIRouter(prefix="/v1/sinks", tags=["sinks"])


class SinkStatePublic(BaseModel):
    sink: str
    configured: bool
    pending: int
    delivered: int
    failed: int
    consecutive_failures: int
    held_until: float | None
    last_error: str | None


class SinkStatesPublic(BaseModel):
    sinks: list[SinkStatePublic]


@router.get("", response_model=SinkStatesPublic)
def read_sinks(agent: AgentDep, _: ReaderDep) -> dict[str, Any]:
    outbox = getattr(agent, "outbox", None)
    if outbox is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "alerting is not running")
    return {"sinks": outbox.sink_states()}
