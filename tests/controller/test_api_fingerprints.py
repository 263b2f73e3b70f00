"""POST/GET/DELETE /v1/fingerprints (issue 15): admin uploads, readers list, the
agent's matcher reloads the change; a malformed upload names its line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from leaktap.analytics.plaintext.inspector import ContentInspector
from leaktap.analytics.plaintext.redact import KeyedHasher
from leaktap.controller.api.main import create_app
from leaktap.controller.config import parse_config
from leaktap.controller.fingerprint_store import FingerprintWatcher
from tests.analytics.fingerprint_data import as_csv, as_json, contacts

READER, ADMIN = "r" * 24, "a" * 24
COLUMNS = ["name", "email", "phone"]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Any]:
    config = parse_config("tenants:\n  - name: acme\n    match: {uids: [4801]}\n"
                          "  - name: globex\n    match: {uids: [4802]}\n")
    inspector = ContentInspector(KeyedHasher(b"k" * 32))
    watcher = FingerprintWatcher(tmp_path / "lt.db", inspector.fingerprints)
    yield SimpleNamespace(config=config, plaintext=SimpleNamespace(inspector=inspector),
                          store=SimpleNamespace(path=tmp_path / "lt.db"),
                          fingerprints=watcher, ready=lambda: (True, "ok"),
                          probes=SimpleNamespace(attach_modes={}))
    watcher.stop()


@pytest.fixture
def client(agent: Any) -> Iterator[TestClient]:
    with TestClient(create_app(agent, readers=[READER], admins=[ADMIN], manage=False)) as c:
        yield c


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_upload_list_reload_and_remove(agent: Any, client: TestClient) -> None:
    records = list(contacts(500, seed=21))
    body = as_csv(records, COLUMNS)
    params = {"tenant": "acme", "name": "contacts", "columns": "name,email,phone",
              "min_matches": 3}
    r = client.post("/v1/fingerprints", params=params, content=body,
                    headers={**_auth(READER), "Content-Type": "text/csv"})
    assert r.status_code == 413  # a reader's body is capped like any other route's
    r = client.post("/v1/fingerprints", params=params, content=body[:200],
                    headers={**_auth(READER), "Content-Type": "text/csv"})
    assert r.status_code == 403
    r = client.post("/v1/fingerprints", params=params, content=body,
                    headers={**_auth(ADMIN), "Content-Type": "text/csv"})
    assert r.status_code == 201, r.text
    assert (r.json()["rows"], r.json()["values"]) == (500, 1500)
    assert agent.fingerprints.poll()
    matcher = agent.plaintext.inspector.fingerprints
    assert [(m.info.tenant, m.values) for m in matcher.scan([as_json(records[:3])])] == [
        ("acme", 9)]
    listed = client.get("/v1/fingerprints", headers=_auth(READER)).json()
    assert [s["name"] for s in listed["sets"]] == ["contacts"]
    assert listed["loaded_generation"] == listed["generation"] == 1
    assert "file" not in listed["sets"][0]
    assert client.delete("/v1/fingerprints/acme/contacts",
                         headers=_auth(READER)).status_code == 403
    assert client.delete("/v1/fingerprints/acme/contacts",
                         headers=_auth(ADMIN)).status_code == 200
    assert client.delete("/v1/fingerprints/acme/contacts",
                         headers=_auth(ADMIN)).status_code == 404
    assert agent.fingerprints.poll() and not matcher.active


def test_malformed_upload_names_the_line_and_unknown_tenant_is_refused(
        client: TestClient) -> None:
    r = client.post("/v1/fingerprints", params={"tenant": "acme", "name": "x"},
                    content=b'{"email": "a@example.com"}\n{"email": \n',
                    headers={**_auth(ADMIN), "Content-Type": "application/x-ndjson"})
    assert r.status_code == 400 and r.json()["detail"].startswith("upload:2: not JSON")
    r = client.post("/v1/fingerprints", params={"tenant": "initech", "name": "x"},
                    content=b"email\na@example.com\n", headers=_auth(ADMIN))
    assert r.status_code == 422 and "no tenant named initech" in r.text
