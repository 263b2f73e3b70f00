"""Audit of transfers and attempted transfers, from the TCP flags of each flow."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from leaktap.controller.api.deps import AgentDep, ReaderDep
from leaktap.controller.kernel import abi

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/audit", tags=["audit"])

SINCE = "epoch seconds; last seen at or after"


class TransferPublic(BaseModel):
    id: int | None  # None: an attempt that never became a flow (refused at connect)
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
    # completed | unanswered (SYN, no SYN+ACK) | refused (SYN answered by RST) | reset;
    # blocked | would_block: an enforcement decision on it (its reason below)
    outcome: Literal["completed", "unanswered", "refused", "reset", "blocked", "would_block"]
    enforcement_reason: str | None = None


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
    # attempted calls (issue 14.4): the HTTP status (None: no answer) and
    # refused (401/403) | failed (other 4xx, 5xx) | unanswered; None for bulk-call rows
    status: int | None = None
    outcome: Literal["refused", "failed", "unanswered"] | None = None


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
    enforcement = getattr(agent, "enforcement", None)
    if enforcement is not None:
        decisions = enforcement.log.recent(tenant=tenant, since=since, limit=limit)
        rows = with_decisions(rows, decisions, attempted, limit)
    fmap = getattr(agent, "dataflows", None)
    if fmap is not None:
        try:
            fmap.flush()  # attempted CRM calls wait in the data-flow map between writes
        except Exception:  # noqa: BLE001 - serve what is stored; the poll retries the write
            logger.exception("writing the data-flow map")
    calls = agent.store.audit_calls(tenant=tenant, since=since, limit=limit,
                                    attempted_only=attempted)
    return {"transfers": rows, "calls": calls}


def with_decisions(rows: list[dict[str, Any]], decisions: list[dict[str, Any]],
                   attempted_only: bool, limit: int) -> list[dict[str, Any]]:
    """Transfers with the enforcement decision taken on each: a flow's outcome becomes
    the decision's action; a decision without a flow (a connect refused before any
    packet) is listed on its own."""
    by_flow = {(d["src"], d["sport"], d["dst"], d["dport"]): d
               for d in reversed(decisions) if d["sport"]}
    alone = [d for d in decisions if not d["sport"]]  # refused before it had a port
    out = []
    for row in rows:
        d = by_flow.pop((row["src"], row["sport"], row["dst"], row["dport"]), None)
        if d is not None:
            row = {**row, "outcome": d["action"], "enforcement_reason": d["reason"]}
        out.append(row)
    for d in [*by_flow.values(), *alone]:
        if attempted_only and d["action"] != "blocked":
            continue
        out.append({
            "id": None, "src": d["src"], "sport": d["sport"], "dst": d["dst"],
            "dport": d["dport"], "sni": d["host"], "crm_vendor": d["crm_vendor"],
            "crm_instance": d["crm_instance"], "tenant": d["tenant"], "bytes_out": 0,
            "packets_out": 0, "bytes_in": 0, "packets_in": 0, "first_seen": d["ts"],
            "last_seen": d["ts"], "flags_out": 0, "flags_in": 0, "outcome": d["action"],
            "enforcement_reason": d["reason"],
        })
    out.sort(key=lambda r: -float(r["last_seen"]))
    return out[:limit]
