"""What every sink shares: its settings base, the event it delivers, its errors.

A sink turns one outbox entry (an `AlertEvent`: an alert snapshot plus the state
change) into one delivery. It raises `RetryableDelivery` when trying again later
may succeed (429, 5xx, network) and `PermanentDelivery` when it cannot (400, a
rejected key); the outbox dispatcher decides what to do with each.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

Severity = Literal["critical", "high", "medium", "low", "info"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "low": 1, "medium": 2, "high": 3, "critical": 4}
Action = Literal["trigger", "acknowledge", "resolve"]

SinkName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class SinkSettings(BaseModel):
    """Keys every sink accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str  # each sink narrows it to its Literal: the union's tag
    name: SinkName | None = None  # default: the type; needed when two sinks share a type
    min_severity: Severity = "info"  # alerts below this never reach the sink
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0

    @property
    def sink_name(self) -> str:
        return self.name or str(self.type)


def check_http_url(value: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    return value


def check_secret_source(value: str | None, file: str | None, key: str, required: bool) -> None:
    if value is not None and file is not None:
        raise ValueError(f"give {key} or {key}_file, not both")
    if required and value is None and file is None:
        raise ValueError(f"{key} or {key}_file is required")


def read_secret(value: str | None, file: str | None, key: str) -> str | None:
    """The secret from the config or from its file (kept out of the config)."""
    if file is None:
        return value
    try:
        secret = Path(file).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise SinkConfigError(f"{key}_file: cannot read {file}: {e.strerror or e}") from e
    if not secret:
        raise SinkConfigError(f"{key}_file: {file} is empty")
    return secret


class SinkConfigError(ValueError):
    """A sink cannot be built from its settings (e.g. an unreadable secret file)."""


class DeliveryError(Exception):
    """A delivery did not succeed; the message is what the outbox records."""


class RetryableDelivery(DeliveryError):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentDelivery(DeliveryError):
    """Trying again cannot help (the receiver rejected the event itself)."""


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One state change of one alert, as stored in an outbox entry."""

    delivery_id: int  # the outbox entry: stable across retries, an idempotency key
    change_id: int
    action: Action
    actor: str
    ts: float
    alert: dict[str, Any]

    @classmethod
    def from_payload(cls, delivery_id: int, payload: str) -> AlertEvent:
        data = json.loads(payload)
        return cls(delivery_id, data["change_id"], data["action"], data["actor"], data["ts"],
                   data["alert"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivery_id": self.delivery_id, "change_id": self.change_id,
            "action": self.action, "actor": self.actor, "ts": iso8601(self.ts),
            "alert": self.alert,
        }


class Sink(Protocol):
    name: str

    def send(self, event: AlertEvent) -> None:
        """Deliver or raise RetryableDelivery / PermanentDelivery."""

    def close(self) -> None: ...


def iso8601(epoch_s: float) -> str:
    """RFC 3339 / ISO 8601 in UTC with milliseconds, e.g. 2024-01-01T12:00:00.000Z."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as delay seconds (the HTTP-date form is rare from these receivers)."""
    if value and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
        return float(value)
    return None


def destination_of(alert: dict[str, Any]) -> str:
    return str(alert.get("destination") or "")
