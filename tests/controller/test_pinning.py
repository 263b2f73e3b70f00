"""Pinned maps: a restart resumes counting where it left off, and a build
with another map layout never adopts stale maps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from leaktap.controller.errors import ProbeLoadError
from leaktap.controller.kernel import loader, testrun
from leaktap.controller.kernel.maps import MapReader

pytestmark = pytest.mark.kernel

# A private pin root on the real bpffs, so a running agent's pins are untouched.
ROOT = loader.BPFFS / "leaktap-test-pinning"
FRAME = bytes(Ether() / IP(src="198.18.7.1", dst="198.18.7.2")
              / TCP(sport=40001, dport=443, flags="PA") / Raw(b"r" * 100))


@pytest.fixture
def pin_root() -> Path:
    shutil.rmtree(ROOT, ignore_errors=True)
    yield ROOT
    shutil.rmtree(ROOT, ignore_errors=True)


def _options(root: Path, flows_max: int = 1024) -> loader.KernelOptions:
    return loader.KernelOptions(flows_max=flows_max, pin=True, pin_root=str(root))


def test_restart_resumes_undrained_flows_and_totals(pin_root: Path) -> None:
    first = loader.load("tc", _options(pin_root))
    for _ in range(3):
        testrun.run_frame(first.fd("egress"), FRAME)
    totals_before = MapReader(first).totals()[0]
    first.close()  # a crash: nothing drained

    second = loader.load("tc", _options(pin_root))
    try:
        assert second.pin_dir is not None and second.pin_dir.parent == pin_root
        reader = MapReader(second)
        flows = reader.drain_flows()
        assert [(f.key.sport, f.tx_packets, f.tx_bytes) for f in flows] == [
            (40001, 3, 3 * len(FRAME))
        ]
        assert reader.totals()[0] == totals_before == (3 * len(FRAME), 3)
    finally:
        second.close()


def test_other_layout_gets_fresh_maps_and_stale_pins_are_removed(pin_root: Path) -> None:
    first = loader.load("tc", _options(pin_root))
    testrun.run_frame(first.fd("egress"), FRAME)
    old_dir = first.pin_dir
    first.close()
    other = loader.load("tc", _options(pin_root, flows_max=2048))
    try:
        assert other.pin_dir != old_dir
        assert old_dir is not None and not old_dir.exists()
        assert MapReader(other).drain_flows() == []
        assert MapReader(other).totals()[0] == (0, 0)
    finally:
        other.close()


def test_pin_root_off_bpffs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProbeLoadError, match="not on a bpf filesystem"):
        loader.load("tc", _options(tmp_path / "pins"))
