"""Connect-time refusal (issue 12.2) on the real kernel: cgroup/connect4 and connect6
programs at the cgroup root refuse a block tenant's connect() to a refused address
with EPERM, let a dry-run tenant's through, report both, leave other cgroups and
addresses alone, and are gone after close (fail open) or replaced after a crash."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaktap.controller.enforcement.connect_guard import (
    ConnectEvent,
    ConnectGuard,
    attached_here,
    remove_stale,
)
from leaktap.controller.enforcement.refusals import kernel_address
from leaktap.controller.kernel.hostfs import find_cgroup2_mount

pytestmark = [pytest.mark.kernel]

REFUSED_V4, OPEN_V4 = "198.18.77.1", "198.18.77.2"
REFUSED_V6, OPEN_V6 = "2001:db8:77::1", "2001:db8:77::2"

# runs in its own network namespace (lo only), as a member of the cgroup given
CLIENT = textwrap.dedent(
    """
    import json, socket, subprocess, sys
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for a in sys.argv[1:]:
        subprocess.run(["ip", "addr", "add", a, "dev", "lo"], check=True)
    servers = []
    for host, fam in (("198.18.77.1", socket.AF_INET), ("198.18.77.2", socket.AF_INET),
                      ("2001:db8:77::1", socket.AF_INET6), ("2001:db8:77::2", socket.AF_INET6)):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.bind((host, 443)); s.listen(); servers.append(s)
    out = {}
    for host in ("198.18.77.1", "198.18.77.2", "2001:db8:77::1", "2001:db8:77::2"):
        try:
            socket.create_connection((host, 443), timeout=2).close()
            out[host] = "connected"
        except OSError as e:
            out[host] = e.__class__.__name__ + ":" + str(e.errno)
    print(json.dumps(out))
    """
)


def _cgroup_root() -> Path:
    root = find_cgroup2_mount()
    assert root is not None, "no cgroup2 mount"
    return root


@pytest.fixture
def cgroups() -> Iterator[dict[str, Path]]:
    root = _cgroup_root()
    made = {name: root / f"lt-cgt-{name}" for name in ("block", "dry", "other")}
    made["block-sub"] = made["block"] / "job"
    for path in made.values():
        path.mkdir(exist_ok=True)
    yield made
    for path in sorted(made.values(), key=lambda p: -len(p.parts)):
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def _run_client(cgroup: Path) -> dict[str, str]:
    addrs = [f"{REFUSED_V4}/32", f"{OPEN_V4}/32", f"{REFUSED_V6}/128", f"{OPEN_V6}/128"]
    # the shell joins the cgroup, then becomes (same pid) the namespaced client
    script = f'echo $$ > {cgroup}/cgroup.procs && exec unshare -n "$0" -c "$@"'
    done = subprocess.run(["sh", "-c", script, sys.executable, CLIENT, *addrs],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout)
    return result


def test_block_refused_dry_run_recorded_others_untouched(cgroups: dict[str, Path]) -> None:
    root = _cgroup_root()
    events: list[ConnectEvent] = []
    lock = threading.Lock()

    def on_event(e: ConnectEvent) -> None:
        with lock:
            events.append(e)

    guard = ConnectGuard(root, on_event)
    guard.load("/sys/fs/bpf/leaktap")
    try:
        guard.attach()
        assert attached_here(root) == 2
        ino = {name: p.stat().st_ino for name, p in cgroups.items()}
        # block-sub is not mapped: it is the block tenant's through its ancestor
        guard.set_tenants({ino["block"]: (1, "block"), ino["dry"]: (2, "dry-run")}, {})
        refused = {}
        for tenant in (1, 2):
            for ip in (REFUSED_V4, REFUSED_V6):
                family, addr = kernel_address(ip)
                refused[(tenant, family, addr)] = 7
        guard.set_refused(refused)
        assert guard.refused_count == 4

        blocked = _run_client(cgroups["block-sub"])
        assert blocked == {REFUSED_V4: "PermissionError:1", OPEN_V4: "connected",
                           REFUSED_V6: "PermissionError:1", OPEN_V6: "connected"}
        dry = _run_client(cgroups["dry"])
        other = _run_client(cgroups["other"])
        for result in (dry, other):
            assert set(result.values()) == {"connected"}
        deadline = time.monotonic() + 2
        while len(events) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        with lock:
            got = sorted((e.tenant, e.mode, e.daddr, e.dport, e.proto, e.rule) for e in events)
        assert got == [
            (1, "block", REFUSED_V4, 443, 6, 7), (1, "block", REFUSED_V6, 443, 6, 7),
            (2, "dry-run", REFUSED_V4, 443, 6, 7), (2, "dry-run", REFUSED_V6, 443, 6, 7),
        ]
        assert {e.cgroup_id for e in events} == {ino["block-sub"], ino["dry"]}
        assert guard.lost() == 0

        # a refusal withdrawn (the address now shared with an allowed instance) lets it through
        guard.set_refused({k: v for k, v in refused.items() if k[0] != 1})
        assert set(_run_client(cgroups["block"]).values()) == {"connected"}
    finally:
        guard.close()
    # fail open: a clean stop leaves no connect program behind
    assert attached_here(root) == 0


def test_programs_left_by_a_crash_are_replaced(cgroups: dict[str, Path]) -> None:
    root = _cgroup_root()
    crashed = ConnectGuard(root, lambda e: None)
    crashed.load("/sys/fs/bpf/leaktap")
    crashed.attach()
    crashed.attached = False  # as if the process died: its programs stay attached
    crashed.close()
    try:
        assert attached_here(root) == 2  # the attachment outlives the process's fds
        fresh = ConnectGuard(root, lambda e: None)
        fresh.load("/sys/fs/bpf/leaktap")
        try:
            fresh.attach()
            assert attached_here(root) == 2  # replaced, not stacked
        finally:
            fresh.close()
        assert attached_here(root) == 0
    finally:
        remove_stale(root)


# one agent run without CAP_SYS_ADMIN (as the unit runs it): refuse REFUSED_V4 to the
# block cgroup or nothing, then crash (os._exit) or stop cleanly
GUARD_RUN = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from leaktap.controller.enforcement.connect_guard import ConnectGuard
    from leaktap.controller.enforcement.refusals import kernel_address
    status = Path("/proc/self/status").read_text()
    cap_eff = int(next(ln for ln in status.splitlines() if ln.startswith("CapEff")).split()[1], 16)
    assert not cap_eff & (1 << 21), "CAP_SYS_ADMIN"
    root, block, pin_root, refuse, end = sys.argv[1:6]
    guard = ConnectGuard(Path(root), lambda e: None)
    guard.load(pin_root)
    guard.set_tenants({Path(block).stat().st_ino: (1, "block")}, {})
    if refuse != "none":
        family, addr = kernel_address(refuse)
        guard.set_refused({(1, family, addr): 7})
    guard.attach()
    if end == "crash":
        os._exit(0)
    guard.close()
    """
)


def test_restarts_without_cap_sys_admin_swap_the_crashed_runs_programs(
        cgroups: dict[str, Path]) -> None:
    import shutil

    root = _cgroup_root()
    pin_root = Path("/sys/fs/bpf/leaktap-test-links")
    shutil.rmtree(pin_root, ignore_errors=True)

    def run(refuse: str, end: str) -> None:
        command = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--",
                   sys.executable, "-c", GUARD_RUN, str(root), str(cgroups["block"]),
                   str(pin_root), refuse, end]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    try:
        run(REFUSED_V4, "crash")
        assert attached_here(root) == 2  # the crashed run's programs, with its policy
        assert _run_client(cgroups["block"])[REFUSED_V4] == "PermissionError:1"
        run("none", "crash")  # the next start swaps its programs in: none stacked
        assert attached_here(root) == 2
        assert _run_client(cgroups["block"])[REFUSED_V4] == "connected"
        assert sorted(p.name.split("-")[0] for p in (pin_root / "links").iterdir()) == [
            "connect4", "connect6"]
        run(REFUSED_V6, "stop")  # a clean stop releases the links: fail open
        assert attached_here(root) == 0
        assert list((pin_root / "links").iterdir()) == []
        assert set(_run_client(cgroups["block"]).values()) == {"connected"}
    finally:
        for pin in (pin_root / "links").glob("*") if (pin_root / "links").exists() else ():
            pin.unlink()
        shutil.rmtree(pin_root, ignore_errors=True)
        remove_stale(root)
