"""Every enforcement decision, kept for the audit (`/v1/audit`) in the agent's database.

The `enforcement_decisions` table (schema migration 9 in controller/storage.py),
through its own connection to the same SQLite file (WAL: the poll thread's writes
and these do not block each other for long). A decision is written when it arrives, so a
refused connect that never became a flow is still in the audit.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from leaktap.controller.enforcement.kernel_policy import EnforcementDecision

FIELDS = ("ts", "tenant", "action", "reason", "crm_vendor", "crm_instance", "host", "proto",
          "src", "sport", "dst", "dport", "cgroup_id")


class DecisionLog:
    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=5000")
        self._lock = threading.Lock()

    def add(self, d: EnforcementDecision) -> int:
        """Record a decision; returns its row id."""
        row = (d.ts, d.tenant, d.action, d.reason, d.vendor, d.crm_instance, d.host, d.proto,
               d.saddr, d.sport, d.daddr, d.dport, d.cgroup_id)
        with self._lock:
            cur = self._db.execute(
                f"INSERT INTO enforcement_decisions ({', '.join(FIELDS)}) "
                f"VALUES ({', '.join('?' * len(FIELDS))})", row)
            return int(cur.lastrowid or 0)

    def fold(self, record_id: int, d: EnforcementDecision) -> None:
        """A second report of the connection recorded as `record_id` (see dry_run_pairs):
        the record is the connect-time decision, on the connection's own addresses (the
        hello's; the connect report has no source yet)."""
        with self._lock:
            self._db.execute(
                "UPDATE enforcement_decisions SET reason = 'address', "
                "src = CASE WHEN sport = 0 THEN ? ELSE src END, "
                "dst = CASE WHEN sport = 0 THEN ? ELSE dst END, "
                "sport = CASE WHEN sport = 0 THEN ? ELSE sport END, "
                "host = COALESCE(host, ?), crm_vendor = COALESCE(crm_vendor, ?), "
                "crm_instance = COALESCE(crm_instance, ?) WHERE id = ?",
                (d.saddr, d.daddr, d.sport, d.host, d.vendor, d.crm_instance, record_id))

    def recent(self, tenant: str | None = None, since: float | None = None,
               limit: int = 1000) -> list[dict[str, Any]]:
        """Decisions, newest first."""
        where: list[str] = ["1=1"]
        args: list[Any] = []
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        with self._lock:
            cur = self._db.execute(
                f"SELECT id, {', '.join(FIELDS)} FROM enforcement_decisions "
                f"WHERE {' AND '.join(where)} ORDER BY ts DESC LIMIT ?", (*args, limit))
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def prune(self, cutoff: float) -> int:
        with self._lock:
            return int(self._db.execute(
                "DELETE FROM enforcement_decisions WHERE ts < ?", (cutoff,)).rowcount)

    def close(self) -> None:
        with self._lock:
            self._db.close()
