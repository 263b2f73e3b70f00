"""`leaktap demo` end to end: every alert kind it promises fires, it finishes
in under 3 minutes, and it leaves no namespace, link, qdisc or cgroup behind."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leaktap.controller.commands.demo import CRM_IF, CRM_NS, EXPECTED_KINDS, TENANTS
from leaktap.controller.kernel.hostfs import find_cgroup2_mount
from tests.netlab import sh

pytestmark = [pytest.mark.kernel, pytest.mark.netns]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_raises_every_promised_alert_and_cleans_up() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "leaktap.controller.commands.cli", "demo",
         "--port", str(_free_port())],
        capture_output=True, text=True, timeout=240,
    )
    elapsed = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    for kind in EXPECTED_KINDS:
        assert "ALERT" in out and kind in out, f"{kind} missing:\n{out[-3000:]}"
    assert "missing:" not in out
    assert elapsed < 180, f"the demo took {elapsed:.0f} s"

    namespaces = sh("ip", "netns", "list").stdout
    assert CRM_NS not in namespaces
    assert not any(ns in namespaces for ns, *_ in TENANTS.values())
    links = sh("ip", "-o", "link", "show").stdout
    assert CRM_IF not in links and not any(host_if in links for _, host_if, *_ in TENANTS.values())
    mount = find_cgroup2_mount()
    assert mount is not None
    assert not [p.name for p in Path(mount).iterdir() if p.name.startswith("lt-demo-")]
