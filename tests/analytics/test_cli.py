"""`leaktap analyze`: output contract, bad rows, config, and causality under truncation."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from leaktap.analytics.cli import analyze_lines
from leaktap.analytics.incidents import OUTPUT_FIELDS
from leaktap.analytics.settings import DetectionSettings
from leaktap.controller.commands import cli
from leaktap.controller.config import parse_config
from leaktap.controller.errors import ConfigError
from tests.analytics import scenario

MONDAY = scenario.MONDAY


def row(minute: int, instance: str = "acme-prod", out: int = 5000) -> str:
    return json.dumps({"ts": MONDAY + 60 * minute, "tenant": "acme", "crm_vendor": "salesforce",
                       "crm_instance": instance, "bytes_out": out, "bytes_in": 100})


@pytest.fixture(scope="module")
def small() -> tuple[scenario.Scenario, list[str]]:
    scen = scenario.generate(21, n_tenants=4, weeks=3, events_per_kind=1)
    return scen, list(scen.jsonl())


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict]]:
    code = cli.main(args)
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines()]


def test_analyze_prints_one_json_line_per_incident(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "b.jsonl"
    lines = [row(m) for m in range(5)]
    lines[2] = '{"ts": "soon"}'
    lines.insert(4, row(3, instance="rogue"))
    path.write_text("\n".join(lines) + "\n")
    config = tmp_path / "leaktap.yaml"
    config.write_text("tenants:\n  - name: acme\n    allow: ['salesforce:acme-prod']\n")
    with caplog.at_level(logging.WARNING):
        code, incidents = run_cli(
            ["analyze", "--buckets", str(path), "--config", str(config)], capsys)
    assert code == 0
    assert caplog.messages == [
        f"{path}: 1 row(s) skipped: ts: not a number (line(s) 3; "
        "first: ts: expected a number, got 'soon')"]
    assert len(incidents) == 1
    (incident,) = incidents
    assert tuple(incident) == OUTPUT_FIELDS
    assert incident["kind"] == "unsanctioned_destination"
    assert (incident["tenant"], incident["crm_vendor"], incident["crm_instance"]) == (
        "acme", "salesforce", "rogue")
    assert incident["first_ts"] == incident["raised_ts"] == incident["last_ts"] == MONDAY + 180
    assert len(incident["dedup_key"]) == 64


def test_analyze_without_config_has_no_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join([row(0), row(1, instance="rogue")]) + "\n")
    assert run_cli(["analyze", "--buckets", str(path)], capsys) == (0, [])


def test_analyze_missing_file_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["analyze", "--buckets", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: cannot read" in capsys.readouterr().err


def test_detection_settings_come_from_the_config() -> None:
    config = parse_config("detection:\n  warmup_days: 2\n  volume:\n    burst_h: 7.5\n")
    assert config.detection.warmup_days == 2
    assert config.detection.volume.burst_h == 7.5
    assert config.detection.ratio == DetectionSettings().ratio
    with pytest.raises(ConfigError, match=r"<config>:3: detection.volume.burst_hh: unknown key"):
        parse_config("detection:\n  volume:\n    burst_hh: 7\n")
    with pytest.raises(ConfigError, match="drip_windows_minutes has duplicates"):
        parse_config("detection:\n  volume:\n    drip_windows_minutes: [60, 60]\n")
    with pytest.raises(Exception, match="frozen"):
        config.detection.warmup_days = 3  # type: ignore[misc]


def test_incidents_are_causal_under_truncation(small: tuple[scenario.Scenario, list[str]]) -> None:
    """Cut the input right after an incident's raised_ts: the same incident is raised."""
    scen, lines = small
    settings = DetectionSettings()
    full = analyze_lines(lines, settings, out=io.StringIO())
    assert len(full) >= 3
    result = scenario.evaluate(scen, full)
    assert result.missed == []
    picks = {i.kind: i for i in sorted(full, key=lambda i: -i.raised_ts)}  # earliest per kind
    for incident in list(picks.values())[:2]:
        cut = lines[: int(np.searchsorted(scen.ts, incident.raised_ts, side="right"))]
        assert json.loads(cut[-1])["ts"] == incident.raised_ts
        truncated = analyze_lines(cut, settings, out=io.StringIO())
        again = [i for i in truncated if i.dedup_key == incident.dedup_key]
        assert len(again) == 1, incident
        assert (again[0].kind, again[0].first_ts, again[0].raised_ts) == (
            incident.kind, incident.first_ts, incident.raised_ts)
        assert again[0].last_ts <= incident.last_ts
        # and nothing raised later in the full run shows up earlier in the truncated one
        assert {i.dedup_key for i in truncated} <= {i.dedup_key for i in full}


def test_strict_makes_a_bad_row_exit_2_and_null_instances_are_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 11.4: rows with crm_instance/crm_vendor null (what leaktap writes) are read;
    bad rows give one line per reason; --strict turns any into exit 2."""
    path = tmp_path / "b.jsonl"
    shared = json.dumps({"ts": MONDAY, "tenant": "acme", "crm_vendor": "salesforce",
                         "crm_instance": None, "bytes_out": 10, "bytes_in": 0})
    other = json.dumps({"ts": MONDAY, "tenant": "acme", "crm_vendor": None,
                        "crm_instance": None, "bytes_out": 10, "bytes_in": 0})
    path.write_text("\n".join([row(0), shared, other, row(1)]) + "\n")
    assert run_cli(["analyze", "--buckets", str(path), "--strict"], capsys)[0] == 0
    path.write_text("\n".join([row(0), shared, "{", row(1), "{"]) + "\n")
    with caplog.at_level(logging.WARNING):
        assert run_cli(["analyze", "--buckets", str(path)], capsys)[0] == 0
        code = cli.main(["analyze", "--buckets", str(path), "--strict"])
    assert code == 2
    assert "--strict: 2 bad row(s)" in capsys.readouterr().err
    assert caplog.messages[-1].startswith(f"{path}: 2 row(s) skipped: not JSON (line(s) 3, 5;")


def test_export_buckets_writes_what_analyze_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from leaktap.controller.storage import BucketKey, Store, Volume

    db = tmp_path / "lt.db"
    store = Store(db)
    store.write({
        BucketKey(MONDAY, "acme", "salesforce", "acme", "acme.my.salesforce.com"): Volume(5, 1),
        BucketKey(MONDAY, "acme", "salesforce", None, "login.salesforce.com"): Volume(7, 1),
        BucketKey(MONDAY + 60, "acme", None, None, "198.18.9.9"): Volume(9, 1),
    }, [])
    store.close()
    assert cli.main(["export-buckets", "--db", str(db), "--until", str(MONDAY + 120)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = sorted((json.loads(line) for line in lines), key=lambda r: (r["ts"], r["destination"]))
    assert [(r["crm_vendor"], r["crm_instance"], r["bytes_out"]) for r in rows] == [
        ("salesforce", "acme", 5), ("salesforce", None, 7), (None, None, 9)]
    assert cli.main(["export-buckets", "--db", str(tmp_path / "missing.db")]) == 2
