"""The CRM data-flow map (issue 14.3): which objects each tenant's processes read
and write, per CRM instance, with volumes, outcomes and the classes of data seen."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from leaktap.controller.api.deps import AgentDep, ReaderDep

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/dataflows", tags=["dataflows"])

STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "none")


class DataFlowPublic(BaseModel):
    tenant: str
    exe: str
    crm_vendor: str
    crm_instance: str | None
    object: str  # the CRM object; "other" for shapes the grammar does not know
    operation: Literal["read", "query", "create", "update", "upsert", "delete", "bulk", "admin"]
    direction: Literal["to_crm", "from_crm"]
    requests: int
    records: int  # counted in responses (reads) or requests (writes)
    records_unknown: int  # calls whose record count could not be read
    request_bytes: int
    response_bytes: int
    outcomes: dict[str, int]  # requests by status class: 2xx 3xx 4xx 5xx none (no answer)
    data_classes: list[str]  # email phone national_id card iban free_text
    templates: list[str]  # path templates: no ids, no values
    first_seen: float
    last_seen: float


class DataFlowsPublic(BaseModel):
    dataflows: list[DataFlowPublic]


def public(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if not k.startswith("status_")}
    out["outcomes"] = {c: row[f"status_{c}"] for c in STATUS_CLASSES}
    return out


@router.get("", response_model=DataFlowsPublic)
def read_dataflows(
    agent: AgentDep,
    _: ReaderDep,
    tenant: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    since: Annotated[float | None, Query(ge=0, allow_inf_nan=False,
                                         description="epoch seconds; last seen at or after")]
    = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="most recent first")] = 1000,
) -> dict[str, Any]:
    fmap = getattr(agent, "dataflows", None)
    if fmap is not None:
        try:
            fmap.flush()  # the calls of the last seconds too, not only the last periodic write
        except Exception:  # noqa: BLE001 - serve what is stored; the poll retries the write
            logger.exception("writing the data-flow map")
    rows = agent.store.dataflows(tenant=tenant, since=since, limit=limit)
    return {"dataflows": [public(r) for r in rows]}
