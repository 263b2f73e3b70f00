"""deploy/prometheus: the rules load (`promtool check rules`), behave as their
unit tests say (`promtool test rules`: a fleet exfiltration pages, a weekly
batch does not), and the scrape and Alertmanager examples are valid configs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, require_tool

PROM = DEPLOY / "prometheus"
RULES = PROM / "leaktap-rules.yml"
UNIT_TESTS = sorted((PROM / "tests").glob("*.yml"))
# the agent's metric families, as controller/api/routes/metrics.py names them
AGENT_METRICS = {
    "leaktap_egress_bytes_total", "leaktap_egress_packets_total",
    "leaktap_unattributed_bytes_total", "leaktap_interface_bytes_total",
    "leaktap_events_dropped_total", "leaktap_alerts_total", "leaktap_sink_deliveries_total",
    "leaktap_outbox_pending", "leaktap_probe_attached", "leaktap_kernel_events_total",
}


def run(*args: str, cwd: Path = PROM, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool", "prometheus")
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    promtool = require_tool("promtool", "prometheus")
    assert {p.name for p in UNIT_TESTS} >= {"fleet_baseline_test.yml", "agent_health_test.yml"}
    result = run(promtool, "test", "rules", *[str(p) for p in UNIT_TESTS])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module", autouse=True)
def without_baseline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[str]]:
    """The fleet unit test against rules whose baseline is a constant 20 kB/s,
    started at once in the background (it takes as long as the real one)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        yield None  # type: ignore[misc]
        return
    root = tmp_path_factory.mktemp("no-baseline")
    (root / "leaktap-rules.yml").write_text(RULES.read_text().replace(
        "> 4 * tenant_vendor_crm_instance:leaktap_egress_bytes:rate5m_how_baseline",
        "> 4 * 20000"))
    (root / "tests").mkdir()
    shutil.copy(PROM / "tests" / "fleet_baseline_test.yml", root / "tests")
    proc = subprocess.Popen([promtool, "test", "rules", "tests/fleet_baseline_test.yml"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_unit_tests_have_teeth(without_baseline: subprocess.Popen[str]) -> None:
    """Without the weekly baseline the batch in week 3 pages: the quiet result
    above comes from the baseline, not from data that never crosses the line."""
    require_tool("promtool", "prometheus")
    out, _ = without_baseline.communicate(timeout=60)
    assert without_baseline.returncode != 0, out
    assert "LeaktapFleetTenantEgressAboveWeeklyBaseline, time: 23d2h40m" in out, out


def test_generated_unit_test_is_current(tmp_path: Path) -> None:
    script = PROM / "tests" / "gen_fleet_baseline_test.py"
    copy = tmp_path / script.name
    shutil.copy(script, copy)
    subprocess.run([sys.executable, str(copy)], check=True, timeout=30)
    assert (tmp_path / "fleet_baseline_test.yml").read_text() == \
        (PROM / "tests" / "fleet_baseline_test.yml").read_text(), \
        "run deploy/prometheus/tests/gen_fleet_baseline_test.py and commit its output"


def test_rules_read_only_metrics_the_agent_exports() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    text = " ".join(r["expr"] for g in groups for r in g["rules"])
    used = {w for w in text.replace("(", " ").replace("{", " ").replace("[", " ").split()
            if w.startswith("leaktap_")}
    assert used <= AGENT_METRICS, used - AGENT_METRICS


def test_scrape_example_is_a_valid_prometheus_config(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "prometheus")
    # promtool stats the token and CA files: point them at stand-ins
    config = (PROM / "scrape.yml").read_text()
    for name in ("leaktap-reader.token", "leaktap-ca.crt"):
        (tmp_path / name).write_text("x" * 32 + "\n")
        config = config.replace(f"/etc/prometheus/{name}", str(tmp_path / name))
    (tmp_path / "scrape.yml").write_text(config)
    shutil.copy(RULES, tmp_path / "leaktap-rules.yml")
    result = run(promtool, "check", "config", "scrape.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    job = yaml.safe_load(config)["scrape_configs"][0]
    assert job["job_name"] == "leaktap"
    assert job["authorization"]["credentials_file"].endswith("leaktap-reader.token")
    relabel = job["metric_relabel_configs"][0]
    assert relabel == {"source_labels": ["exported_instance"], "target_label": "crm_instance"}


def test_alertmanager_example_routes_to_pagerduty_from_key_files() -> None:
    amtool = require_tool("amtool", "prometheus-alertmanager")
    result = run(amtool, "check-config", "alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROM / "alertmanager.yml").read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    (route,) = [r for r in config["route"]["routes"]
                if "LeaktapFleetTenantEgressAboveWeeklyBaseline" in r["matchers"][0]]
    pd = receivers[route["receiver"]]["pagerduty_configs"][0]
    assert pd["routing_key_file"].startswith("/etc/alertmanager/")
    assert "routing_key" not in pd and "service_key" not in pd
