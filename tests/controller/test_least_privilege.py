"""Least privilege and private files (issue 17.8): the database and its WAL are
private whatever the umask, canaries registered through the API survive a
restart, and reader sign-ins cannot evict an admin's session."""

from __future__ import annotations

import grp
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from leaktap.controller.agent import Agent
from leaktap.controller.api.main import create_app
from leaktap.controller.api.sessions import COOKIE, SessionStore
from leaktap.controller.config import parse_config
from leaktap.controller.storage import StorageError, Store

READER, ADMIN = "reader-token-0123456789", "admin-token-0123456789ab"


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0)  # the most permissive start an operator could give the agent
    yield
    os.umask(old)


def modes(db: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for suffix in ("", "-wal", "-shm"):
        st = os.stat(db.with_name(db.name + suffix))
        out[suffix or "db"] = (stat.S_IMODE(st.st_mode), st.st_gid)
    return out


def use(store: Store) -> None:
    store.add_audit_call({
        "ts": 1.0, "tenant": "acme", "crm_vendor": "salesforce", "crm_instance": "acme",
        "destination": "acme.my.salesforce.com", "operation": "x", "action": "y",
        "method": "POST", "path": "/", "request_bytes": 1, "allowed": True,
        "protocol": "http/1.1", "pid": 1, "comm": "c",
    })


@pytest.mark.usefixtures("loose_umask")
def test_database_and_wal_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    store = Store(tmp_path / "state" / "lt.db")
    use(store)
    gid = os.getgid()
    assert modes(store.path) == {"db": (0o600, gid), "-wal": (0o600, gid), "-shm": (0o600, gid)}
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o750
    store.close()


@pytest.mark.usefixtures("loose_umask")
def test_a_configured_group_gets_0640_and_an_existing_loose_file_is_tightened(
    tmp_path: Path,
) -> None:
    db = tmp_path / "lt.db"
    store = Store(db)
    use(store)
    store.close()
    for suffix in ("", "-wal", "-shm"):  # an older leaktap, or an operator's chmod
        path = db.with_name(db.name + suffix)
        if path.exists():
            path.chmod(0o666)
    nogroup = grp.getgrnam("nogroup").gr_gid
    store = Store(db, group="nogroup")
    use(store)
    assert {k: v for k, v in modes(db).items()} == {
        "db": (0o640, nogroup), "-wal": (0o640, nogroup), "-shm": (0o640, nogroup)}
    store.close()
    with pytest.raises(StorageError, match="storage.group: no group named"):
        Store(db, group="no-such-group-17")
    assert parse_config("storage: {group: leaktap}").storage.group == "leaktap"


class RecordingPlaintext:
    """The plaintext monitor's canary interface (the inspector is tested elsewhere)."""

    def __init__(self) -> None:
        self.canaries: list[tuple[Any, ...]] = []

    def add_canary(self, token: str, tenant: str | None, record: str = "canary",
                   environment: str | None = None) -> None:
        self.canaries.append((token, tenant, record, environment))


def test_canaries_added_through_the_api_survive_a_restart(tmp_path: Path) -> None:
    config = parse_config("tenants: [{name: acme, match: {uids: [1001]}}]")
    store = Store(tmp_path / "lt.db")
    running = SimpleNamespace(store=store, plaintext=RecordingPlaintext())
    app = create_app(running, readers=[READER], admins=[ADMIN], manage=False)
    with TestClient(app) as client:
        answer = client.post("/v1/canaries", headers={"Authorization": f"Bearer {ADMIN}"},
                             json={"token": "CANARY-5b1e77d0c4", "tenant": "acme",
                                   "record": "Account/001x"})
        assert answer.status_code == 201 and "CANARY-5b1e77d0c4" not in answer.text
    store.close()
    # the next start: a new process, the same database
    store = Store(tmp_path / "lt.db")
    agent = Agent(config, ["lo"], store)
    agent.plaintext = RecordingPlaintext()
    assert agent.restore_canaries() == 1  # before: 0, the canary was only in memory
    assert agent.plaintext.canaries == [("CANARY-5b1e77d0c4", "acme", "Account/001x", None)]
    store.close()


def test_a_flood_of_reader_sign_ins_never_evicts_an_admin_session() -> None:
    app = create_app(SimpleNamespace(), readers=[READER], admins=[ADMIN], manage=False)
    app.state.sessions = SessionStore(max_sessions=20)
    with TestClient(app, base_url="https://testserver") as client:
        signed = client.post("/v1/session", headers={"Authorization": f"Bearer {ADMIN}"})
        assert signed.status_code in (200, 204, 303)
        admin_sid = client.cookies.get(COOKIE)
        assert admin_sid
        client.cookies.clear()
        for _ in range(200):  # whoever holds a reader token signs in again and again
            client.post("/v1/session", headers={"Authorization": f"Bearer {READER}"})
            client.cookies.clear()
        client.cookies.set(COOKIE, admin_sid)
        whoami = client.get("/v1/whoami")
        assert whoami.status_code == 200 and whoami.json()["role"] == "admin"
    sessions: SessionStore = app.state.sessions
    roles = [sessions.role(sid) for sid in list(sessions._sessions)]
    assert roles.count("reader") == 20 and roles.count("admin") == 1
