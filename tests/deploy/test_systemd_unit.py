"""deploy/systemd/leaktap.service: systemd itself accepts it, and it keeps the
capabilities and sandboxing the agent was verified to run under."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, require_tool

UNIT = DEPLOY / "systemd" / "leaktap.service"
EXEC = "/opt/leaktap/.venv/bin/leaktap"
PLAINTEXT = DEPLOY / "systemd" / "plaintext.conf"
ADDRESSES = DEPLOY / "systemd" / "addresses.conf"
CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_RESOURCE"}  # no CAP_SYS_ADMIN
PLAINTEXT_CAPS = {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return directives(UNIT.read_text())


@pytest.fixture
def installable(tmp_path: Path) -> Path:
    """The unit with ExecStart= pointing at a stub: verify checks that the binary
    exists, and /opt/leaktap is the install path, not this checkout."""
    stub = tmp_path / "leaktap"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = tmp_path / "leaktap.service"
    copy.write_text(UNIT.read_text().replace(EXEC, str(stub)))
    return copy


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    tool = require_tool("systemd-analyze", "systemd")
    return subprocess.run([tool, "verify", str(path)], capture_output=True, text=True,
                          timeout=20)


def test_systemd_analyze_verify_passes_without_warnings(installable: Path) -> None:
    result = verify(installable)
    assert result.returncode == 0, result.stderr
    # unknown keys are only warned about ("ignoring"): a warning is a failure here
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


def test_verify_has_teeth(tmp_path: Path, installable: Path) -> None:
    """A misspelt directive is reported, so the clean run above means something."""
    bad = tmp_path / "bad.service"
    bad.write_text(installable.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    result = verify(bad)
    assert "Unknown key" in result.stderr and "NoNewPrivilege" in result.stderr


def test_runs_the_agent_from_the_documented_paths(unit: dict[str, list[str]]) -> None:
    (start,) = unit["ExecStart"]
    assert start.startswith(f"{EXEC} run --config /etc/leaktap/leaktap.yaml")
    assert unit["StateDirectory"] == ["leaktap"]  # /var/lib/leaktap: storage.path default
    assert unit["Restart"] == ["on-failure"]
    assert "TimeoutStopSec" in unit


def test_execstart_options_exist_in_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from leaktap.controller.commands.cli import main; "
         "sys.exit(main(['run', '--help']))"],
        capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout


def test_capabilities_are_bounded_to_what_bpf_needs(unit: dict[str, list[str]]) -> None:
    bounding = set(" ".join(unit["CapabilityBoundingSet"]).split())
    ambient = set(" ".join(unit["AmbientCapabilities"]).split())
    assert bounding == CAPS, bounding ^ CAPS
    assert ambient <= bounding
    assert {"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_SYS_RESOURCE"} <= ambient


@pytest.mark.parametrize("line", [
    "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes",
    "ReadWritePaths=/sys/fs/bpf", "LogsDirectory=leaktap", "LockPersonality=yes",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "SystemCallFilter=@system-service bpf perf_event_open",
])
def test_hardening_line_present(line: str) -> None:
    assert line in UNIT.read_text().splitlines()


def test_module_protection_stays_off(unit: dict[str, list[str]]) -> None:
    # ProtectKernelModules hides /usr/lib/modules: BCC could not find its headers
    assert unit.get("ProtectKernelModules", ["no"]) == ["no"]


def _installed(root: Path, installable: Path, *dropins: Path) -> Path:
    """A root with the unit (and drop-ins) where systemd looks for them."""
    units = root / "etc" / "systemd" / "system"
    (units / "leaktap.service.d").mkdir(parents=True)
    (units / "leaktap.service").write_text(installable.read_text())
    for dropin in dropins:
        (units / "leaktap.service.d" / dropin.name).write_text(dropin.read_text())
    return root


def security(root: Path) -> dict[str, str]:
    """systemd-analyze security of the installed unit: check name -> its line (✓ or ✗
    first, then the finding)."""
    tool = require_tool("systemd-analyze", "systemd")
    out = subprocess.run([tool, "security", "--offline=true", f"--root={root}",
                          "leaktap.service"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr  # no unknown keys
    return {m.group(1): m.group(0) for m in re.finditer(r"^[✓✗] (\S+).*$", out.stdout, re.M)}


def test_plaintext_capabilities_only_with_the_plaintext_dropin(
    tmp_path: Path, installable: Path, unit: dict[str, list[str]]
) -> None:
    assert not PLAINTEXT_CAPS & set(" ".join(unit["CapabilityBoundingSet"]).split())
    base = security(_installed(tmp_path / "base", installable))
    assert base["CapabilityBoundingSet=~CAP_SYS_PTRACE"].startswith("✓")
    dropin = directives(PLAINTEXT.read_text())
    assert set(dropin["CapabilityBoundingSet"][0].split()) == PLAINTEXT_CAPS
    assert set(dropin["AmbientCapabilities"][0].split()) == PLAINTEXT_CAPS
    # uprobes are tracefs events without CAP_SYS_ADMIN: writable despite ProtectKernelTunables
    assert "-/sys/kernel/tracing" in dropin["ReadWritePaths"][0].split()
    inspecting = security(_installed(tmp_path / "plaintext", installable, PLAINTEXT))
    # granted, and only here
    assert inspecting["CapabilityBoundingSet=~CAP_SYS_PTRACE"].startswith("✗")


def test_addresses_are_restricted_to_loopback_unless_allowed(
    tmp_path: Path, installable: Path, unit: dict[str, list[str]]
) -> None:
    assert unit["IPAddressDeny"] == ["any"] and unit["IPAddressAllow"] == ["localhost"]
    # systemd rates an allow list of loopback only as restricted (✗ with a 0.1 weight
    # instead of "no allow list"); the drop-in adds networks, and systemd accepts it
    base = security(_installed(tmp_path / "base", installable))
    assert "only localhost entries" in base["IPAddressDeny="], base["IPAddressDeny="]
    allowed = security(_installed(tmp_path / "addresses", installable, ADDRESSES))
    assert "does not define" not in allowed["IPAddressDeny="]
    assert directives(ADDRESSES.read_text())["IPAddressAllow"]


def test_exposure_score(installable: Path) -> None:
    tool = require_tool("systemd-analyze", "systemd")
    out = subprocess.run([tool, "security", "--offline=true", str(installable)],
                         capture_output=True, text=True, timeout=20)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert m, out.stdout + out.stderr
    assert float(m.group(1)) <= 4.0, out.stdout
