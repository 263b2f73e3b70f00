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


_RESTART_SCRIPT = f"""
import sys
from pathlib import Path
from leaktap.controller.kernel import loader, testrun
from leaktap.controller.kernel.maps import MapReader
caps = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("CapEff")]
assert not int(caps[0].split()[1], 16) & (1 << 21), caps  # CAP_SYS_ADMIN is bit 21
probes = loader.load("tc", loader.KernelOptions(flows_max=1024, pin=True,
                                                pin_root=sys.argv[1]))
for _ in range(2):
    testrun.run_frame(probes.fd("egress"), {FRAME!r})
print(MapReader(probes).totals()[0][1])
probes.close()
"""


def test_restart_without_cap_sys_admin_adopts_the_pins(pin_root: Path) -> None:
    """The unit runs without CAP_SYS_ADMIN: a restart must reopen its pins by path.
    (BCC's own pinned tables reopened them by map id, which needs that capability:
    the first start worked and every restart failed with EPERM.)"""
    import subprocess
    import sys

    command = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--",
               sys.executable, "-c", _RESTART_SCRIPT, str(pin_root)]
    packets = []
    for _ in range(3):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        packets.append(int(done.stdout.split()[-1]))
    assert packets == [2, 4, 6]


def test_a_pin_of_another_shape_is_replaced_and_the_rest_resumed(
        pin_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    import ctypes
    import os

    from leaktap.controller.kernel import pinned

    first = loader.load("tc", _options(pin_root))
    testrun.run_frame(first.fd("egress"), FRAME)
    pin_dir = first.pin_dir
    first.close()
    assert pin_dir is not None
    lib = pinned.libbpf()
    lib.bpf_map_create.restype = ctypes.c_int
    lib.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32,
                                   ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]
    fd = lib.bpf_map_create(2, b"hand_made", 4, 8, 3, None)  # BPF_MAP_TYPE_ARRAY, 3 entries
    assert fd >= 0
    (pin_dir / "lt_stats").unlink()
    pinned.obj_pin(fd, str(pin_dir / "lt_stats"))
    os.close(fd)

    second = loader.load("tc", _options(pin_root))
    try:
        assert "lt_stats does not match this build" in caplog.text
        assert "type 2 != 6" in caplog.text and "max_entries 3 != " in caplog.text
        fresh = pinned.obj_get(str(pin_dir / "lt_stats"))
        assert pinned.map_info(fresh).max_entries > 3
        os.close(fresh)
        assert MapReader(second).totals()[0] == (len(FRAME), 1)  # the rest resumed
    finally:
        second.close()
