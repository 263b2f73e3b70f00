"""Compilation in a short-lived child (issue 16.5): the agent reopens pinned
programs and maps by path and never maps LLVM; a failed or stuck compile is
one line, exit 2, and leaves nothing pinned that breaks the next start."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from leaktap.controller.errors import ProbeLoadError
from leaktap.controller.kernel import compile as child
from leaktap.controller.kernel import loader, pinned, testrun
from leaktap.controller.kernel.maps import MapReader
from tests.netlab import veth_lab

pytestmark = pytest.mark.kernel

ROOT = loader.BPFFS / "leaktap-test-child"
COUNTING_MAPS = {"lt_flows", "lt_cgtot", "lt_totals", "lt_stats", "lt_hello",
                 # the front cache of established flows and the volume drained from it
                 "lt_fcache", "lt_fgen", "lt_cgdrained",
                 # the tail-call array: pinned so that the tail programs outlive the
                 # compile child (a prog array is emptied when its last user reference goes)
                 "lt_progs"}
TOKEN = "reader-token-0123456789"
FRAME = bytes(Ether() / IP(src="198.18.21.9", dst="198.18.21.10")
              / TCP(sport=40005, dport=443, flags="PA") / Raw(b"c" * 60))


@pytest.fixture
def pin_root() -> Iterator[Path]:
    shutil.rmtree(ROOT, ignore_errors=True)
    yield ROOT
    shutil.rmtree(ROOT, ignore_errors=True)


def _compiler_mappings(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split()[-1] for line in text.splitlines()
                   if re.search(r"libbcc\.so|llvm|clang", line, re.IGNORECASE)})


def _fd_map_types(pid: int) -> list[int]:
    """BPF map types of the maps `pid` holds an fd of (from /proc/<pid>/fdinfo)."""
    types = []
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            m = re.search(r"^map_type:\s+(\d+)", info.read_text(), re.MULTILINE)
        except OSError:
            continue
        if m:
            types.append(int(m.group(1)))
    return types


def _ready_state(port: int) -> dict[str, Any] | None:
    """The agent's /readyz answer, or None while it does not answer 200."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/readyz",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            state: dict[str, Any] = json.loads(resp.read())
            return state
    except (OSError, urllib.error.HTTPError, ValueError):
        return None


def _ready(port: int) -> bool:
    return _ready_state(port) is not None


def _config(tmp_path: Path, iface: str, port: int, root: Path) -> Path:
    cfg = tmp_path / "leaktap.yaml"
    cfg.write_text(f"interfaces: [{iface}]\nlisten: 127.0.0.1:{port}\n"
                   f"tokens: {{reader: [{TOKEN}]}}\nstorage: {{path: {tmp_path}/lt.db}}\n"
                   f"kernel: {{pin_root: {root}}}\n")
    return cfg


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_running_agent_never_maps_the_compiler(tmp_path: Path, pin_root: Path) -> None:
    port = _free_port()
    with veth_lab("lt-c5", "198.18.21.1", "198.18.21.2") as lab:
        cfg = _config(tmp_path, lab.host_if, port, pin_root)
        # plaintext inspection too: its programs are compiled in the child as well
        cfg.write_text(cfg.read_text() + "plaintext: {enabled: true, select: {exes: ['*/curl']}}\n")
        proc = subprocess.Popen(
            [sys.executable, "-m", "leaktap.controller.commands.cli", "run", "--config", str(cfg)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not _ready(port):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "agent not ready within 60 s"
                time.sleep(0.2)
            mapped = _compiler_mappings(proc.pid)
            map_types = _fd_map_types(proc.pid)
            (pin_dir,) = [d for d in pin_root.iterdir()]
            pinned_names = {p.name for p in pin_dir.iterdir()}
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
    # no libbcc, libLLVM or libclang-cpp in the resident agent (libbcc_bpf, the perf-event
    # half that attaches the plaintext uprobes, links none of them)
    assert mapped == []
    # the flow events' ring and the plaintext one, reopened by path
    assert map_types.count(pinned.MAP_RINGBUF) == 2 and pinned.MAP_LRU_PERCPU_HASH in map_types
    # only the counting maps stay pinned; the load directory is gone
    assert pinned_names == COUNTING_MAPS
    assert rc == 0, proc.stderr.read() if proc.stderr else ""


def test_load_imports_no_bcc_and_counts_through_reopened_maps(pin_root: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        from leaktap.controller.kernel import loader, testrun
        from leaktap.controller.kernel.maps import MapReader
        p = loader.load("tc", loader.KernelOptions(flows_max=1024, pin=True,
                                                   pin_root="{pin_root}"))
        testrun.run_frame(p.fd("egress"), bytes.fromhex(sys.argv[1]))
        flows = MapReader(p).drain_flows()
        print(len(flows), flows[0].key.sport, flows[0].tx_bytes, "bcc" in sys.modules)
        p.close()
    """)
    out = subprocess.run([sys.executable, "-c", script, FRAME.hex()], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "40005", str(len(FRAME)), "False"]
    assert not (pin_root / loader.LOAD_DIR).exists()


def _broken_sources(tmp_path: Path) -> Path:
    broken = tmp_path / "bpf"
    shutil.copytree(loader.bpf_dir(), broken)
    with open(broken / "tc_egress.bpf.c", "a") as f:
        f.write("this is not C;\n")
    return broken


def _child_reading(sources: Path) -> list[str]:
    """The compiler child, reading its C sources from `sources`."""
    return [sys.executable, "-c",
            "import sys; from pathlib import Path; from leaktap.controller.kernel import loader; "
            f"loader.bpf_dir = lambda: Path({str(sources)!r}); "
            "from leaktap.controller.kernel.compile import main; sys.exit(main())"]


def test_compile_error_is_one_line_exit_2_and_the_next_start_works(
    tmp_path: Path, pin_root: Path
) -> None:
    cfg = _config(tmp_path, "lo", _free_port(), pin_root)
    script = (f"import sys; from leaktap.controller.kernel import compile as c; "
              f"c.CHILD_COMMAND = {_child_reading(_broken_sources(tmp_path))!r}; "
              "from leaktap.controller.commands.cli import main; "
              f"sys.exit(main(['run', '--config', {str(cfg)!r}]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"leaktap run: compiling tc_egress\.bpf\.c, tc_ingress\.bpf\.c: .*"
                        r"first: tc_egress\.bpf\.c:\d+:\d+: error: unknown type name 'this'",
                        last), out.stderr
    assert "Traceback" not in out.stderr
    assert not (pin_root / loader.LOAD_DIR).exists()
    probes = loader.load("tc", loader.KernelOptions(flows_max=1024, pin=True,
                                                    pin_root=str(pin_root)))
    try:
        testrun.run_frame(probes.fd("egress"), FRAME)
        assert [f.tx_packets for f in MapReader(probes).drain_flows()] == [1]
    finally:
        probes.close()


def test_stuck_child_is_killed_and_leaves_no_load_directory(
    pin_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    orphan = pin_root / loader.LOAD_DIR / "4194304-dead"  # above any pid_max: its owner is gone
    orphan.mkdir(parents=True)
    options = loader.KernelOptions(flows_max=1024, pin=True, pin_root=str(pin_root))
    with monkeypatch.context() as m:
        m.setattr(child, "CHILD_COMMAND", [sys.executable, "-c", "import time; time.sleep(60)"])
        m.setattr(child, "COMPILE_TIMEOUT_S", 1.0)
        started = time.monotonic()
        with pytest.raises(ProbeLoadError,
                           match=r"no result within 1 s \(LT_COMPILE_TIMEOUT_S\)"):
            loader.load("tc", options)
        assert time.monotonic() - started < 30  # killed, not waited for
    assert [p.name for p in (pin_root / loader.LOAD_DIR).iterdir()] == ["4194304-dead"]
    probes = loader.load("tc", options)
    probes.close()
    assert not (pin_root / loader.LOAD_DIR).exists()  # the orphan was removed with it


def test_a_manifest_that_does_not_match_the_pinned_map_is_refused(pin_root: Path) -> None:
    options = loader.KernelOptions(flows_max=1024, pin_root=str(pin_root))
    load_dir = child.load_dir_for(options)
    request = {"mode": "tc", "options": {**options.__dict__}, "load_dir": str(load_dir)}
    out = subprocess.run(child.CHILD_COMMAND, input=json.dumps(request), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    flows = manifest["maps"]["lt_flows"]
    assert {f[0] for f in flows["key_layout"]} >= {"cgroup_id", "saddr", "daddr", "sport"}
    tampered = json.loads(out.stdout)
    tampered["maps"]["lt_flows"]["key_layout"][0][1] += 4
    with pytest.raises(ProbeLoadError, match="pinned map lt_flows .*field layout differs"):
        child.open_manifest("tc", options, tampered)
    probes = child.open_manifest("tc", options, manifest)
    shutil.rmtree(load_dir)
    try:
        flows_table = probes.table("lt_flows")
        assert flows_table.max_entries == 1024
        assert len(flows_table.Leaf()) == pinned.possible_cpus()
    finally:
        probes.close()


def test_possible_cpus_counts_ranges_and_singles(tmp_path: Path) -> None:
    f = tmp_path / "possible"
    f.write_text("0-3,5,8-9\n")
    assert pinned.possible_cpus(str(f)) == 7


def _unit_capabilities() -> list[str]:
    """The capability set deploy/systemd/leaktap.service grants, as setpriv names them."""
    unit = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "leaktap.service"
    line = next(ln for ln in unit.read_text().splitlines()
                if ln.startswith("CapabilityBoundingSet="))
    return [c.removeprefix("CAP_").lower() for c in line.split("=", 1)[1].split()]


def test_the_units_capabilities_start_and_restart_an_enforcing_agent(
        tmp_path: Path, pin_root: Path) -> None:
    """Exactly the unit's capabilities (no CAP_SYS_ADMIN): a first start, a restart
    after a crash (pinned maps and the connect programs' links reopened by path) and
    a clean stop, with a block-mode tenant."""
    from leaktap.controller.enforcement.connect_guard import attached_here, remove_stale
    from leaktap.controller.kernel.hostfs import find_cgroup2_mount

    caps = _unit_capabilities()
    assert "sys_admin" not in caps and "bpf" in caps
    bounding = "-all," + ",".join(f"+{c}" for c in caps)
    mount = find_cgroup2_mount()
    assert mount is not None
    port = _free_port()
    with veth_lab("lt-c6", "198.18.21.5", "198.18.21.6") as lab:
        cfg = _config(tmp_path, lab.host_if, port, pin_root)
        cfg.write_text(cfg.read_text() + textwrap.dedent("""\
            tenants:
              - name: blk
                match: {cgroup: "/lt-capt-blk*"}
                allow: ["salesforce:acme"]
                enforce: block
            """))
        command = ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--",
                   sys.executable, "-m", "leaktap.controller.commands.cli", "run",
                   "--config", str(cfg)]
        logs = ""
        try:
            for run in ("first", "after a crash"):
                proc = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
                deadline = time.monotonic() + 90
                while not ((s := _ready_state(port)) and s["enforcement"]["connect_refusal"]):
                    assert proc.poll() is None, f"{run}: " + (
                        proc.stderr.read() if proc.stderr else "")
                    assert time.monotonic() < deadline, f"{run}: not ready within 90 s"
                    time.sleep(0.2)
                assert attached_here(mount) == 2, run  # swapped in, not stacked
                if run == "first":
                    proc.kill()
                    proc.wait(timeout=10)
                    assert attached_here(mount) == 2  # still enforcing the last policy
                    logs = proc.stderr.read() if proc.stderr else ""
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
            logs += proc.stderr.read() if proc.stderr else ""
            assert rc == 0, logs
            # nothing degraded quietly for want of a capability
            assert not re.search(r"not permitted|EPERM|EACCES|denied", logs), logs
            assert attached_here(mount) == 0  # a clean stop fails open
            (pin_dir,) = [d for d in pin_root.iterdir() if d.name != loader.LINKS_DIR]
            assert {p.name for p in pin_dir.iterdir()} == COUNTING_MAPS
        finally:
            remove_stale(mount)
