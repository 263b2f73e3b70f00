"""Audit of transfers and attempted transfers, from the TCP flags of each flow."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from leaktap.controller.api.deps import AgentDep, ReaderDep
from leaktap.controller.kernel import abi

router = APIRouter(prefix="/v1/audit", tags=["audit"])

SINCE = "epoch seconds; last seen at or after"


class TransferPublic(BaseModel):
    id: int
    src: str
    sport: int
    dst: str
    dport: int
    sni: str | None
    crm_vendor: str | None
    crm_instance: str | None
    tenant: str
    bytes_out: int
    packets_out: int
    bytes_in: int
    packets_in: int
    first_seen: float
    last_seen: float
    flags_out: int
    flags_in: int
    # completed | unanswered (SYN, no SYN+ACK) | refused (SYN answered by RST) | reset
    outcome: Literal["completed", "unanswered", "refused", "reset"]


class CallPublic(BaseModel):
    """A CRM API call seen in TLS plaintext (bulk export, mass operation)."""

    id: int
    ts: float
    tenant: str
    crm_vendor: str | None
    crm_instance: str | None
    destination: str | None
    operation: str
    action: str
    method: str
    path: str
    request_bytes: int
    allowed: bool
    protocol: str
    pid: int
    comm: str


class TransfersPublic(BaseModel):
    transfers: list[TransferPublic]
    calls: list[CallPublic]


@router.get("", response_model=TransfersPublic)
def read_audit(
    agent: AgentDep,
    _: ReaderDep,
    tenant: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    since: Annotated[float | None, Query(ge=0, allow_inf_nan=False, description=SINCE)] = None,
    attempted: Annotated[bool, Query(description="only attempts: unanswered, refused, reset")]
    = False,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    flags = abi.flow_flags()
    rows = agent.store.audit(
        syn=flags["LT_FF_SYN"], synack=flags["LT_FF_SYNACK"], rst=flags["LT_FF_RST"],
        tenant=tenant, since=since, attempted_only=attempted, limit=limit,
    )
    calls = [] if attempted else agent.store.audit_calls(tenant=tenant, since=since, limit=limit)
    return {"transfers": rows, "calls": calls}
