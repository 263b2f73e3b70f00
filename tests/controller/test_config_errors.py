"""Errors at start are messages, not tracebacks (issue 17.6): each broken
configuration is refused by `leaktap run` (the real CLI, in a subprocess) with
exit 2 and one stderr line `FILE:LINE: key: what is wrong`, and `leaktap doctor
--config` reports the very same line before `run` is tried."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from leaktap.controller.commands import doctor
from leaktap.controller.config import TOKEN_MIN_LENGTH, load_config, parse_config
from leaktap.controller.errors import ConfigError

TOKEN = "reader-token-0123456789"
SHORT = "short-token"  # under TOKEN_MIN_LENGTH and under a webhook secret's 16
HEAD = f"tokens: {{reader: [{TOKEN}]}}\n"  # line 1 of every case


@dataclass(frozen=True)
class Case:
    name: str
    body: str  # after HEAD; {d} is the case's directory
    line: int
    key: str
    says: str


CASES = [
    Case("missing token file", "token_files:\n  admin: [{d}/admin.token]\n",
         3, "token_files.admin[0]", "{d}/admin.token: no such file"),
    Case("short token file", "token_files:\n  reader: [{d}/short.token]\n",
         3, "token_files.reader[0]",
         f"{{d}}/short.token holds {len(SHORT)} characters, fewer than the "
         f"{TOKEN_MIN_LENGTH} required"),
    Case("missing routing key file",
         "sinks:\n  - type: pagerduty\n    routing_key_file: {d}/pd.key\n",
         4, "sinks[0].routing_key_file", "{d}/pd.key: no such file"),
    Case("short webhook secret file",
         "sinks:\n  - type: webhook\n    url: https://soc.example/hook\n"
         "    secret_file: {d}/short.token\n",
         5, "sinks[0].secret_file",
         "{d}/short.token does not hold a valid secret: String should have at least 16"),
    Case("missing TLS key", "tls:\n  certfile: {d}/short.token\n  keyfile: {d}/tls.key\n",
         4, "tls.keyfile", "{d}/tls.key: no such file"),
    Case("short HMAC key", "plaintext:\n  hmac_secret_file: {d}/short.token\n",
         3, "plaintext.hmac_secret_file",
         f"{{d}}/short.token holds {len(SHORT) + 1} bytes, fewer than the 16 required"),
    Case("ring pages not a power of two", "kernel:\n  ringbuf_pages: 3\n",
         3, "kernel.ringbuf_pages", "must be a power of two in "),
    Case("duplicated tokens block", "mode: tc\ntokens:\n  admin: [admin-token-0123456789]\n",
         3, "tokens", "given twice (first at line 1)"),
]


@dataclass(frozen=True)
class Refusal:
    config: Path
    returncode: int
    stderr: str


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Refusal]:
    """Every case through `leaktap run`, the subprocesses started together."""
    root = tmp_path_factory.mktemp("configs")
    (root / "short.token").write_text(SHORT + "\n")
    # --db under a regular file: should a case ever pass config load, the agent
    # stops at its database, before anything touches the kernel
    (root / "not-a-dir").write_text("")
    running = {}
    for i, case in enumerate(CASES):
        config = root / f"case{i}.yaml"
        config.write_text(HEAD + case.body.format(d=root))
        running[case.name] = (config, subprocess.Popen(
            [sys.executable, "-m", "leaktap.controller.commands.cli", "run",
             "--config", str(config), "--db", str(root / "not-a-dir" / "leaktap.db")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = {}
    for name, (config, proc) in running.items():
        _, stderr = proc.communicate(timeout=60)
        out[name] = Refusal(config, proc.returncode, stderr)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_run_refuses_with_one_line(case: Case, refusals: dict[str, Refusal]) -> None:
    r = refusals[case.name]
    d = r.config.parent
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{r.config}:{case.line}: {case.key}: "), lines[0]
    assert case.says.format(d=d) in lines[0]
    if "token" in case.name and "short" in case.name:
        assert SHORT not in lines[0].replace(str(d), "")  # a secret never in a message


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_doctor_reports_the_same_line(case: Case, refusals: dict[str, Refusal]) -> None:
    r = refusals[case.name]
    out = io.StringIO()
    code = doctor.main(argparse.Namespace(config=str(r.config), mode=None, iface=None),
                       stream=out, checks=())
    assert code == 1
    assert f"FAIL  config         {r.stderr.strip()}\n" in out.getvalue()


def test_usable_files_pass_and_a_missing_hmac_key_is_created_later(tmp_path: Path) -> None:
    token, secret = tmp_path / "reader.token", tmp_path / "hook.key"
    token.write_text(TOKEN + "\n")
    secret.write_text("0123456789abcdef\n")
    config = tmp_path / "leaktap.yaml"
    config.write_text(
        f"token_files: {{reader: [{token}]}}\n"
        f"plaintext: {{hmac_secret_file: {tmp_path}/not-yet.key}}\n"
        f"sinks:\n  - {{type: webhook, url: 'https://soc.example/h', secret_file: {secret}}}\n")
    assert load_config(config).token_files.reader == [str(token)]
    out = io.StringIO()
    assert doctor.main(argparse.Namespace(config=str(config), mode=None, iface=None),
                       stream=out, checks=()) == 0
    assert out.getvalue().startswith("ok    config ")


def test_text_alone_is_not_checked_against_the_filesystem() -> None:
    # parse_config validates text (tests, the demo); load_config also checks the files
    config = parse_config("token_files: {reader: [/nonexistent/reader.token]}\n")
    assert config.token_files.reader == ["/nonexistent/reader.token"]
    with pytest.raises(ConfigError, match="<config>:1: token_files.reader.0.: /nonexistent"):
        parse_config("token_files: {reader: [/nonexistent/reader.token]}\n", check_files=True)


@pytest.mark.parametrize(("text", "line", "key"), [
    ("a: 1\nb: 2\na: 3\n", 3, "a"),
    ("tenants:\n  - name: x\n    allow: []\n    name: y\n", 4, "tenants[0].name"),
    ("kernel:\n  flows_max: 1024\n  flows_max: 2048\n", 3, "kernel.flows_max"),
])
def test_duplicated_keys_are_named(text: str, line: int, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "f.yaml")
    assert str(info.value).startswith(f"f.yaml:{line}: {key}: given twice (first at line ")


@pytest.mark.parametrize(("config_text", "says"), [
    ("mode: tc\n", "no API tokens configured and the generated one in {d}/not-a-dir/api-token"
                   " cannot be used: "),
    (HEAD, "opening database {d}/not-a-dir/leaktap.db"),
])
def test_an_unusable_state_directory_is_one_line_too(
        tmp_path: Path, config_text: str, says: str) -> None:
    (tmp_path / "not-a-dir").write_text("")
    config = tmp_path / "leaktap.yaml"
    config.write_text(config_text)
    proc = subprocess.run(
        [sys.executable, "-m", "leaktap.controller.commands.cli", "run", "--config", str(config),
         "--db", str(tmp_path / "not-a-dir" / "leaktap.db")],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("leaktap run: " + says.format(d=tmp_path)), proc.stderr
