"""The alert lifecycle in SQLite: open -> acknowledged -> resolved.

`record` takes an incident from the detectors (analytics.incidents.Incident), an
immediate `Finding`, or a dict with the same fields, keyed by its stable
dedup_key:

- a repeat of an alert that is not resolved only counts (count, last_seen): no page;
- a new dedup key for the same kind, tenant and destination within the kind's
  suppression window after that alert's last page joins it: no page;
- new activity on a resolved alert reopens it and pages again, unless it comes
  within the suppression window of the last page;
- a new destination for a (tenant, kind) that already had more distinct destinations
  than `storm.distinct_destinations` within `storm.window_s` (a process talking to
  thousands of names) folds into one storm alert for that (tenant, kind), which
  pages once and lists the top destinations and their count;
- anything else opens a new alert and pages.

Resolved alerts, their changes and their delivered outbox entries are pruned after
the retention (`prune`), unless a delivery still waits or failed.

Every state change (trigger, acknowledge, resolve) writes one outbox entry per
sink in the same transaction as the change, so a change is never lost between
the database and the sinks; analytics.outbox delivers them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from leaktap.analytics.alert_settings import AlertKind, AlertsSettings
from leaktap.analytics.db import Database
from leaktap.analytics.sinks.base import SEVERITY_RANK

logger = logging.getLogger(__name__)

OPEN, ACKNOWLEDGED, RESOLVED = "open", "acknowledged", "resolved"
STORM_PREFIX = "storm:"  # dedup_key of a storm alert; alert_keys marks its destinations too
_PRUNE_BATCH = 500  # alerts deleted per statement (SQLite's variable limit)
STATUSES = (OPEN, ACKNOWLEDGED, RESOLVED)
TRIGGER, ACKNOWLEDGE, RESOLVE = "trigger", "acknowledge", "resolve"
SYSTEM_ACTOR, AUTO_ACTOR = "leaktap", "auto"
# producers' and PagerDuty's words onto leaktap's severities
SEVERITY_ALIASES = {"error": "high", "warning": "medium", "warn": "medium"}


class AlertError(Exception):
    pass


class UnknownAlert(AlertError):
    pass


class InvalidTransition(AlertError):
    pass


@dataclass
class Finding:
    """An immediate finding (not from the minute-bucket detectors), e.g. an
    unsanctioned destination seen in a ClientHello. Without an explicit key the
    dedup_key is the scope, so repeats join the open alert."""

    kind: str
    tenant: str
    severity: str
    summary: str
    crm_vendor: str | None = None
    crm_instance: str | None = None
    destination: str | None = None
    ts: float = field(default_factory=time.time)
    score: float = 1.0
    evidence: dict[str, Any] = field(default_factory=dict)
    dedup_key: str = ""

    def __post_init__(self) -> None:
        if not self.dedup_key:
            material = "|".join((self.kind, self.tenant, self.crm_vendor or "",
                                 self.crm_instance or "", self.destination or ""))
            self.dedup_key = hashlib.sha256(material.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AlertChange:
    """A state change that was committed together with its outbox entries."""

    alert_id: int
    change_id: int
    action: str
    actor: str
    ts: float
    sinks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SinkRoute:
    """Which alerts a sink receives."""

    name: str
    min_severity: str = "info"

    def wants(self, severity: str) -> bool:
        return bool(SEVERITY_RANK[severity] >= SEVERITY_RANK[self.min_severity])


@dataclass(slots=True)
class _Observation:
    dedup_key: str
    kind: str
    tenant: str
    crm_vendor: str
    crm_instance: str
    destination: str
    severity: str
    score: float
    summary: str
    evidence: dict[str, Any]
    first_seen: float
    last_seen: float


def _field(item: Any, name: str, default: Any = None) -> Any:
    if isinstance(item, dict):
        return item.get(name, default)
    return getattr(item, name, default)


def normalize_severity(value: str) -> str:
    severity = SEVERITY_ALIASES.get(str(value).lower(), str(value).lower())
    if severity not in SEVERITY_RANK:
        # a page with the wrong severity beats a lost page
        logger.error("unknown alert severity %r: using 'high'", value)
        return "high"
    return severity


def _observation(item: Any) -> _Observation:
    vendor = _field(item, "crm_vendor") or ""
    instance = _field(item, "crm_instance") or ""
    destination = _field(item, "destination") or (f"{vendor}:{instance}" if vendor else "")
    ts = _field(item, "ts")
    first = _field(item, "first_ts", ts)
    last = _field(item, "last_ts", ts)
    if first is None or last is None:
        raise ValueError("an alert needs first_ts/last_ts or ts")
    key = _field(item, "dedup_key")
    if not key:
        raise ValueError("an alert needs a dedup_key")
    evidence = _field(item, "evidence") or {}
    return _Observation(
        dedup_key=str(key), kind=str(_field(item, "kind")), tenant=str(_field(item, "tenant")),
        crm_vendor=vendor, crm_instance=instance, destination=str(destination),
        severity=normalize_severity(_field(item, "severity", "high")),
        score=float(_field(item, "score", 0.0) or 0.0), summary=str(_field(item, "summary")),
        evidence=dict(evidence), first_seen=float(first), last_seen=max(float(last), float(first)),
    )


def _json_default(value: Any) -> Any:
    """Evidence from numpy-based detectors may hold numpy scalars: a page must not
    fail on a type."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, set | frozenset | tuple):
        return sorted(value, key=str) if isinstance(value, set | frozenset) else list(value)
    return str(value)


def _evidence_json(evidence: dict[str, Any]) -> str:
    return json.dumps(evidence, default=_json_default, separators=(",", ":"))


def alert_dict(row: dict[str, Any]) -> dict[str, Any]:
    """An alerts row as the API and the sinks see it."""
    out = dict(row)
    out["evidence"] = json.loads(row["evidence"])
    for column in ("crm_vendor", "crm_instance", "destination"):
        out[column] = row[column] or None
    return out


class AlertManager:
    """Alert state in the agent's database; thread-safe (the API and the poll thread)."""

    def __init__(
        self,
        db_path: str | Path,
        sinks: Sequence[SinkRoute] = (),
        settings: AlertsSettings | None = None,
        environment: str | None = None,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.db = Database(db_path, require_table="alerts")
        self.sinks = list(sinks)
        self.settings = settings or AlertsSettings()
        self.environment = environment
        self.clock = clock
        self.on_change = on_change
        self.raised: Counter[tuple[str, str]] = Counter()  # (kind, severity) pages since start

    def close(self) -> None:
        self.db.close()

    # -- producers -------------------------------------------------------------------

    def record(self, item: Any, now: float | None = None) -> AlertChange | None:
        """Store an incident, finding or dict; returns the change when it pages."""
        obs = _observation(item)
        now = self.clock() if now is None else now
        window = float(self.settings.suppression.get(cast(AlertKind, obs.kind), 0.0))
        with self.db.transaction() as db:
            row = db.execute(
                "SELECT a.id, a.status, a.last_seen, a.raised_ts, a.dedup_key FROM alert_keys k "
                "JOIN alerts a ON a.id = k.alert_id WHERE k.dedup_key = ?", (obs.dedup_key,),
            ).fetchone()
            if row is not None:
                alert_id, status, last_seen, raised_ts, alert_key = row
                if alert_key.startswith(STORM_PREFIX):
                    self._fold_storm(db, alert_id, obs, now)
                else:
                    self._fold(db, alert_id, obs, now)
                reopen = (status == RESOLVED and obs.last_seen > last_seen
                          and now - raised_ts >= window)
                if not reopen:
                    return None
                db.execute(
                    "UPDATE alerts SET status = ?, raised_ts = ?, acknowledged_by = NULL, "
                    "acknowledged_ts = NULL, resolved_by = NULL, resolved_ts = NULL WHERE id = ?",
                    (OPEN, now, alert_id),
                )
                change = self._change(db, alert_id, TRIGGER, SYSTEM_ACTOR, now,
                                      self._routes_for(obs.severity))
            else:
                alert_id = self._suppressing(db, obs, now, window)
                if alert_id is not None:
                    self._fold(db, alert_id, obs, now)
                    db.execute("INSERT INTO alert_keys VALUES (?, ?)", (obs.dedup_key, alert_id))
                    return None
                storm_id = self._open_storm(db, obs.kind, obs.tenant)
                if storm_id is not None:
                    self._fold_storm(db, storm_id, obs, now)
                    return None
                storm = self._storm_starts(db, obs, now)
                if storm is not None:
                    obs = storm
                alert_id = self._insert(db, obs, now)
                if storm is not None:
                    self._mark_storm_destinations(db, alert_id, obs)
                change = self._change(db, alert_id, TRIGGER, SYSTEM_ACTOR, now,
                                      self._routes_for(obs.severity))
        self.raised[(obs.kind, obs.severity)] += 1
        logger.info("alert %d %s (%s, %s): %s", alert_id, obs.kind, obs.tenant, obs.severity,
                    obs.summary)
        self._notify()
        return change

    def tick(self, now: float | None = None) -> list[AlertChange]:
        """Resolve alerts with no activity for auto_resolve_after_s."""
        quiet = self.settings.auto_resolve_after_s
        if quiet <= 0:
            return []
        now = self.clock() if now is None else now
        changes = []
        stale = self.db.query(
            "SELECT id FROM alerts WHERE status != ? AND last_seen < ? ORDER BY id",
            (RESOLVED, now - quiet),
        )
        for row in stale:
            try:
                change = self.resolve(row["id"], AUTO_ACTOR, now=now)
            except AlertError:
                continue  # changed meanwhile
            if change is not None:
                changes.append(change)
        return changes

    def prune(self, cutoff: float) -> dict[str, int]:
        """Delete alerts resolved before `cutoff` with their keys, changes and outbox
        entries (none may be pending or failed), and older delivered entries of the
        resolved alerts that stay. Returns rows deleted per table."""
        deleted = {"alerts": 0, "alert_changes": 0, "alert_keys": 0, "outbox": 0}
        while True:
            with self.db.transaction() as db:
                ids = [r[0] for r in db.execute(
                    "SELECT id FROM alerts a WHERE status = ? AND resolved_ts < ? AND NOT EXISTS "
                    "(SELECT 1 FROM outbox o WHERE o.alert_id = a.id AND o.state != 'delivered') "
                    "LIMIT ?", (RESOLVED, cutoff, _PRUNE_BATCH),
                )]
                marks = ",".join("?" * len(ids))
                for table, column in (("outbox", "alert_id"), ("alert_changes", "alert_id"),
                                      ("alert_keys", "alert_id"), ("alerts", "id")):
                    if ids:
                        deleted[table] += db.execute(
                            f"DELETE FROM {table} WHERE {column} IN ({marks})", tuple(ids)
                        ).rowcount
            if len(ids) < _PRUNE_BATCH:
                break
        deleted["outbox"] += self.db.execute(
            "DELETE FROM outbox WHERE state = 'delivered' AND created_ts < ? AND alert_id IN "
            "(SELECT id FROM alerts WHERE status = ?)", (cutoff, RESOLVED),
        )
        if deleted["alerts"]:
            logger.info("pruned %d resolved alerts before %.0f: %s", deleted["alerts"], cutoff,
                        deleted)
        return deleted

    # -- operators -------------------------------------------------------------------

    def ack(self, alert_id: int, actor: str, now: float | None = None) -> AlertChange | None:
        """open -> acknowledged; None when already acknowledged."""
        return self._transition(alert_id, ACKNOWLEDGE, actor, now)

    def resolve(self, alert_id: int, actor: str, now: float | None = None) -> AlertChange | None:
        """open/acknowledged -> resolved; None when already resolved."""
        return self._transition(alert_id, RESOLVE, actor, now)

    def _transition(
        self, alert_id: int, action: str, actor: str, now: float | None
    ) -> AlertChange | None:
        now = self.clock() if now is None else now
        with self.db.transaction() as db:
            row = db.execute("SELECT status FROM alerts WHERE id = ?", (alert_id,)).fetchone()
            if row is None:
                raise UnknownAlert(f"no alert {alert_id}")
            status = row[0]
            if action == ACKNOWLEDGE:
                if status == RESOLVED:
                    raise InvalidTransition(f"alert {alert_id} is resolved")
                if status == ACKNOWLEDGED:
                    return None
                db.execute(
                    "UPDATE alerts SET status = ?, acknowledged_by = ?, acknowledged_ts = ?, "
                    "updated_ts = ? WHERE id = ?", (ACKNOWLEDGED, actor, now, now, alert_id),
                )
            else:
                if status == RESOLVED:
                    return None
                db.execute(
                    "UPDATE alerts SET status = ?, resolved_by = ?, resolved_ts = ?, "
                    "updated_ts = ? WHERE id = ?", (RESOLVED, actor, now, now, alert_id),
                )
            # follow-ups go to the sinks that were told about the trigger
            told = {r[0] for r in db.execute(
                "SELECT DISTINCT sink FROM outbox WHERE alert_id = ? AND action = ?",
                (alert_id, TRIGGER),
            )}
            change = self._change(db, alert_id, action, actor, now,
                                  [s for s in self.sinks if s.name in told])
        logger.info("alert %d: %s by %s", alert_id, action, actor)
        self._notify()
        return change

    # -- reads -----------------------------------------------------------------------

    def version(self) -> tuple[int, int]:
        """Changes whenever alerts or deliveries may have changed (for response caches)."""
        return self.db.version()

    def get(self, alert_id: int) -> dict[str, Any] | None:
        rows = self.db.query("SELECT * FROM alerts WHERE id = ?", (alert_id,))
        return self._with_deliveries([alert_dict(r) for r in rows])[0] if rows else None

    def list_alerts(
        self, status: str | None = None, tenant: str | None = None, kind: str | None = None,
        since: float | None = None, limit: int = 100, offset: int = 0,
    ) -> list[dict[str, Any]]:
        where: list[str] = ["1=1"]
        args: list[Any] = []
        for column, value in (("status", status), ("tenant", tenant), ("kind", kind)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("last_seen >= ?")
            args.append(since)
        rows = self.db.query(
            f"SELECT * FROM alerts WHERE {' AND '.join(where)} "
            "ORDER BY last_seen DESC, id DESC LIMIT ? OFFSET ?", (*args, limit, offset),
        )
        return self._with_deliveries([alert_dict(r) for r in rows])

    def changes(self, alert_id: int) -> list[dict[str, Any]]:
        return self.db.query(
            "SELECT id, ts, action, actor FROM alert_changes WHERE alert_id = ? ORDER BY id",
            (alert_id,),
        )

    def _with_deliveries(self, alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not alerts:
            return alerts
        ids = [a["id"] for a in alerts]
        marks = ",".join("?" * len(ids))
        by_alert: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
        for row in self.db.query(
            "SELECT alert_id, id AS delivery_id, sink, action, state, attempts, last_error, "
            "next_attempt_ts, last_attempt_ts, delivered_ts FROM outbox "
            f"WHERE alert_id IN ({marks}) ORDER BY id", tuple(ids),
        ):
            by_alert[row.pop("alert_id")].append(row)
        for a in alerts:
            a["deliveries"] = by_alert[a["id"]]
        return alerts

    # -- inside a transaction --------------------------------------------------------

    def _routes_for(self, severity: str) -> list[SinkRoute]:
        return [s for s in self.sinks if s.wants(severity)]

    def _suppressing(
        self, db: sqlite3.Connection, obs: _Observation, now: float, window: float
    ) -> int | None:
        if window <= 0:
            return None
        row = db.execute(
            "SELECT id FROM alerts WHERE kind = ? AND tenant = ? AND crm_vendor = ? "
            "AND crm_instance = ? AND destination = ? AND raised_ts > ? "
            "ORDER BY raised_ts DESC LIMIT 1",
            (obs.kind, obs.tenant, obs.crm_vendor, obs.crm_instance, obs.destination,
             now - window),
        ).fetchone()
        return None if row is None else int(row[0])

    def _open_storm(self, db: sqlite3.Connection, kind: str, tenant: str) -> int | None:
        row = db.execute(
            "SELECT id FROM alerts WHERE kind = ? AND tenant = ? AND status != ? "
            "AND dedup_key LIKE ? ORDER BY id DESC LIMIT 1",
            (kind, tenant, RESOLVED, STORM_PREFIX + "%"),
        ).fetchone()
        return None if row is None else int(row[0])

    def _storm_starts(
        self, db: sqlite3.Connection, obs: _Observation, now: float
    ) -> _Observation | None:
        """The storm alert to open instead of `obs`, when its destination is one too many."""
        storm = self.settings.storm
        if not obs.destination:
            return None
        recent = [r[0] for r in db.execute(
            "SELECT destination FROM alerts WHERE kind = ? AND tenant = ? AND raised_ts > ? "
            "AND destination != '' AND dedup_key NOT LIKE ? GROUP BY destination "
            "ORDER BY MAX(raised_ts) DESC LIMIT ?",
            (obs.kind, obs.tenant, now - storm.window_s, STORM_PREFIX + "%",
             storm.distinct_destinations + 1),
        )]
        if obs.destination in recent or len(recent) < storm.distinct_destinations:
            return None
        destinations = [obs.destination, *recent[: storm.top - 1]]
        key = hashlib.sha256(f"{obs.kind}|{obs.tenant}|{now}".encode()).hexdigest()
        evidence = {
            "storm": True, "window_s": storm.window_s,
            "distinct_destinations": len(recent) + 1, "alerts_folded": 1,
            "top_destinations": {d: 1 for d in destinations},
            "first_destination_evidence": obs.evidence,
        }
        logger.warning("%s: more than %d destinations for %s within %.0f s: one storm alert "
                       "from now on", obs.tenant, storm.distinct_destinations, obs.kind,
                       storm.window_s)
        return _Observation(
            dedup_key=STORM_PREFIX + key, kind=obs.kind, tenant=obs.tenant, crm_vendor="",
            crm_instance="", destination="", severity=obs.severity, score=obs.score,
            summary=_storm_summary(obs.tenant, obs.kind, len(recent) + 1), evidence=evidence,
            first_seen=obs.first_seen, last_seen=obs.last_seen,
        )

    def _mark_storm_destinations(
        self, db: sqlite3.Connection, alert_id: int, storm: _Observation
    ) -> None:
        db.executemany("INSERT OR IGNORE INTO alert_keys VALUES (?, ?)",
                       [(_storm_marker(alert_id, d), alert_id)
                        for d in storm.evidence["top_destinations"]])

    def _fold_storm(
        self, db: sqlite3.Connection, alert_id: int, obs: _Observation, now: float
    ) -> None:
        """Count `obs` into the storm: distinct destinations exactly (a marker key each),
        the top list by Space-Saving (bounded, overestimates only the tail)."""
        evidence = json.loads(db.execute(
            "SELECT evidence FROM alerts WHERE id = ?", (alert_id,)).fetchone()[0])
        db.execute("INSERT OR IGNORE INTO alert_keys VALUES (?, ?)", (obs.dedup_key, alert_id))
        if obs.destination:
            if db.execute("INSERT OR IGNORE INTO alert_keys VALUES (?, ?)",
                          (_storm_marker(alert_id, obs.destination), alert_id)).rowcount:
                evidence["distinct_destinations"] += 1
            top: dict[str, int] = evidence["top_destinations"]
            if obs.destination in top:
                top[obs.destination] += 1
            elif len(top) < self.settings.storm.top:
                top[obs.destination] = 1
            else:
                least = min(top, key=lambda d: top[d])
                top[obs.destination] = top.pop(least) + 1
            evidence["top_destinations"] = dict(sorted(top.items(), key=lambda kv: -kv[1]))
        evidence["alerts_folded"] += 1
        db.execute(
            "UPDATE alerts SET count = count + 1, last_seen = MAX(last_seen, ?), "
            "first_seen = MIN(first_seen, ?), score = MAX(score, ?), evidence = ?, summary = ?, "
            "severity = CASE WHEN ? > (CASE severity " + _RANK_CASE + " END) "
            "THEN ? ELSE severity END, updated_ts = ? WHERE id = ?",
            (obs.last_seen, obs.first_seen, obs.score, _evidence_json(evidence),
             _storm_summary(obs.tenant, obs.kind, evidence["distinct_destinations"]),
             SEVERITY_RANK[obs.severity], obs.severity, now, alert_id),
        )

    def _fold(self, db: sqlite3.Connection, alert_id: int, obs: _Observation, now: float) -> None:
        db.execute(
            "UPDATE alerts SET count = count + 1, last_seen = MAX(last_seen, ?), "
            "first_seen = MIN(first_seen, ?), score = MAX(score, ?), evidence = ?, "
            "severity = CASE WHEN ? > (CASE severity " + _RANK_CASE + " END) "
            "THEN ? ELSE severity END, updated_ts = ? WHERE id = ?",
            (obs.last_seen, obs.first_seen, obs.score, _evidence_json(obs.evidence),
             SEVERITY_RANK[obs.severity], obs.severity, now, alert_id),
        )

    def _insert(self, db: sqlite3.Connection, obs: _Observation, now: float) -> int:
        cur = db.execute(
            "INSERT INTO alerts (dedup_key, kind, tenant, crm_vendor, crm_instance, destination, "
            "severity, score, summary, evidence, status, count, first_seen, last_seen, "
            "raised_ts, updated_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?)",
            (obs.dedup_key, obs.kind, obs.tenant, obs.crm_vendor, obs.crm_instance,
             obs.destination, obs.severity, obs.score, obs.summary, _evidence_json(obs.evidence),
             OPEN, obs.first_seen, obs.last_seen, now, now),
        )
        alert_id = int(cur.lastrowid or 0)
        db.execute("INSERT INTO alert_keys VALUES (?, ?)", (obs.dedup_key, alert_id))
        return alert_id

    def _change(
        self, db: sqlite3.Connection, alert_id: int, action: str, actor: str, now: float,
        routes: Iterable[SinkRoute],
    ) -> AlertChange:
        cur = db.execute(
            "INSERT INTO alert_changes (alert_id, ts, action, actor) VALUES (?, ?, ?, ?)",
            (alert_id, now, action, actor),
        )
        change_id = int(cur.lastrowid or 0)
        cur = db.execute("SELECT * FROM alerts WHERE id = ?", (alert_id,))
        cols = [c[0] for c in cur.description]
        snapshot = alert_dict(dict(zip(cols, cur.fetchone(), strict=True)))
        snapshot["environment"] = self.environment
        payload = json.dumps({"change_id": change_id, "action": action, "actor": actor,
                              "ts": now, "alert": snapshot}, separators=(",", ":"))
        names = tuple(r.name for r in routes)
        db.executemany(
            "INSERT INTO outbox (change_id, alert_id, sink, action, payload, created_ts, "
            "next_attempt_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(change_id, alert_id, name, action, payload, now, now) for name in names],
        )
        return AlertChange(alert_id, change_id, action, actor, now, names)

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change()


def _storm_marker(alert_id: int, destination: str) -> str:
    return f"{STORM_PREFIX}{alert_id}:{destination}"


def _storm_summary(tenant: str, kind: str, destinations: int) -> str:
    return f"{tenant}: {kind} storm: {destinations} distinct destinations"


_RANK_CASE = " ".join(f"WHEN '{name}' THEN {rank}" for name, rank in SEVERITY_RANK.items())
