"""Per-cgroup totals of vanished cgroups, on the real kernel map (issue 17.5): real
cgroup2 directories whose inodes are the ids, lt_cgtot of a loaded program set
updated from user space, the reaper draining and deleting the vanished ones."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaktap.controller.kernel import loader
from leaktap.controller.kernel.cgroups import CgroupAccounting, CgroupReaper, cgroup_ids
from leaktap.controller.kernel.hostfs import find_cgroup2_mount
from leaktap.controller.kernel.maps import MapReader
from leaktap.controller.series import OTHER

pytestmark = pytest.mark.kernel

PIN_ROOT = loader.BPFFS / "leaktap-test-cgreap"


@pytest.fixture
def cgroup_parent() -> Iterator[Path]:
    mount = find_cgroup2_mount()
    assert mount is not None, "no cgroup2 mount"
    parent = mount / "leaktap-test-cgreap"
    yield parent
    for child in parent.glob("cg*"):  # the rest are the cgroup's control files
        if child.is_dir():
            child.rmdir()
    if parent.exists():
        parent.rmdir()


def test_vanished_cgroups_are_drained_and_removed_from_the_pinned_map(
    cgroup_parent: Path,
) -> None:
    shutil.rmtree(PIN_ROOT, ignore_errors=True)
    probes = loader.load("tc", loader.KernelOptions(pin=True, pin_root=str(PIN_ROOT)))
    try:
        cgtot = probes.table("lt_cgtot")
        cgroup_parent.mkdir()
        dirs = [cgroup_parent / f"cg{i}" for i in range(40)]
        for d in dirs:
            d.mkdir()
        ids = [d.stat().st_ino for d in dirs]
        written = 0
        for n, cgid in enumerate(ids):  # what the egress program would have counted
            leaf = cgtot.Leaf()
            for cpu in range(len(leaf)):
                leaf[cpu].bytes, leaf[cpu].packets = 1000 + n, 1
                written += 1000 + n
            cgtot[cgtot.Key(cgid)] = leaf
        for d in dirs[:25]:  # 25 containers exit
            d.rmdir()
        clock = [0.0]
        reaper = CgroupReaper(lambda: cgroup_ids(cgroup_parent.parent), scan_every_s=60,
                              clock=lambda: clock[0])
        accounting = CgroupAccounting(reaper)
        reader = MapReader(probes)
        live = accounting.update(reader.cgroup_totals(), reader.remove_cgroups)
        assert set(live) == set(ids)  # absent from one scan only: kept
        clock[0] = 60.0
        live = accounting.update(reader.cgroup_totals(), reader.remove_cgroups)
        assert set(live) == set(ids[25:]) == set(reader.cgroup_totals())  # gone from the map
        assert reaper.removed == 25
        series = accounting.series()
        assert sum(b for b, _ in series.values()) == written  # every byte accounted
        assert series[OTHER][0] == reaper.retired[0] == sum(
            (1000 + n) * len(cgtot.Leaf()) for n in range(25))
    finally:
        probes.close()
        shutil.rmtree(PIN_ROOT, ignore_errors=True)
