"""Alerts: list with filters; acknowledge and resolve (admin), with delivery state."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import (
    APIRouter,
    Body,
    Depends,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    status,
)
from pydantic import BaseModel, ConfigDict, Field

from leaktap.analytics.alert_settings import AlertKind
from leaktap.analytics.alerts import AlertManager, InvalidTransition, UnknownAlert
from leaktap.controller.api.deps import AdminDep, AgentDep, ReaderDep

router = APIRouter(prefix="/v1/alerts", tags=["alerts"])

AlertStatus = Literal["open", "acknowledged", "resolved"]
MAX_ID = 2**63 - 1  # SQLite INTEGER
SINCE = "epoch seconds; last seen at or after"


class DeliveryPublic(BaseModel):
    delivery_id: int
    sink: str
    action: str
    state: str
    attempts: int
    last_error: str | None
    next_attempt_ts: float
    last_attempt_ts: float | None
    delivered_ts: float | None


class AlertPublic(BaseModel):
    id: int
    dedup_key: str
    kind: str
    tenant: str
    crm_vendor: str | None
    crm_instance: str | None
    destination: str | None
    severity: str
    score: float
    summary: str
    evidence: dict[str, Any]
    status: AlertStatus
    count: int
    first_seen: float
    last_seen: float
    raised_ts: float
    updated_ts: float
    acknowledged_by: str | None
    acknowledged_ts: float | None
    resolved_by: str | None
    resolved_ts: float | None
    deliveries: list[DeliveryPublic]


class AlertsPublic(BaseModel):
    alerts: list[AlertPublic]


class AlertChangePublic(BaseModel):
    changed: bool  # False: the alert was already in that state
    alert: AlertPublic


class AlertActionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # who acted, for the audit trail (tokens carry no identity)
    actor: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.@+-]{1,64}$")] | None = None


async def get_alert_manager(agent: AgentDep) -> AlertManager:
    manager = getattr(agent, "alerts", None)
    if not isinstance(manager, AlertManager):
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "alerting is not running")
    return manager


AlertsDep = Annotated[AlertManager, Depends(get_alert_manager)]
AlertId = Annotated[int, Path(ge=1, le=MAX_ID, description="alert id")]
ActionBody = Annotated[AlertActionIn | None, Body()]


@router.get("", response_model=AlertsPublic)
def read_alerts(
    request: Request,
    alerts: AlertsDep,
    _: ReaderDep,
    status_: Annotated[AlertStatus | None, Query(alias="status")] = None,
    tenant: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    kind: AlertKind | None = None,
    since: Annotated[float | None, Query(ge=0, allow_inf_nan=False, description=SINCE)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> Response:
    def render() -> bytes:
        rows = alerts.list_alerts(status=status_, tenant=tenant, kind=kind, since=since,
                                  limit=limit, offset=offset)
        return AlertsPublic.model_validate({"alerts": rows}).model_dump_json().encode()

    # version before the query: a change committed meanwhile makes the next call re-render
    key = ("alerts", status_, tenant, kind, since, limit, offset)
    body = request.app.state.response_cache.get(key, alerts.version(), render)
    return Response(body, media_type="application/json")


@router.get("/{alert_id}", response_model=AlertPublic)
def read_alert(alert_id: AlertId, alerts: AlertsDep, _: ReaderDep) -> dict[str, Any]:
    alert = alerts.get(alert_id)
    if alert is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no alert {alert_id}")
    return alert


def _actor(role: str, body: AlertActionIn | None) -> str:
    return f"api:{body.actor}" if body is not None and body.actor else f"api:{role}"


def _transition(alerts: AlertManager, alert_id: int, action: str, actor: str) -> dict[str, Any]:
    try:
        change = (alerts.ack if action == "ack" else alerts.resolve)(alert_id, actor)
    except UnknownAlert as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from e
    except InvalidTransition as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from e
    return {"changed": change is not None, "alert": alerts.get(alert_id)}


@router.post("/{alert_id}/ack", response_model=AlertChangePublic)
def ack_alert(
    alert_id: AlertId, alerts: AlertsDep, role: AdminDep, body: ActionBody = None
) -> dict[str, Any]:
    return _transition(alerts, alert_id, "ack", _actor(role, body))


@router.post("/{alert_id}/resolve", response_model=AlertChangePublic)
def resolve_alert(
    alert_id: AlertId, alerts: AlertsDep, role: AdminDep, body: ActionBody = None
) -> dict[str, Any]:
    return _transition(alerts, alert_id, "resolve", _actor(role, body))
