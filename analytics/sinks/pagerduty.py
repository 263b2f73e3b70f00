"""PagerDuty Events API v2: trigger on raise, acknowledge and resolve on change.

The alert's dedup_key is PagerDuty's dedup_key, so a redelivered trigger (after
a crash between send and commit) joins the open incident instead of paging again.
"""

from __future__ import annotations

import json
import socket
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from leaktap.analytics.sinks.base import (
    AlertEvent,
    SinkSettings,
    check_http_url,
    check_secret_source,
    destination_of,
    iso8601,
    read_secret,
)
from leaktap.analytics.sinks.http import post
from leaktap.analytics.sinks.redact import Redactor, url_secrets

DEFAULT_URL = "https://events.pagerduty.com/v2/enqueue"
SUMMARY_MAX = 1024
# leaktap severities onto the four PagerDuty accepts
SEVERITY = {"critical": "critical", "high": "error", "medium": "warning", "low": "info",
            "info": "info"}


class PagerDutySettings(SinkSettings):
    type: Literal["pagerduty"]
    routing_key: Annotated[str, Field(pattern=r"^\S{1,128}$")] | None = None
    routing_key_file: str | None = None
    url: Annotated[str, AfterValidator(check_http_url)] = DEFAULT_URL
    source: str | None = None  # payload.source; default: this host's name

    @model_validator(mode="after")
    def _key(self) -> PagerDutySettings:
        check_secret_source(self.routing_key, self.routing_key_file, "routing_key", required=True)
        return self


class PagerDutySink:
    def __init__(self, settings: PagerDutySettings) -> None:
        self.name = settings.sink_name
        self.url = settings.url
        self.routing_key = read_secret(settings.routing_key, settings.routing_key_file,
                                       "routing_key") or ""
        self.source = settings.source or socket.gethostname()
        import httpx  # only with a sink configured (sinks/http.py)

        self.client = httpx.Client(timeout=settings.timeout_s)
        self.redact = Redactor([self.routing_key, *url_secrets(self.url)])

    def body(self, event: AlertEvent) -> dict[str, Any]:
        alert = event.alert
        body: dict[str, Any] = {
            "routing_key": self.routing_key,
            "event_action": event.action,
            "dedup_key": alert["dedup_key"],
        }
        if event.action != "trigger":
            return body  # acknowledge and resolve carry no payload
        vendor, instance = alert.get("crm_vendor"), alert.get("crm_instance")
        body["payload"] = {
            "summary": str(alert["summary"])[:SUMMARY_MAX],
            "source": self.source,
            "severity": SEVERITY.get(alert["severity"], "error"),
            # when leaktap detected it (raised or reopened); the activity span is in details
            "timestamp": iso8601(alert.get("raised_ts", alert["first_seen"])),
            "component": f"{vendor}:{instance}" if vendor else destination_of(alert) or "egress",
            "group": alert["tenant"],
            "class": alert["kind"],
            "custom_details": {
                "tenant": alert["tenant"],
                "destination": destination_of(alert),
                "crm_vendor": vendor,
                "crm_instance": instance,
                "environment": alert.get("environment"),
                "score": alert.get("score"),
                "count": alert.get("count"),
                "first_seen": iso8601(alert["first_seen"]),
                "last_seen": iso8601(alert["last_seen"]),
                "alert_id": alert["id"],
                "evidence": alert.get("evidence", {}),
            },
        }
        body["client"] = "leaktap"
        return body

    def send(self, event: AlertEvent) -> None:
        data = json.dumps(self.body(event), separators=(",", ":")).encode()
        # Events API v2: 202 accepted; 400 is its verdict on the event (permanent)
        post(self.client, self.url, data, {"Content-Type": "application/json"},
             success=frozenset({202}), redact=self.redact, permanent=frozenset({400}))

    def close(self) -> None:
        self.client.close()
