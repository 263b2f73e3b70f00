"""Shared test policy: `kernel` tests need root and BTF.

Outside CI a kernel test that cannot run is skipped with the reason; under
CI=true it fails instead, so a misconfigured runner never passes by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.prerequisites import missing

BTF_PATH = Path("/sys/kernel/btf/vmlinux")


def _kernel_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "kernel test needs root (BPF, tc and bpffs)"
    if not BTF_PATH.exists():
        return f"kernel test needs BTF ({BTF_PATH} is missing)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is None:
        return
    reason = _kernel_unavailable_reason()
    if reason is None:
        return
    missing(reason)
