"""The `alerts:` section of the config: suppression, auto-resolve, outbox retries."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

AlertKind = Literal[
    "volume_anomaly", "egress_ratio", "new_destination", "unsanctioned_destination",
    "canary_token", "oauth_token_reuse", "bulk_export", "unencrypted_field", "model_artifact",
    "proprietary_data", "crm_admin_action", "new_data_flow", "crm_access_refused",
]
Seconds = Annotated[float, Field(ge=0, le=30 * 86400)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OutboxSettings(_Frozen):
    # retry delay: backoff_base_s * 2^(failures-1), capped, times a random factor in [0.5, 1]
    backoff_base_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    backoff_max_s: Annotated[float, Field(gt=0, le=86400)] = 300.0
    # a delivery still failing this long after its state change is marked failed
    give_up_after_s: Annotated[float, Field(gt=0, le=90 * 86400)] = 7 * 86400.0
    batch: Annotated[int, Field(ge=1, le=10_000)] = 100  # entries read per pass and sink


class StormSettings(_Frozen):
    # more distinct destinations than this for one (tenant, kind) among the alerts
    # raised within window_s fold into one storm alert instead of paging each
    distinct_destinations: Annotated[int, Field(ge=1, le=100_000)] = 20
    window_s: Annotated[float, Field(gt=0, le=86400)] = 600.0
    top: Annotated[int, Field(ge=1, le=1000)] = 20  # destinations listed in the evidence


class AlertsSettings(_Frozen):
    # per kind: a new alert for the same kind, tenant and destination within this
    # many seconds of the previous one's last activity joins it instead of paging
    suppression: dict[AlertKind, Seconds] = {}
    # open and acknowledged alerts with no activity for this long resolve (0: never)
    auto_resolve_after_s: Seconds = 3600.0
    outbox: OutboxSettings = OutboxSettings()
    storm: StormSettings = StormSettings()
