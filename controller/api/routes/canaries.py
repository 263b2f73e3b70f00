"""Registering canary tokens at run time (admin): a record planted in a CRM
whose token must never leave in plaintext for any other destination."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field

from leaktap.controller.api.deps import AdminDep, AgentDep

router = APIRouter(prefix="/v1/canaries", tags=["canaries"])


class CanaryCreate(BaseModel):
    token: Annotated[str, Field(min_length=8, max_length=512)]
    tenant: Annotated[str | None, Field(max_length=64)] = None
    record: Annotated[str, Field(min_length=1, max_length=256)] = "canary"
    environment: Annotated[str | None, Field(max_length=64)] = None


@router.post("", status_code=status.HTTP_201_CREATED)
def create_canary(body: CanaryCreate, agent: AgentDep, _: AdminDep) -> dict[str, str]:
    if getattr(agent, "plaintext", None) is None:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            "plaintext inspection is not enabled (plaintext.enabled)")
    agent.plaintext.add_canary(body.token, body.tenant, body.record, body.environment)
    # kept in the store (0600): a restart watches for it again
    agent.store.add_canary(body.token, body.tenant, body.record, body.environment)
    # the token itself is never echoed back or logged
    return {"status": "registered", "record": body.record}
