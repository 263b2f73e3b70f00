"""Incidents: one per anomalous episode, with a dedup key that never changes.

An episode opens when a detector first alarms (the page: `raised_ts`), absorbs
every later alarm that belongs to it, and closes after a quiet gap. The dedup key
hashes what is known at raise time only (kind, tenant, destination, episode
start), so a replay, a restart or a truncated file gives the same key.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

VOLUME_ANOMALY = "volume_anomaly"
EGRESS_RATIO = "egress_ratio"
NEW_DESTINATION = "new_destination"
UNSANCTIONED_DESTINATION = "unsanctioned_destination"

OUTPUT_FIELDS = (
    "kind", "tenant", "crm_vendor", "crm_instance", "first_ts", "last_ts", "raised_ts",
    "severity", "score", "summary", "dedup_key", "evidence",
)


def dedup_key(
    kind: str, tenant: str, vendor: str | None, instance: str | None, first_ts: int
) -> str:
    material = f"{kind}|{tenant}|{vendor or ''}|{instance or ''}|{first_ts}"
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass
class Incident:
    kind: str
    tenant: str
    crm_vendor: str | None  # None: the tenant's total over every destination
    crm_instance: str | None
    first_ts: int
    last_ts: int
    raised_ts: int
    severity: str
    score: float
    summary: str
    evidence: dict[str, Any]
    dedup_key: str = ""
    last_alarm_ts: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if not self.dedup_key:
            self.dedup_key = dedup_key(
                self.kind, self.tenant, self.crm_vendor, self.crm_instance, self.first_ts
            )
        self.last_alarm_ts = max(self.last_alarm_ts, self.raised_ts)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in OUTPUT_FIELDS}


class IncidentBook:
    """Open episodes by key; `note` raises or extends, `expire` closes quiet ones."""

    def __init__(self) -> None:
        self._open: dict[Hashable, tuple[Incident, int]] = {}  # key -> (incident, gap seconds)
        self._closed: list[Incident] = []

    @property
    def has_open(self) -> bool:
        return bool(self._open)

    def get(self, key: Hashable) -> Incident | None:
        entry = self._open.get(key)
        return entry[0] if entry else None

    def open(self, key: Hashable, incident: Incident, gap_seconds: int) -> None:
        self._open[key] = (incident, gap_seconds)

    def extend(self, key: Hashable, ts: int, active: bool, score: float) -> Incident | None:
        """Record an alarm at ts on an open episode; `active` minutes also move last_ts."""
        entry = self._open.get(key)
        if entry is None:
            return None
        incident = entry[0]
        incident.last_alarm_ts = ts
        if active:
            incident.last_ts = max(incident.last_ts, ts)
        incident.score = max(incident.score, score)
        return incident

    def close(self, key: Hashable) -> Incident | None:
        """End one episode now (its series is dropped); `pop_closed` hands it over."""
        entry = self._open.pop(key, None)
        if entry is None:
            return None
        self._closed.append(entry[0])
        return entry[0]

    def expire(self, now: int) -> list[Hashable]:
        """Close episodes with no alarm for longer than their gap; returns their keys."""
        stale = [k for k, (inc, gap) in self._open.items() if now - inc.last_alarm_ts >= gap]
        for key in stale:
            self._closed.append(self._open.pop(key)[0])
        return stale

    def close_all(self) -> None:
        for incident, _ in sorted(self._open.values(), key=lambda e: e[0].raised_ts):
            self._closed.append(incident)
        self._open.clear()

    def pop_closed(self) -> list[Incident]:
        closed, self._closed = self._closed, []
        return closed

    def open_incidents(self) -> list[Incident]:
        return [inc for inc, _ in self._open.values()]
