"""A thread-safe SQLite connection to the agent's database (WAL), for the alert
modules: each opens its own next to the Store's, on the schema the Store migrated."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Database:
    def __init__(self, path: str | Path, require_table: str) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._lock = threading.RLock()
        self._commits = 0  # ours; PRAGMA data_version counts the other connections'
        found = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (require_table,)
        ).fetchone()
        if not found:
            self._db.close()
            raise RuntimeError(
                f"{self.path} has no {require_table} table: open it with Store first (migrations)"
            )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: take the write lock up front (no upgrade deadlocks)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._commits += 1

    def query(self, sql: str, args: tuple[Any, ...] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(sql, args)
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        with self._lock:
            rowcount = int(self._db.execute(sql, args).rowcount)
            self._commits += 1
            return rowcount

    def version(self) -> tuple[int, int]:
        """Differs from any earlier value once anything was committed to the file."""
        with self._lock:
            return self._commits, int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
