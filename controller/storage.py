"""SQLite storage (WAL): minute buckets per tenant and destination, and flows.

The agent writes every drained delta here once per poll, so a restart loses
no minute that was already counted: the kernel maps (pinned) hold what was
not drained yet, the database what was. The schema is versioned with
PRAGMA user_version and upgraded by ordered migrations.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leaktap.controller.errors import LeaktapError

logger = logging.getLogger(__name__)

# Each entry upgrades the schema from version i to i + 1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE minute_buckets (
        ts INTEGER NOT NULL,              -- minute start, epoch seconds
        tenant TEXT NOT NULL,
        crm_vendor TEXT NOT NULL,         -- '' when not a CRM
        crm_instance TEXT NOT NULL,       -- '' when unknown
        destination TEXT NOT NULL,        -- server name, else the address
        bytes_out INTEGER NOT NULL DEFAULT 0,
        packets_out INTEGER NOT NULL DEFAULT 0,
        bytes_in INTEGER NOT NULL DEFAULT 0,
        packets_in INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (ts, tenant, crm_vendor, crm_instance, destination)
    ) WITHOUT ROWID;
    CREATE INDEX minute_buckets_tenant ON minute_buckets (tenant, ts);
    CREATE TABLE flows (
        id INTEGER PRIMARY KEY,
        family INTEGER NOT NULL,
        proto TEXT NOT NULL,
        src TEXT NOT NULL,
        sport INTEGER NOT NULL,
        dst TEXT NOT NULL,
        dport INTEGER NOT NULL,
        sni TEXT,
        dns_names TEXT NOT NULL DEFAULT '[]',
        crm_vendor TEXT,
        crm_instance TEXT,
        tenant TEXT NOT NULL,
        cgroup TEXT,
        uid INTEGER,
        bytes_out INTEGER NOT NULL DEFAULT 0,
        packets_out INTEGER NOT NULL DEFAULT 0,
        bytes_in INTEGER NOT NULL DEFAULT 0,
        packets_in INTEGER NOT NULL DEFAULT 0,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL
    );
    CREATE INDEX flows_last_seen ON flows (last_seen);
    CREATE INDEX flows_tenant ON flows (tenant, last_seen);
    """,
    # 2: TCP flags seen per direction, for the audit of attempted transfers
    """
    ALTER TABLE flows ADD COLUMN flags_out INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE flows ADD COLUMN flags_in INTEGER NOT NULL DEFAULT 0;
    """,
    # 3: alerts, their state changes, and the durable outbox of deliveries to sinks
    """
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        dedup_key TEXT NOT NULL UNIQUE,   -- the key of the first incident or finding
        kind TEXT NOT NULL,
        tenant TEXT NOT NULL,
        crm_vendor TEXT NOT NULL,         -- '' when none
        crm_instance TEXT NOT NULL,       -- '' when none
        destination TEXT NOT NULL,        -- '' when the alert is about every destination
        severity TEXT NOT NULL,           -- critical | high | medium | low | info
        score REAL NOT NULL DEFAULT 0,
        summary TEXT NOT NULL,
        evidence TEXT NOT NULL DEFAULT '{}',  -- JSON as the producer gave it (redacted)
        status TEXT NOT NULL,             -- open | acknowledged | resolved
        count INTEGER NOT NULL DEFAULT 1,
        first_seen REAL NOT NULL,         -- epoch seconds of the activity
        last_seen REAL NOT NULL,
        raised_ts REAL NOT NULL,          -- when leaktap opened (paged) it
        updated_ts REAL NOT NULL,
        acknowledged_by TEXT,
        acknowledged_ts REAL,
        resolved_by TEXT,
        resolved_ts REAL
    );
    CREATE INDEX alerts_status ON alerts (status, last_seen);
    CREATE INDEX alerts_tenant ON alerts (tenant, last_seen);
    CREATE INDEX alerts_scope ON alerts (kind, tenant, crm_vendor, crm_instance, destination,
                                         last_seen);
    -- every dedup key folded into an alert (repeats, suppressed episodes)
    CREATE TABLE alert_keys (
        dedup_key TEXT PRIMARY KEY,
        alert_id INTEGER NOT NULL REFERENCES alerts (id)
    ) WITHOUT ROWID;
    CREATE TABLE alert_changes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        alert_id INTEGER NOT NULL REFERENCES alerts (id),
        ts REAL NOT NULL,
        action TEXT NOT NULL,             -- trigger | acknowledge | resolve
        actor TEXT NOT NULL               -- 'leaktap', 'auto', or the API caller's role
    );
    CREATE INDEX alert_changes_alert ON alert_changes (alert_id, id);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- delivery order per sink; never reused
        change_id INTEGER NOT NULL REFERENCES alert_changes (id),
        alert_id INTEGER NOT NULL REFERENCES alerts (id),
        sink TEXT NOT NULL,               -- the configured sink name
        action TEXT NOT NULL,
        payload TEXT NOT NULL,            -- JSON: the alert as of the change
        state TEXT NOT NULL DEFAULT 'pending',  -- pending | delivered | failed
        attempts INTEGER NOT NULL DEFAULT 0,
        created_ts REAL NOT NULL,
        next_attempt_ts REAL NOT NULL,
        last_attempt_ts REAL,
        last_error TEXT,
        delivered_ts REAL,
        UNIQUE (change_id, sink)
    );
    CREATE INDEX outbox_due ON outbox (sink, state, next_attempt_ts, id);
    CREATE INDEX outbox_alert ON outbox (alert_id, sink, id);
    """,
    # 4: the unfiltered alert list (newest first) walks an index instead of sorting
    """
    CREATE INDEX alerts_recent ON alerts (last_seen, id);
    """,
    # 5: CRM API calls seen in TLS plaintext (bulk exports, mass operations)
    """
    CREATE TABLE audit_calls (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        tenant TEXT NOT NULL,
        crm_vendor TEXT,
        crm_instance TEXT,
        destination TEXT,
        operation TEXT NOT NULL,          -- e.g. salesforce:bulk2.ingest
        action TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,               -- without the query string
        request_bytes INTEGER NOT NULL,
        allowed INTEGER NOT NULL,         -- within the tenant's allowed operations
        protocol TEXT NOT NULL,
        pid INTEGER NOT NULL,
        comm TEXT NOT NULL
    );
    CREATE INDEX audit_calls_tenant ON audit_calls (tenant, ts);
    CREATE INDEX audit_calls_ts ON audit_calls (ts);
    """,
    # 6: which evidence named a flow, and shared vendor hosts (no instance, a region)
    """
    ALTER TABLE flows ADD COLUMN named_by TEXT;        -- sni | dns | plaintext
    ALTER TABLE flows ADD COLUMN shared INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE flows ADD COLUMN crm_region TEXT;      -- a shared host's data centre
    """,
    # 7: canary tokens registered through the API survive a restart
    """
    CREATE TABLE canaries (
        token TEXT PRIMARY KEY,           -- the planted value (the file is 0600)
        tenant TEXT,                      -- NULL: any tenant
        record TEXT NOT NULL,
        environment TEXT,
        created_ts REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 8: the CRM data-flow map (issue 14.3), and the status of attempted API calls (14.4)
    """
    CREATE TABLE dataflows (
        tenant TEXT NOT NULL,
        exe TEXT NOT NULL,                -- the process executable path
        crm_vendor TEXT NOT NULL,
        crm_instance TEXT NOT NULL,       -- '' when unknown (shared host)
        object TEXT NOT NULL,             -- e.g. Contact; 'other' for unknown shapes
        operation TEXT NOT NULL,          -- read|query|create|update|upsert|delete|bulk|admin
        direction TEXT NOT NULL,          -- to_crm | from_crm
        requests INTEGER NOT NULL DEFAULT 0,
        records INTEGER NOT NULL DEFAULT 0,
        records_unknown INTEGER NOT NULL DEFAULT 0,  -- answered calls whose count was unknown
        request_bytes INTEGER NOT NULL DEFAULT 0,
        response_bytes INTEGER NOT NULL DEFAULT 0,
        status_2xx INTEGER NOT NULL DEFAULT 0,
        status_3xx INTEGER NOT NULL DEFAULT 0,
        status_4xx INTEGER NOT NULL DEFAULT 0,
        status_5xx INTEGER NOT NULL DEFAULT 0,
        status_none INTEGER NOT NULL DEFAULT 0,  -- no answer seen
        data_classes TEXT NOT NULL DEFAULT '[]',  -- JSON: class names only
        templates TEXT NOT NULL DEFAULT '[]',     -- JSON: path templates, never values
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        PRIMARY KEY (tenant, exe, crm_vendor, crm_instance, object, operation, direction)
    ) WITHOUT ROWID;
    CREATE INDEX dataflows_last_seen ON dataflows (last_seen);
    ALTER TABLE audit_calls ADD COLUMN status INTEGER;  -- HTTP status; NULL: none seen
    ALTER TABLE audit_calls ADD COLUMN outcome TEXT;    -- refused | failed | unanswered
    """,
    # 9: every enforcement decision (issue 12), written by controller/enforcement/decision_log
    """
    CREATE TABLE IF NOT EXISTS enforcement_decisions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        tenant TEXT NOT NULL,
        action TEXT NOT NULL,             -- blocked | would_block
        reason TEXT NOT NULL,             -- unsanctioned_instance|shared_host|quic|ech|address
        crm_vendor TEXT,
        crm_instance TEXT,
        host TEXT,
        proto INTEGER NOT NULL,
        src TEXT NOT NULL,                -- '' for a connect refused before it had a source
        sport INTEGER NOT NULL,
        dst TEXT NOT NULL,
        dport INTEGER NOT NULL,
        cgroup_id INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS enforcement_decisions_ts ON enforcement_decisions (ts);
    CREATE INDEX IF NOT EXISTS enforcement_decisions_flow
        ON enforcement_decisions (src, sport, dst, dport);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class StorageError(LeaktapError):
    """The database cannot be opened or is from a newer leaktap."""


@dataclass(frozen=True, slots=True)
class BucketKey:
    ts: int
    tenant: str
    crm_vendor: str | None
    crm_instance: str | None
    destination: str


@dataclass(slots=True)
class Volume:
    bytes_out: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    packets_in: int = 0


def minute_of(epoch_s: float) -> int:
    return int(epoch_s // 60) * 60


def make_private(path: Path, group: str | None = None) -> None:
    """Create the database file, or tighten an existing one, to 0600 (0640 owned by
    `group`), whatever the umask; SQLite gives its -wal and -shm files the
    database's mode and owner when it creates them (fixed here for older ones)."""
    mode = 0o640 if group else 0o600
    gid = -1
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError as e:
            raise StorageError(f"storage.group: no group named {group!r}") from e
    for target in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if target == path else 0)
        try:
            fd = os.open(target, flags, mode)
        except FileNotFoundError:
            continue  # no WAL yet: SQLite creates it like the database
        try:
            if gid != -1:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


class Store:
    """One SQLite file shared by the poll thread (writes) and the API (reads)."""

    def __init__(
        self, path: str | Path, retention_days: int = 30, group: str | None = None
    ) -> None:
        self.path = Path(path)
        self.retention_s = retention_days * 86400
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            make_private(self.path, group)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
        except (OSError, sqlite3.Error) as e:
            raise StorageError(f"opening database {self.path}: {e}") from e
        self._lock = threading.Lock()
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{self.path} has schema version {version}, newer than this leaktap "
                f"({SCHEMA_VERSION}); upgrade leaktap or use another --db"
            )
        for target in range(version, SCHEMA_VERSION):
            logger.info("migrating %s to schema version %d", self.path, target + 1)
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _statements(MIGRATIONS[target]):
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {target + 1}")
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    self._db.execute("ROLLBACK")
                    raise

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    # -- writes (poll thread) ------------------------------------------------------

    def write(
        self, buckets: dict[BucketKey, Volume], flows: Iterable[dict[str, Any]]
    ) -> dict[int, int]:
        """Add bucket deltas and upsert flow rows in one transaction.

        Flow dicts with an "id" update that row; others are inserted. Returns
        {id(flow dict): row id} for inserted flows.
        """
        new_ids: dict[int, int] = {}
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    """
                    INSERT INTO minute_buckets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT (ts, tenant, crm_vendor, crm_instance, destination) DO UPDATE SET
                        bytes_out = bytes_out + excluded.bytes_out,
                        packets_out = packets_out + excluded.packets_out,
                        bytes_in = bytes_in + excluded.bytes_in,
                        packets_in = packets_in + excluded.packets_in
                    """,
                    [
                        (k.ts, k.tenant, k.crm_vendor or "", k.crm_instance or "", k.destination,
                         v.bytes_out, v.packets_out, v.bytes_in, v.packets_in)
                        for k, v in buckets.items()
                    ],
                )
                for f in flows:
                    values = (
                        f["family"], f["proto"], f["src"], f["sport"], f["dst"], f["dport"],
                        f["sni"], json.dumps(f["dns_names"]), f["crm_vendor"], f["crm_instance"],
                        f["tenant"], f["cgroup"], f["uid"], f["bytes_out"], f["packets_out"],
                        f["bytes_in"], f["packets_in"], f["first_seen"], f["last_seen"],
                        f.get("flags_out", 0), f.get("flags_in", 0),
                        f.get("named_by"), int(bool(f.get("shared"))), f.get("crm_region"),
                    )
                    if f.get("id") is None:
                        cur = self._db.execute(
                            "INSERT INTO flows (family, proto, src, sport, dst, dport, sni, "
                            "dns_names, crm_vendor, crm_instance, tenant, cgroup, uid, bytes_out, "
                            "packets_out, bytes_in, packets_in, first_seen, last_seen, flags_out, "
                            "flags_in, named_by, shared, crm_region) "
                            f"VALUES ({', '.join('?' * 24)})",
                            values,
                        )
                        new_ids[id(f)] = int(cur.lastrowid or 0)
                    else:
                        self._db.execute(
                            "UPDATE flows SET family=?, proto=?, src=?, sport=?, dst=?, dport=?, "
                            "sni=?, dns_names=?, crm_vendor=?, crm_instance=?, tenant=?, cgroup=?, "
                            "uid=?, bytes_out=?, packets_out=?, bytes_in=?, packets_in=?, "
                            "first_seen=?, last_seen=?, flags_out=?, flags_in=?, named_by=?, "
                            "shared=?, crm_region=? WHERE id=?",
                            (*values, f["id"]),
                        )
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise
        return new_ids

    FLOW_COUNTER_FIELDS = ("bytes_out", "packets_out", "bytes_in", "packets_in", "first_seen",
                           "last_seen", "flags_out", "flags_in", "uid")

    def update_flow_counters(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Refresh the counters of existing flow rows, one transaction: tuples of
        FLOW_COUNTER_FIELDS then the row id (the agent's poll; names unchanged)."""
        sets = ", ".join(f"{f}=?" for f in self.FLOW_COUNTER_FIELDS)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(f"UPDATE flows SET {sets} WHERE id=?", rows)
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise

    AUDIT_CALL_FIELDS = (
        "ts", "tenant", "crm_vendor", "crm_instance", "destination", "operation", "action",
        "method", "path", "request_bytes", "allowed", "protocol", "pid", "comm",
        "status", "outcome",
    )
    AUDIT_CALL_OPTIONAL = frozenset({"status", "outcome"})  # attempted calls only

    def add_audit_call(self, call: dict[str, Any]) -> None:
        """One CRM API call of the audit log (already free of secrets)."""
        self.add_audit_calls([call])

    def add_audit_calls(self, calls: Iterable[dict[str, Any]]) -> int:
        """CRM API calls of the audit log in one transaction."""
        names = self.AUDIT_CALL_FIELDS
        values = [tuple(int(c[n]) if n == "allowed" else
                        c.get(n) if n in self.AUDIT_CALL_OPTIONAL else c[n] for n in names)
                  for c in calls]
        if not values:
            return 0
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    f"INSERT INTO audit_calls ({', '.join(names)}) "
                    f"VALUES ({', '.join('?' * len(names))})", values)
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise
        return len(values)

    DATAFLOW_KEY = ("tenant", "exe", "crm_vendor", "crm_instance", "object", "operation",
                    "direction")
    DATAFLOW_FIELDS = (*DATAFLOW_KEY, "requests", "records", "records_unknown",
                       "request_bytes", "response_bytes", "status_2xx", "status_3xx",
                       "status_4xx", "status_5xx", "status_none", "data_classes", "templates",
                       "first_seen", "last_seen")

    def put_dataflows(self, rows: Iterable[dict[str, Any]]) -> int:
        """Replace the data-flow rows given (absolute totals, lists as JSON) in one
        transaction: the map flushes what changed since its last flush."""
        names = self.DATAFLOW_FIELDS
        values = [tuple(json.dumps(r[n]) if n in ("data_classes", "templates") else
                        (r[n] or "") if n == "crm_instance" else r[n] for n in names)
                  for r in rows]
        if not values:
            return 0
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    f"INSERT OR REPLACE INTO dataflows ({', '.join(names)}) "
                    f"VALUES ({', '.join('?' * len(names))})", values)
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise
        return len(values)

    def dataflows(self, tenant: str | None = None, since: float | None = None,
                  limit: int = 10_000) -> list[dict[str, Any]]:
        """Data-flow rows, most recently active first."""
        rows = self._filtered("dataflows", "last_seen", limit, tenant=tenant, since=since)
        for r in rows:
            r["data_classes"] = json.loads(r["data_classes"])
            r["templates"] = json.loads(r["templates"])
            r["crm_instance"] = r["crm_instance"] or None
        return rows

    def add_canary(self, token: str, tenant: str | None, record: str,
                   environment: str | None) -> None:
        """Keep a canary registered at run time (a later registration replaces it)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO canaries VALUES (?, ?, ?, ?, ?)",
                (token, tenant, record, environment, time.time()),
            )

    def canaries(self) -> list[dict[str, Any]]:
        return self._query(
            "SELECT token, tenant, record, environment FROM canaries ORDER BY created_ts", ())

    def audit_calls(
        self, tenant: str | None = None, since: float | None = None, limit: int = 1000,
        attempted_only: bool = False,
    ) -> list[dict[str, Any]]:
        """Audited CRM calls, newest first; `attempted_only`: those answered 4xx/5xx or
        not at all (issue 14.4)."""
        if attempted_only:
            where, args = ["outcome IS NOT NULL"], []
            for column, value in (("tenant", tenant), ("ts", since)):
                if value is not None:
                    where.append(f"{column} {'>=' if column == 'ts' else '='} ?")
                    args.append(value)
            rows = self._query(f"SELECT * FROM audit_calls WHERE {' AND '.join(where)} "
                               "ORDER BY ts DESC LIMIT ?", (*args, limit))
        else:
            rows = self._filtered("audit_calls", "ts", limit, tenant=tenant, since=since)
        for r in rows:
            r["allowed"] = bool(r["allowed"])
        return rows

    def prune(self, now: float | None = None) -> int:
        """Delete buckets, flows, audit calls and data flows older than the retention."""
        cutoff = (now if now is not None else time.time()) - self.retention_s
        with self._lock:
            n = self._db.execute("DELETE FROM minute_buckets WHERE ts < ?", (cutoff,)).rowcount
            n += self._db.execute("DELETE FROM flows WHERE last_seen < ?", (cutoff,)).rowcount
            n += self._db.execute("DELETE FROM audit_calls WHERE ts < ?", (cutoff,)).rowcount
            n += self._db.execute("DELETE FROM dataflows WHERE last_seen < ?",
                                  (cutoff,)).rowcount
        return int(n)

    # -- reads (API) ---------------------------------------------------------------

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(sql, args)
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def _filtered(
        self, table: str, time_column: str, limit: int, tenant: str | None = None,
        vendor: str | None = None, since: float | None = None,
    ) -> list[dict[str, Any]]:
        """Rows of `table` (a fixed name, never user input), newest first."""
        where: list[str] = ["1=1"]
        args: list[Any] = []
        for column, value in (("tenant", tenant), ("crm_vendor", vendor)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append(f"{time_column} >= ?")
            args.append(since)
        return self._query(
            f"SELECT * FROM {table} WHERE {' AND '.join(where)} "
            f"ORDER BY {time_column} DESC LIMIT ?",
            (*args, limit),
        )

    def flows(
        self, tenant: str | None = None, vendor: str | None = None, since: float | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        rows = self._filtered("flows", "last_seen", limit, tenant, vendor, since)
        for r in rows:
            r["dns_names"] = json.loads(r["dns_names"])
            r["shared"] = bool(r["shared"])
        return rows

    def live_flows(self, since: float) -> list[dict[str, Any]]:
        """Every flow row with a packet since `since` (the conversations a restart resumes)."""
        rows = self._query("SELECT * FROM flows WHERE last_seen >= ?", (since,))
        for r in rows:
            r["dns_names"] = json.loads(r["dns_names"])
        return rows

    def audit(
        self, syn: int, synack: int, rst: int, tenant: str | None = None,
        since: float | None = None, attempted_only: bool = False, limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """TCP flows with their outcome from the flag masks seen per direction.

        `attempted`: a SYN left and no SYN+ACK came back (unanswered or refused),
        or either side reset the connection. Bit values come from the caller
        (enum lt_flow_flag through controller.abi), not from here.
        """
        outcome = (
            "CASE WHEN (flags_out & :syn) AND NOT (flags_in & :synack) AND (flags_in & :rst) "
            "THEN 'refused' "
            "WHEN (flags_out & :syn) AND NOT (flags_in & :synack) THEN 'unanswered' "
            "WHEN ((flags_out | flags_in) & :rst) THEN 'reset' "
            "ELSE 'completed' END"
        )
        where = ["proto = 'tcp'"]
        args: dict[str, Any] = {"syn": syn, "synack": synack, "rst": rst, "limit": limit}
        if tenant is not None:
            where.append("tenant = :tenant")
            args["tenant"] = tenant
        if since is not None:
            where.append("last_seen >= :since")
            args["since"] = since
        if attempted_only:
            where.append(
                "(((flags_out & :syn) AND NOT (flags_in & :synack)) "
                "OR ((flags_out | flags_in) & :rst))"
            )
        with self._lock:
            cur = self._db.execute(
                "SELECT id, src, sport, dst, dport, sni, crm_vendor, crm_instance, tenant, "
                "bytes_out, packets_out, bytes_in, packets_in, first_seen, last_seen, "
                f"flags_out, flags_in, {outcome} AS outcome FROM flows "
                f"WHERE {' AND '.join(where)} ORDER BY last_seen DESC LIMIT :limit",
                args,
            )
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def tenants(self, since: float) -> list[dict[str, Any]]:
        return self._query(
            "SELECT tenant, SUM(bytes_out) AS bytes_out, SUM(bytes_in) AS bytes_in, "
            "COUNT(DISTINCT destination) AS destinations, MAX(ts) AS last_minute "
            "FROM minute_buckets WHERE ts >= ? GROUP BY tenant ORDER BY tenant",
            (since,),
        )

    def volume(
        self, tenant: str, since: float, until: float, vendor: str | None = None
    ) -> list[dict[str, Any]]:
        where, args = ["tenant = ?", "ts >= ?", "ts < ?"], [tenant, since, until]
        if vendor is not None:
            where.append("crm_vendor = ?")
            args.append(vendor)
        return self._query(
            "SELECT ts, SUM(bytes_out) AS bytes_out, SUM(packets_out) AS packets_out, "
            "SUM(bytes_in) AS bytes_in, SUM(packets_in) AS packets_in, "
            # what the detector baselines: the egress to CRMs
            "SUM(CASE WHEN crm_vendor != '' THEN bytes_out ELSE 0 END) AS crm_bytes_out "
            f"FROM minute_buckets WHERE {' AND '.join(where)} GROUP BY ts ORDER BY ts",
            tuple(args),
        )

    def buckets(self, since: float, until: float) -> list[dict[str, Any]]:
        """Rows as `leaktap analyze` reads them (vendor/instance None when '')."""
        rows = self._query(
            "SELECT ts, tenant, crm_vendor, crm_instance, destination, bytes_out, bytes_in "
            "FROM minute_buckets WHERE ts >= ? AND ts < ? ORDER BY ts",
            (since, until),
        )
        for r in rows:
            r["crm_vendor"] = r["crm_vendor"] or None
            r["crm_instance"] = r["crm_instance"] or None
        return rows


def _statements(script: str) -> list[str]:
    """Split a migration into statements (comments may contain ';')."""
    out: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip() and any(
        ln.strip() and not ln.strip().startswith("--") for ln in current.splitlines()
    ):
        raise StorageError(f"unterminated statement in a migration: {current.strip()[:80]}")
    return out
