"""Fingerprint sets on disk: built from a tenant's export, listed, removed, loaded.

A set's hashes live in a sidecar file next to the database
(`<db dir>/fingerprints/<random>.npz`: sorted 64-bit keyed hashes with row and
column, see analytics/plaintext/fingerprints); the database holds its catalogue
row (tenant, name, column names, min_matches, counts, file, the id of the key it
was built with) and a generation counter that every change bumps in the same
transaction. A running agent polls the counter (`FingerprintWatcher`, every
POLL_S) and swaps in the new sets. Neither the files nor the database hold a
value; column names are kept (they say what kind of data a match was).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np

from leaktap.analytics.plaintext.fingerprints import (
    BuildStats,
    FingerprintIndex,
    FingerprintMatcher,
    SetArrays,
    SetBuilder,
    SetInfo,
    ValueHasher,
)
from leaktap.controller.errors import LeaktapError
from leaktap.controller.storage import make_private

logger = logging.getLogger(__name__)

POLL_S = 1.0  # a change is live within this (the contract says 5 s)
FILES_DIR = "fingerprints"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_MATCHES_MAX = 1000
CSV_FIELD_MAX = 1 << 20

SCHEMA = """
CREATE TABLE IF NOT EXISTS fingerprint_sets (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    columns TEXT NOT NULL,
    min_matches INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    "values" INTEGER NOT NULL,
    common_values INTEGER NOT NULL,
    skipped TEXT NOT NULL,
    file TEXT NOT NULL,
    file_bytes INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS fingerprint_generation (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    generation INTEGER NOT NULL
);
INSERT OR IGNORE INTO fingerprint_generation (id, generation) VALUES (0, 0);
"""


class FingerprintError(LeaktapError):
    """A set that cannot be built, found or loaded (names the line of a bad input)."""


# -- reading an export ------------------------------------------------------------


def detect_format(name: str, head: str) -> str:
    lower = name.lower()
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if lower.endswith(".csv"):
        return "csv"
    return "jsonl" if head.lstrip().startswith("{") else "csv"


def _select(header: list[str], wanted: list[str] | None, source: str) -> list[int]:
    if not wanted:
        return list(range(len(header)))
    missing = [c for c in wanted if c not in header]
    if missing:
        raise FingerprintError(f"{source}: no column {', '.join(missing)} "
                               f"(columns: {', '.join(header)})")
    return [header.index(c) for c in wanted]


def read_csv(f: IO[str], source: str, wanted: list[str] | None
             ) -> tuple[list[str], Iterator[tuple[int, list[str | None]]]]:
    """(selected column names, rows of their values with their line) of a CSV
    with a header row; a malformed line raises FingerprintError naming it."""
    csv.field_size_limit(CSV_FIELD_MAX)
    reader = csv.reader(f, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise FingerprintError(f"{source}: empty file (a header row is needed)") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise FingerprintError(f"{source}:1: malformed CSV header: {e}") from e
    header = [h.strip() for h in header]
    picks = _select(header, wanted, source)

    def rows() -> Iterator[tuple[int, list[str | None]]]:
        while True:
            line = reader.line_num + 1
            try:
                record = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                raise FingerprintError(f"{source}:{line}: malformed CSV: {e}") from e
            if not record:
                continue
            if len(record) != len(header):
                raise FingerprintError(f"{source}:{reader.line_num}: {len(record)} fields, "
                                       f"the header has {len(header)}")
            yield reader.line_num, [record[i] or None for i in picks]

    return [header[i] for i in picks], rows()


def _scalar(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    return value if isinstance(value, str) else json.dumps(value)


def read_jsonl(f: IO[str], source: str, wanted: list[str] | None
               ) -> tuple[list[str], Iterator[tuple[int, list[str | None]]]]:
    """As read_csv, for one JSON object per line (columns: --columns, else the
    first object's keys)."""
    lines = enumerate(f, 1)

    def parse(number: int, line: str) -> dict[str, Any]:
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise FingerprintError(f"{source}:{number}: not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise FingerprintError(f"{source}:{number}: not a JSON object")
        return obj

    first: tuple[int, dict[str, Any]] | None = None
    try:
        for number, line in lines:
            if line.strip():
                first = (number, parse(number, line))
                break
    except UnicodeDecodeError as e:
        raise FingerprintError(f"{source}: not UTF-8: {e}") from e
    if first is None:
        raise FingerprintError(f"{source}: empty file")
    columns = list(wanted) if wanted else [str(k) for k in first[1]]

    def rows() -> Iterator[tuple[int, list[str | None]]]:
        assert first is not None
        yield first[0], [_scalar(first[1].get(c)) for c in columns]
        number = first[0]
        try:
            for number, line in lines:
                if line.strip():
                    obj = parse(number, line)
                    yield number, [_scalar(obj.get(c)) for c in columns]
        except UnicodeDecodeError as e:
            raise FingerprintError(f"{source}:{number + 1}: not UTF-8: {e}") from e

    return columns, rows()


def build_set(hasher: ValueHasher, f: IO[str], source: str, fmt: str,
              wanted: list[str] | None) -> tuple[list[str], SetArrays, BuildStats]:
    reader = read_jsonl if fmt == "jsonl" else read_csv
    columns, rows = reader(f, source, wanted)
    builder = SetBuilder(hasher, columns)
    for _, values in rows:
        builder.add_row(values)
    if builder.stats.rows == 0:
        raise FingerprintError(f"{source}: no rows")
    return columns, builder.finish(), builder.stats


def open_text(data: bytes) -> IO[str]:
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline="")


# -- the catalogue ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetRecord:
    tenant: str
    name: str
    columns: list[str]
    min_matches: int
    rows: int
    values: int
    common_values: int
    skipped: dict[str, int]
    file: str
    file_bytes: int
    key_id: str
    created: float

    def public(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__slots__}
        out.pop("file")
        return out


def check_name(what: str, value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise FingerprintError(f"{what} {value!r}: 1-64 letters, digits, '_', '.', '-'")
    return value


class FingerprintStore:
    """The catalogue in the agent's SQLite file and the sidecar files beside it."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path)
        self.dir = self.db_path.parent / FILES_DIR
        try:
            self.db_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            if not self.db_path.exists():
                make_private(self.db_path)
            self._db = sqlite3.connect(self.db_path, check_same_thread=False,
                                       isolation_level=None, timeout=10)
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise FingerprintError(f"opening {self.db_path}: {e}") from e
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> FingerprintStore:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def generation(self) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT generation FROM fingerprint_generation WHERE id = 0").fetchone()
        return int(row[0]) if row else 0

    def sets(self) -> list[SetRecord]:
        with self._lock:
            rows = self._db.execute(
                'SELECT tenant, name, columns, min_matches, rows, "values", common_values, '
                "skipped, file, file_bytes, key_id, created FROM fingerprint_sets "
                "ORDER BY tenant, name").fetchall()
        return [SetRecord(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], r[6],
                          json.loads(r[7]), r[8], r[9], r[10], r[11]) for r in rows]

    def get(self, tenant: str, name: str) -> SetRecord | None:
        return next((r for r in self.sets() if (r.tenant, r.name) == (tenant, name)), None)

    def add(self, tenant: str, name: str, columns: list[str], min_matches: int,
            arrays: SetArrays, stats: BuildStats, key_id: str) -> SetRecord:
        """Store a built set (replacing one of the same tenant and name)."""
        check_name("tenant", tenant)
        check_name("name", name)
        if not 1 <= min_matches <= MIN_MATCHES_MAX:
            raise FingerprintError(f"min-matches {min_matches}: 1 to {MIN_MATCHES_MAX}")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        file = f"{secrets.token_hex(8)}.npz"
        path = self.dir / file
        tmp = self.dir / f".{file}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            # numpy's stubs type **arrays against its own bool keyword (allow_pickle)
            savez = cast(Callable[..., None], np.savez)
            savez(f, **arrays.as_dict())
        os.replace(tmp, path)
        old = self.get(tenant, name)
        record = SetRecord(tenant, name, list(columns), min_matches, stats.rows, stats.values,
                           stats.common_values, dict(stats.skipped), file,
                           path.stat().st_size, key_id, time.time())
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO fingerprint_sets VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (tenant, name, json.dumps(record.columns), min_matches, record.rows,
                     record.values, record.common_values, json.dumps(record.skipped), file,
                     record.file_bytes, key_id, record.created))
                self._db.execute("UPDATE fingerprint_generation SET generation = generation + 1")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                path.unlink(missing_ok=True)
                raise
        if old is not None:
            (self.dir / old.file).unlink(missing_ok=True)
        return record

    def remove(self, tenant: str, name: str) -> bool:
        old = self.get(tenant, name)
        if old is None:
            return False
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM fingerprint_sets WHERE tenant = ? AND name = ?",
                             (tenant, name))
            self._db.execute("UPDATE fingerprint_generation SET generation = generation + 1")
            self._db.execute("COMMIT")
        (self.dir / old.file).unlink(missing_ok=True)
        return True

    def load(self, key_id: str) -> tuple[FingerprintIndex, list[str]]:
        """Every set built with this key, as one index; plus the problems (sets built
        with another key or whose file is unreadable), which are left out."""
        generation = self.generation()
        sets: list[tuple[SetInfo, SetArrays]] = []
        problems: list[str] = []
        for r in self.sets():
            label = f"{r.tenant}/{r.name}"
            if r.key_id != key_id:
                problems.append(f"{label}: built with another key (key id {r.key_id}, "
                                f"this agent's is {key_id}); build it again on this host")
                continue
            try:
                with np.load(self.dir / r.file) as data:
                    arrays = SetArrays.from_dict({k: data[k] for k in data.files})
            except (OSError, ValueError, KeyError) as e:
                problems.append(f"{label}: unreadable {r.file}: {e}")
                continue
            sets.append((SetInfo(r.tenant, r.name, tuple(r.columns), r.min_matches), arrays))
        return FingerprintIndex(sets, generation), problems


class FingerprintWatcher:
    """Polls the generation counter and swaps the matcher's index when it moves."""

    def __init__(self, db_path: str | Path, matcher: FingerprintMatcher,
                 interval_s: float = POLL_S) -> None:
        self.store = FingerprintStore(db_path)
        self.matcher = matcher
        self.interval_s = interval_s
        self.loaded_generation = -1
        self.problems: list[str] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> bool:
        """Reload if the sets changed; True when it did."""
        generation = self.store.generation()
        if generation == self.loaded_generation:
            return False
        index, problems = self.store.load(self.matcher.hasher.key_id)
        self.matcher.replace(index)
        self.loaded_generation = index.generation
        for p in problems:
            if p not in self.problems:
                logger.warning("fingerprint set not loaded: %s", p)
        self.problems = problems
        logger.info("fingerprint sets loaded (generation %d): %d set(s), %.1f MB",
                    index.generation, len(index.sets), index.nbytes / 1e6)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - keep watching; the error is logged
                self.errors += 1
                logger.exception("reloading fingerprint sets")

    def start(self) -> FingerprintWatcher:
        self.poll()
        self._thread = threading.Thread(target=self._loop, name="lt-fingerprints", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.store.close()

    def __enter__(self) -> FingerprintWatcher:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()
