"""Exact data match end to end (issue 15.4): a set of acme's contacts is built with
`leaktap fingerprint add` from a generated export; a real TLS client (Python ssl over
OpenSSL, one SSL_write per request) in globex's cgroup writes three of acme's rows
to globex's CRM instance as JSON, as CSV and inside a paragraph of free text: each is
one proprietary_data finding naming acme as the owner, through the real uprobes and
monitor. acme writing the same rows to its own sanctioned instance is no alert.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from leaktap.controller.config import LeaktapConfig, parse_config
from leaktap.controller.fingerprint_store import FingerprintWatcher
from tests.analytics.fingerprint_data import as_csv, as_json, as_paragraph, contacts, write_csv
from tests.e2e.test_plaintext_tls import (  # noqa: F401 - fixtures shared with that module
    CRM_IP,
    REPO,
    collected,
    in_cgroup,
    lab,
    monitor,
    py,
    run,
    wait_probed,
)

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

COLUMNS = ["name", "email", "phone"]
CONFIG = """
tenants:
  - name: acme
    match: {cgroup: "/lt-pt-acme*"}
    allow: ["salesforce:acme"]
  - name: globex
    match: {cgroup: "/lt-pt-globex*"}
    allow: ["salesforce:globex"]
plaintext:
  enabled: true
  select: {cgroups: ["/lt-pt-acme*", "/lt-pt-globex*"]}
  max_bytes: 4096
"""

WRITER = """
import socket, ssl, sys
host, content_type, body = sys.argv[1], sys.argv[2], sys.argv[3].encode()
print("started", flush=True)
sys.stdin.readline()  # the test says go once the monitor has probed this process
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with ctx.wrap_socket(socket.create_connection(("{ip}", 443)), server_hostname=host) as tls:
    tls.sendall(b"POST /services/data/v59.0/sobjects/Contact HTTP/1.1\\r\\nHost: " +
                host.encode() + b"\\r\\nContent-Type: " + content_type.encode() +
                b"\\r\\nContent-Length: " + str(len(body)).encode() + b"\\r\\n\\r\\n" + body)
    assert tls.recv(4096).startswith(b"HTTP/1.1 200")
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def config(lab: dict[str, Any]) -> LeaktapConfig:  # noqa: F811 - the imported fixture
    path = lab["tmp"] / "fingerprints.yaml"
    path.write_text(CONFIG + f'storage: {{path: "{lab["tmp"] / "fp.db"}"}}\n')
    lab["config_file"] = path
    cfg = parse_config(CONFIG)
    storage = cfg.storage.model_copy(update={"path": str(lab["tmp"] / "fp.db")})
    return cfg.model_copy(update={"storage": storage})


@pytest.fixture(scope="module")
def acme_rows(lab: dict[str, Any], config: LeaktapConfig,  # noqa: F811
              monitor: Any) -> list[dict[str, str]]:  # noqa: F811
    records = list(contacts(5000, seed=1504))
    export = lab["tmp"] / "acme-contacts.csv"
    write_csv(str(export), records, COLUMNS)
    out = run([str(REPO / ".venv/bin/leaktap"), "fingerprint", "add", "--config",
               str(lab["config_file"]), "--tenant", "acme", "--name", "contacts", str(export),
               "--columns", ",".join(COLUMNS)])
    assert json.loads(out)["values"] == 3 * len(records)
    export.unlink()  # from here on, the values exist only in this test's memory
    mon, _ = monitor
    matcher = mon.inspector.fingerprints
    matcher.allow = {t.name: tuple(t.allow) for t in config.tenants}  # as the agent does
    watcher = FingerprintWatcher(config.storage.path, matcher)
    assert watcher.poll() and matcher.active and watcher.problems == []
    watcher.stop()
    return records[1000:1003]


def _write(where: dict[str, Any], mon: Any, cgroup: str, host: str, content_type: str,
           body: bytes) -> None:
    argv = in_cgroup(where["mount"], cgroup, py(WRITER.replace("{ip}", CRM_IP)) + [
        host, content_type, body.decode()])
    p = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline() == b"started\n"
        wait_probed(mon, p.pid)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.stdout.readline() == b"done\n"
    finally:
        p.kill()
        p.wait()


BODIES = {
    "json": ("application/json", as_json),
    "csv": ("text/csv", lambda rows: as_csv(rows, COLUMNS)),
    "paragraph": ("application/json", as_paragraph),
}


@pytest.mark.parametrize("form", list(BODIES))
def test_globex_writing_acme_rows_is_one_alert_naming_acme(lab, monitor, collected,  # noqa: F811
                                                           acme_rows, form) -> None:
    mon, _ = monitor
    content_type, make = BODIES[form]
    _write(lab, mon, "lt-pt-globex", "globex.my.salesforce.com", content_type,
           make(acme_rows))
    found = collected.finding("proprietary_data")
    assert len(found) == 1, collected.findings
    f = found[0]
    assert (f.tenant, f.severity, f.crm_vendor, f.crm_instance) == (
        "globex", "critical", "salesforce", "globex")
    ev = f.evidence
    assert (ev["owner_tenant"], ev["set"], ev["rows_matched"]) == ("acme", "contacts", 3)
    assert ev["values_matched"] == 9 and ev["destination"] == "globex.my.salesforce.com"
    assert ev["process"] and ev["pid"] > 0
    text = repr(f)
    for r in acme_rows:
        for c in COLUMNS:
            assert r[c] not in text and r[c].lower() not in text


def test_acme_writing_its_rows_to_its_own_instance_is_no_alert(lab, monitor,  # noqa: F811
                                                               collected,  # noqa: F811
                                                               acme_rows) -> None:
    mon, _ = monitor
    home = mon.inspector.stats["fingerprint_home_writes"]
    for content_type, make in BODIES.values():
        _write(lab, mon, "lt-pt-acme", "acme.my.salesforce.com", content_type,
               make(acme_rows))
    # each write was inspected and recognised as acme's data going home
    assert collected.wait(lambda: [1] if mon.inspector.stats[
        "fingerprint_home_writes"] >= home + 3 else []) == [1]
    assert [f for f in collected.findings if f.kind == "proprietary_data"] == []


def test_fingerprint_files_and_database_hold_no_value(config, acme_rows) -> None:
    db = Path(config.storage.path)
    stored = b"".join(p.read_bytes() for p in db.parent.rglob("*")
                      if p.is_file() and (p.name.startswith(db.name) or p.suffix == ".npz"))
    assert len(stored) > 5000 * 3 * 8
    for r in acme_rows:
        for c in COLUMNS:
            assert r[c].encode() not in stored and r[c].lower().encode() not in stored
