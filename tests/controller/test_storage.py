"""SQLite storage: WAL, migrations from every older version, bucket upserts,
retention, and a refusal to open a database from a newer leaktap."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from leaktap.controller.storage import (
    MIGRATIONS,
    SCHEMA_VERSION,
    BucketKey,
    StorageError,
    Store,
    Volume,
    _statements,
)


def _flow(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": None, "family": 4, "proto": "tcp", "src": "198.18.0.1", "sport": 40000,
        "dst": "198.18.0.2", "dport": 443, "sni": "acme.my.salesforce.com",
        "dns_names": ["acme.my.salesforce.com"], "crm_vendor": "salesforce",
        "crm_instance": "acme", "tenant": "acme", "cgroup": "/tenants/acme", "uid": 1001,
        "bytes_out": 1000, "packets_out": 3, "bytes_in": 500, "packets_in": 2,
        "first_seen": 1_700_000_000.0, "last_seen": 1_700_000_060.0,
        "flags_out": 1, "flags_in": 2,
    }
    base.update(over)
    return base


def test_wal_and_current_schema(tmp_path: Path) -> None:
    store = Store(tmp_path / "lt.db")
    assert store.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    with sqlite3.connect(tmp_path / "lt.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


@pytest.mark.parametrize("start", range(len(MIGRATIONS)))
def test_migrates_from_every_older_version(tmp_path: Path, start: int) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        for script in MIGRATIONS[:start]:
            for statement in _statements(script):
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {start}")
    store = Store(path)
    assert store.schema_version == SCHEMA_VERSION
    store.write({}, [_flow()])
    assert store.flows()[0]["flags_out"] == 1
    store.close()


def test_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StorageError, match="newer than this leaktap"):
        Store(path)


def test_bucket_deltas_add_up_and_flows_update_in_place(tmp_path: Path) -> None:
    store = Store(tmp_path / "lt.db")
    key = BucketKey(1_700_000_040, "acme", "salesforce", "acme", "acme.my.salesforce.com")
    other = BucketKey(1_700_000_040, "unassigned", None, None, "198.18.0.9")
    store.write({key: Volume(100, 1, 10, 1), other: Volume(7, 1, 0, 0)}, [])
    flow = _flow()
    ids = store.write({key: Volume(50, 2, 0, 0)}, [flow])
    assert store.volume("acme", 0, 2e9) == [
        {"ts": 1_700_000_040, "bytes_out": 150, "packets_out": 3, "bytes_in": 10,
         "packets_in": 1, "crm_bytes_out": 150}
    ]
    assert store.volume("unassigned", 0, 2e9)[0]["crm_bytes_out"] == 0
    rows = store.buckets(0, 2e9)
    assert {(r["tenant"], r["crm_vendor"], r["bytes_out"]) for r in rows} == {
        ("acme", "salesforce", 150), ("unassigned", None, 7)}
    flow["id"] = ids[id(flow)]
    flow["bytes_out"] = 5000
    store.write({}, [flow])
    flows = store.flows(tenant="acme")
    assert len(flows) == 1 and flows[0]["bytes_out"] == 5000
    assert flows[0]["dns_names"] == ["acme.my.salesforce.com"]
    assert store.flows(vendor="hubspot") == []
    assert store.flows(since=1_700_000_061) == []
    store.close()


def test_retention_prunes_old_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "lt.db", retention_days=1)
    old = BucketKey(1_000_000_020, "acme", None, None, "x")
    new = BucketKey(1_000_086_400, "acme", None, None, "x")
    store.write({old: Volume(1, 1, 0, 0), new: Volume(2, 1, 0, 0)},
                [_flow(first_seen=1_000_000_000.0, last_seen=1_000_000_010.0)])
    assert store.prune(now=1_000_090_000) == 2
    assert [r["bytes_out"] for r in store.buckets(0, 2e9)] == [2]
    assert store.flows() == []
    store.close()


def test_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="opening database"):
        Store(tmp_path / "file" / "lt.db")
