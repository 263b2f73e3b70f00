"""Delivery state per sink (pending, delivered and failed entries, backoff, last error)
and the re-send of failed deliveries."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel

from leaktap.controller.api.deps import AdminDep, AgentDep, ReaderDep

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


class SinkRetryPublic(BaseModel):
    sink: str
    requeued: int  # failed entries, and the later changes of their alerts, sent again


def _outbox(agent: Any) -> Any:
    outbox = getattr(agent, "outbox", None)
    if outbox is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "alerting is not running")
    return outbox


@router.get("", response_model=SinkStatesPublic)
def read_sinks(agent: AgentDep, _: ReaderDep) -> dict[str, Any]:
    outbox = getattr(agent, "outbox", None)
    # before alerting starts there is no sink to report (the dashboard polls this)
    return {"sinks": outbox.sink_states() if outbox is not None else []}


@router.post("/{name}/retry", response_model=SinkRetryPublic)
def retry_sink(name: str, agent: AgentDep, _: AdminDep) -> dict[str, Any]:
    outbox = _outbox(agent)
    if name not in outbox.sinks:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such sink configured")
    return {"sink": name, "requeued": outbox.retry(name)}
