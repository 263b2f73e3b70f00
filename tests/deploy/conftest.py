"""Deployment artefacts are checked with the tools that consume them
(systemd-analyze, promtool, vagrant); scripts/setup.sh installs them.

A missing tool skips the test with the reason outside CI; under CI=true it
is a failure, so a runner without the tool never passes by skipping."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.prerequisites import missing

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    missing(f"{name} not found (Debian package {package}; scripts/setup.sh installs it)")
