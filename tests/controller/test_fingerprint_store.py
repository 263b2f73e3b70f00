"""`leaktap fingerprint add | list | remove` and the agent's reload (issue 15): sets
built from a generated export hold no value on disk, bad input names its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leaktap.analytics.plaintext.fingerprints import FingerprintMatcher, ValueHasher
from leaktap.controller.commands import cli
from leaktap.controller.commands.fingerprint import value_hasher
from leaktap.controller.config import load_config
from leaktap.controller.fingerprint_store import FingerprintStore, FingerprintWatcher
from tests.analytics.fingerprint_data import as_json, contacts, write_csv

ROWS = 2000


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    cfg = tmp_path / "leaktap.yaml"
    cfg.write_text(f"""
storage: {{path: "{tmp_path / 'lt.db'}"}}
tenants:
  - name: acme
    match: {{uids: [4801]}}
    allow: ["salesforce:acme"]
  - name: globex
    match: {{uids: [4802]}}
""")
    return {"config": cfg, "db": tmp_path / "lt.db", "tmp": tmp_path}


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _add(capsys: pytest.CaptureFixture[str], setup: dict[str, Path], path: Path,
         *extra: str) -> tuple[int, str, str]:
    return _cli(capsys, "fingerprint", "add", "--config", str(setup["config"]), "--tenant",
                "acme", "--name", "contacts", str(path), *extra)


def test_add_list_remove_and_no_value_on_disk(capsys, setup) -> None:
    records = list(contacts(ROWS, seed=4))
    export = setup["tmp"] / "export" / "contacts.csv"
    export.parent.mkdir()
    write_csv(str(export), records)
    code, out, err = _add(capsys, setup, export, "--columns", "email,phone,name",
                          "--min-matches", "4")
    assert code == 0, err
    added = json.loads(out)
    assert (added["tenant"], added["name"], added["rows"]) == ("acme", "contacts", ROWS)
    assert added["columns"] == ["email", "phone", "name"] and added["min_matches"] == 4
    assert added["values"] == 3 * ROWS
    code, out, _ = _cli(capsys, "fingerprint", "list", "--config", str(setup["config"]))
    assert code == 0 and [json.loads(line)["name"] for line in out.splitlines()] == ["contacts"]
    # neither the database nor the set's files hold any value, in any case
    stored = b"".join(p.read_bytes() for p in setup["tmp"].rglob("*")
                      if p.is_file() and p.parent.name != "export")
    assert len(stored) > 3 * ROWS * 8
    for r in records:
        for column in ("name", "email", "phone"):
            for form in {r[column], r[column].lower()}:
                assert form.encode() not in stored, column
        assert r["phone"].replace(" ", "").replace("(", "").replace(")", "").replace(
            "-", "").encode() not in stored
    store = FingerprintStore(setup["db"])
    generation = store.generation()
    code, out, _ = _cli(capsys, "fingerprint", "remove", "--config", str(setup["config"]),
                        "--tenant", "acme", "--name", "contacts")
    assert code == 0 and store.sets() == [] and store.generation() == generation + 1
    assert list((setup["tmp"] / "fingerprints").glob("*.npz")) == []
    code, _, err = _cli(capsys, "fingerprint", "remove", "--config", str(setup["config"]),
                        "--tenant", "acme", "--name", "contacts")
    assert code == 2 and "no fingerprint set acme/contacts" in err


@pytest.mark.parametrize(("name", "content", "line", "what"), [
    ("bad.csv", 'name,email\n"Jane Smith",jane@example.com\n"Jo"e,x@example.com\n', 3,
     "malformed CSV"),
    ("short.csv", "name,email\nJane,jane@example.com\nJo\nAl,al@example.com\n", 3,
     "1 fields, the header has 2"),
    ("bad.jsonl", '{"name": "Jane"}\n\n{"name": "Jo"\n', 3, "not JSON"),
    ("list.jsonl", '{"name": "Jane"}\n["Jo"]\n', 2, "not a JSON object"),
])
def test_malformed_export_is_an_error_naming_the_line(capsys, setup, name, content, line,
                                                      what) -> None:
    path = setup["tmp"] / name
    path.write_text(content)
    code, out, err = _add(capsys, setup, path)
    assert code == 2 and out == ""
    assert f"{path}:{line}: {what}" in err
    assert FingerprintStore(setup["db"]).sets() == []


def test_unknown_column_and_tenant_are_refused(capsys, setup) -> None:
    path = setup["tmp"] / "c.csv"
    write_csv(str(path), list(contacts(5, seed=1)))
    code, _, err = _add(capsys, setup, path, "--columns", "email,fax")
    assert code == 2 and "no column fax" in err
    code, _, err = _cli(capsys, "fingerprint", "add", "--config", str(setup["config"]),
                        "--tenant", "initech", "--name", "x", str(path))
    assert code == 2 and "no such tenant" in err


def test_jsonl_export_and_watcher_reload(capsys, setup) -> None:
    records = list(contacts(300, seed=8))
    path = setup["tmp"] / "contacts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    hasher = value_hasher(load_config(str(setup["config"])))
    matcher = FingerprintMatcher(b"unused-key-16byt")
    matcher.hasher = hasher
    watcher = FingerprintWatcher(setup["db"], matcher)
    assert watcher.poll() and not matcher.active
    assert not watcher.poll()  # nothing changed
    code, _, err = _add(capsys, setup, path, "--columns", "name,email,phone")
    assert code == 0, err
    assert watcher.poll() and matcher.active
    assert [(m.info.tenant, m.values) for m in matcher.scan([as_json(records[:3])])] == [
        ("acme", 9)]
    # a set built with another key is left out and said so
    other = FingerprintMatcher(b"another-key-0123")
    other_watcher = FingerprintWatcher(setup["db"], other)
    assert other_watcher.poll() and not other.active
    assert "built with another key" in other_watcher.problems[0]
    assert isinstance(hasher, ValueHasher)
    _cli(capsys, "fingerprint", "remove", "--config", str(setup["config"]), "--tenant", "acme",
         "--name", "contacts")
    assert watcher.poll() and not matcher.active
    watcher.stop()
    other_watcher.stop()


def test_a_running_watcher_loads_a_new_set_within_5_s(setup) -> None:
    import time

    from leaktap.analytics.plaintext.fingerprints import SetBuilder, fingerprint_key
    from leaktap.analytics.plaintext.redact import KeyedHasher

    matcher = FingerprintMatcher(fingerprint_key(KeyedHasher(b"w" * 32)))
    records = list(contacts(50, seed=9))
    with FingerprintWatcher(setup["db"], matcher) as watcher:
        assert not matcher.active
        builder = SetBuilder(matcher.hasher, ["email"])
        for r in records:
            builder.add_row([r["email"]])
        with FingerprintStore(setup["db"]) as store:
            store.add("acme", "emails", ["email"], 3, builder.finish(), builder.stats,
                      matcher.hasher.key_id)
            added = time.monotonic()
            generation = store.generation()
        while not matcher.active and time.monotonic() - added < 5:
            time.sleep(0.05)
        assert matcher.active and time.monotonic() - added < 5
        assert watcher.loaded_generation == generation


def test_agent_wires_the_watcher_and_the_owners_allow_lists(capsys, setup) -> None:
    import contextlib
    from types import SimpleNamespace

    from leaktap.analytics.plaintext.inspector import ContentInspector
    from leaktap.controller.agent import Agent
    from leaktap.controller.plaintext.monitor import SECRET_FILE, load_or_create_secret

    config = load_config(str(setup["config"]))
    secret = load_or_create_secret(setup["tmp"] / SECRET_FILE)  # the monitor's key
    from leaktap.analytics.plaintext.redact import KeyedHasher

    inspector = ContentInspector(KeyedHasher(secret))
    path = setup["tmp"] / "contacts.csv"
    records = list(contacts(100, seed=3))
    write_csv(str(path), records)
    assert _add(capsys, setup, path, "--columns", "name,email,phone")[0] == 0
    with contextlib.ExitStack() as stack:
        agent = SimpleNamespace(config=config, store=SimpleNamespace(path=setup["db"]),
                                plaintext=SimpleNamespace(inspector=inspector), _exit=stack,
                                fingerprints=None)
        Agent._watch_fingerprints(agent)  # type: ignore[arg-type]
        matcher = inspector.fingerprints
        assert matcher.active and agent.fingerprints.problems == []
        assert matcher.sanctioned("acme", "salesforce", "acme")
        assert not matcher.sanctioned("acme", "salesforce", "globex")
        assert not matcher.sanctioned("globex", "salesforce", "globex")  # no allow list
    assert agent.fingerprints._stop.is_set()


def test_db_option_keeps_the_key_beside_that_database(capsys, setup) -> None:
    """`--db` names the store as for `run`: the key the monitor reads with `run --db`
    is the one beside that database, not beside the configuration's storage.path."""
    from leaktap.controller.config import with_database
    from leaktap.controller.plaintext.monitor import SECRET_FILE

    other = setup["tmp"] / "elsewhere"
    other.mkdir()
    path = setup["tmp"] / "contacts.csv"
    write_csv(str(path), list(contacts(50, seed=5)))
    code, _, err = _add(capsys, setup, path, "--db", str(other / "lt.db"))
    assert code == 0, err
    assert (other / SECRET_FILE).is_file() and not (setup["tmp"] / SECRET_FILE).exists()
    assert not setup["db"].exists() and (other / "lt.db").is_file()
    config = with_database(load_config(str(setup["config"])), other / "lt.db")
    assert config.storage.path == str(other / "lt.db")
    with FingerprintStore(other / "lt.db") as store:
        index, _ = store.load(value_hasher(config).key_id)
    assert len(index.sets) == 1  # built and loaded under the same key
