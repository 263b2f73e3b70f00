"""`leaktap doctor` on this real host, and each check aimed at real paths that
are not what the agent needs (a tmp dir that is not a bpffs, a header tree that
does not exist), with no mocking."""

from __future__ import annotations

import ctypes
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from leaktap.controller.commands.doctor import (
    DEFAULT_CHECKS,
    Check,
    CheckResult,
    Status,
    check_bcc,
    check_bpffs,
    check_btf,
    check_cgroup2,
    check_kernel,
    check_kernel_headers,
    check_libssl,
    check_tracefs,
    main,
    run_checks,
)
from leaktap.controller.errors import ProbeLoadError
from tests.prerequisites import missing

CHECK_NAMES = [
    "kernel", "btf", "bpf-syscall", "bcc", "kernel-headers",
    "tracefs", "bpffs", "cgroup-v2", "libssl",
]
ALL_OK_SUMMARY = "summary: 9 ok, 0 warn, 0 FAIL — leaktap can run on this host"

# Excerpts of real /proc/self/mountinfo files: this host (hybrid) and a
# cgroup-v2-only systemd host.
HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 23 0:39 / /sys/fs/bpf rw,relatime - bpf bpf rw
"""
UNIFIED_MOUNTINFO = """\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
28 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
"""
V1_ONLY_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
"""


def with_replaced(original: Check, replacement: Check) -> list[Check]:
    """The default check list with one check aimed elsewhere."""
    return [replacement if check is original else check for check in DEFAULT_CHECKS]


def run_main(checks: list[Check] | tuple[Check, ...] = DEFAULT_CHECKS) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = main(stream=out, checks=checks)
    return code, out.getvalue().splitlines()


def library_path_mapped(soname: str) -> str:
    """Where the dynamic linker really finds `soname`: load it, read our own maps."""
    ctypes.CDLL(soname)
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if os.path.basename(path) == soname:
            return os.path.realpath(path)
    raise AssertionError(f"{soname} loaded but not in /proc/self/maps")


def findmnt_targets(fstype: str) -> list[str]:
    out = subprocess.run(
        ["findmnt", "-n", "-l", "-t", fstype, "-o", "TARGET"],
        capture_output=True, text=True, check=False,
    ).stdout
    return out.split()


def expected_host_lines() -> list[str | re.Pattern[str]]:
    """What doctor must print on a host prepared by scripts/setup.sh, derived
    from the host through other tools than the ones doctor uses."""
    release = os.uname().release
    build = Path("/lib/modules") / release / "build"
    headers = f"{build} -> {os.path.realpath(build)}" if build.is_symlink() else str(build)
    cgroup2 = findmnt_targets("cgroup2")[0]
    hybrid = " (hybrid mode: cgroup v1 controllers also mounted)" if findmnt_targets(
        "cgroup"
    ) else ""
    return [
        f"ok    kernel         {release} (ring buffers need >= 5.8)",
        "ok    btf            present at /sys/kernel/btf/vmlinux",
        "ok    bpf-syscall    created and closed a BPF array map",
        re.compile(r"ok    bcc            BCC \d+\.\d+\.\d+: \S.*"),
        f"ok    kernel-headers {headers}",
        "ok    tracefs        mounted at /sys/kernel/tracing",
        "ok    bpffs          mounted at /sys/fs/bpf",
        f"ok    cgroup-v2      mounted at {cgroup2}{hybrid}",
        re.compile(r"ok    libssl         libssl\.so\.3 at (/\S+)"),
        ALL_OK_SUMMARY,
    ]


def assert_host_report(lines: list[str]) -> None:
    expected = expected_host_lines()
    assert len(lines) == len(expected), "\n".join(lines)
    assert [line[6:21].strip() for line in lines[:-1]] == CHECK_NAMES
    for line, want in zip(lines, expected, strict=True):
        if isinstance(want, str):
            assert line == want
        else:
            assert want.fullmatch(line), f"{line!r} does not match {want.pattern!r}"
    libssl_path = re.fullmatch(r".* at (/\S+)", lines[8])
    assert libssl_path is not None
    assert os.path.realpath(libssl_path[1]) == library_path_mapped("libssl.so.3")


# --- the whole doctor on this host -------------------------------------------


@pytest.mark.kernel
def test_cli_exits_0_with_one_line_per_check() -> None:
    leaktap = Path(sys.executable).with_name("leaktap")
    assert leaktap.exists(), f"{leaktap} missing: run scripts/setup.sh"
    proc = subprocess.run(
        [str(leaktap), "doctor"], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    # the CLI adds the enforcement state (issue 12.5): nothing configured, nothing attached
    enforcement = lines.pop(-2)
    assert re.fullmatch(r"ok    enforcement    off \(every tenant monitors\); no agent running; "
                        r"0 connect program\(s\) on the cgroup root, TC filters on no interface",
                        enforcement), enforcement
    lines[-1] = lines[-1].replace("summary: 10 ok", "summary: 9 ok", 1)
    assert_host_report(lines)


@pytest.mark.kernel
def test_main_in_process_exits_0() -> None:
    code, lines = run_main()
    assert code == 0, "\n".join(lines)
    assert_host_report(lines)


@pytest.mark.kernel
def test_bpffs_check_on_plain_directory_makes_exit_1(tmp_path: Path) -> None:
    code, lines = run_main(with_replaced(check_bpffs, lambda: check_bpffs(tmp_path)))
    assert code == 1
    assert lines[6] == (
        f"FAIL  bpffs          {tmp_path} is not a bpf filesystem"
        f" — fix: mount -t bpf bpf {tmp_path} (or run scripts/setup.sh)"
    )
    assert lines[-1] == (
        "summary: 8 ok, 0 warn, 1 FAIL — leaktap cannot run here: fix the FAIL lines"
    )


@pytest.mark.kernel
def test_missing_libssl_is_a_warning_and_exit_0() -> None:
    code, lines = run_main(with_replaced(check_libssl, lambda: check_libssl("libssl.so.999")))
    assert code == 0
    assert lines[8] == (
        "warn  libssl         libssl.so.999 not found — plaintext inspection unavailable;"
        " fix: apt-get install libssl3"
    )
    assert lines[-1] == "summary: 8 ok, 1 warn, 0 FAIL — leaktap can run on this host"


@pytest.mark.kernel
def test_bpf_syscall_denied_to_unprivileged_user() -> None:
    # With unprivileged BPF disabled (Debian's default), an unprivileged user
    # without capabilities is what a container without CAP_BPF looks like.
    if Path("/proc/sys/kernel/unprivileged_bpf_disabled").read_text().strip() == "0":
        missing("kernel.unprivileged_bpf_disabled=0: unprivileged users may use bpf()")
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) missing"
    proc = subprocess.run(
        [
            setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all",
            sys.executable, "-c",
            "import sys; from leaktap.controller.commands.doctor import check_bpf_syscall as c;"
            " sys.stdout.write(c().line())",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "FAIL  bpf-syscall    bpf(BPF_MAP_CREATE) failed: EPERM (Operation not permitted)"
        " — fix: run as root or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN;"
        " in a container, also allow bpf() in the seccomp profile"
    )


# --- single checks aimed at real paths ---------------------------------------


def test_bpffs_on_plain_directory_fails_with_fix(tmp_path: Path) -> None:
    result = check_bpffs(tmp_path)
    assert result.status is Status.FAIL
    assert result.line() == (
        f"FAIL  bpffs          {tmp_path} is not a bpf filesystem"
        f" — fix: mount -t bpf bpf {tmp_path} (or run scripts/setup.sh)"
    )


def test_bpffs_on_missing_path_fails_with_fix(tmp_path: Path) -> None:
    missing = tmp_path / "bpf"
    assert check_bpffs(missing).line() == (
        f"FAIL  bpffs          {missing} does not exist"
        f" — fix: mount -t bpf bpf {missing} (or run scripts/setup.sh)"
    )


def test_missing_header_tree_names_setup_script(tmp_path: Path) -> None:
    build = tmp_path / "lib/modules/9.9.9/build"
    assert check_kernel_headers(build).line() == (
        f"FAIL  kernel-headers {build}/include does not exist"
        " — fix: run scripts/setup.sh (installs headers for this kernel,"
        " or links Debian's cloud header tree)"
    )


def test_header_tree_symlink_names_its_target(tmp_path: Path) -> None:
    tree = tmp_path / "usr/src/linux-headers-6.1.0-56-cloud-amd64"
    (tree / "include").mkdir(parents=True)
    build = tmp_path / "build"
    build.symlink_to(tree)
    assert check_kernel_headers(build).line() == f"ok    kernel-headers {build} -> {tree}"


def test_missing_libssl_warns_with_fix() -> None:
    result = check_libssl("libssl.so.999")
    assert result.status is Status.WARN
    assert result.line() == (
        "warn  libssl         libssl.so.999 not found — plaintext inspection unavailable;"
        " fix: apt-get install libssl3"
    )


def test_missing_btf_warns_with_fix(tmp_path: Path) -> None:
    btf = tmp_path / "vmlinux"
    assert check_btf(btf).line() == (
        f"warn  btf            {btf} not found — BCC uses the kernel headers instead;"
        " fix: boot a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )


def test_tracefs_absent_warns_with_fix(tmp_path: Path) -> None:
    assert check_tracefs([tmp_path]).line() == (
        f"warn  tracefs        not mounted at {tmp_path}"
        " — uprobes (plaintext inspection) may be unavailable;"
        f" fix: mount -t tracefs tracefs {tmp_path} (or run scripts/setup.sh)"
    )


@pytest.mark.parametrize(
    ("release", "line"),
    [
        ("6.18.44-fc-v657", "ok    kernel         6.18.44-fc-v657 (ring buffers need >= 5.8)"),
        ("5.8.0", "ok    kernel         5.8.0 (ring buffers need >= 5.8)"),
        (
            "5.4.0-150-generic",
            "FAIL  kernel         5.4.0-150-generic is too old (ring buffers need >= 5.8)"
            " — fix: boot a kernel >= 5.8 (Debian 12 ships 6.1)",
        ),
        (
            "weird",
            "FAIL  kernel         cannot parse kernel release 'weird'"
            " — fix: boot a Linux kernel >= 5.8",
        ),
    ],
)
def test_kernel_version(release: str, line: str) -> None:
    assert check_kernel(release).line() == line


@pytest.mark.parametrize(
    ("mountinfo", "line"),
    [
        (
            HYBRID_MOUNTINFO,
            "ok    cgroup-v2      mounted at /sys/fs/cgroup/unified"
            " (hybrid mode: cgroup v1 controllers also mounted)",
        ),
        (UNIFIED_MOUNTINFO, "ok    cgroup-v2      mounted at /sys/fs/cgroup"),
        (
            "41 31 0:38 / /run/cg\\0402 rw - cgroup2 cgroup2 rw\n",
            "ok    cgroup-v2      mounted at /run/cg 2",
        ),
    ],
)
def test_cgroup2_mount_found(tmp_path: Path, mountinfo: str, line: str) -> None:
    path = tmp_path / "mountinfo"
    path.write_text(mountinfo)
    assert check_cgroup2(path).line() == line


def test_cgroup_v1_only_warns_with_fix(tmp_path: Path) -> None:
    path = tmp_path / "mountinfo"
    path.write_text(V1_ONLY_MOUNTINFO)
    assert check_cgroup2(path).line() == (
        f"warn  cgroup-v2      no cgroup2 mount in {path}"
        " — tenant matching by cgroup unavailable;"
        " fix: mount -t cgroup2 none /sys/fs/cgroup/unified"
        " (or boot with systemd.unified_cgroup_hierarchy=1)"
    )


def test_probe_load_error_from_loader_is_fail_with_fix() -> None:
    # The real compile cannot be made to fail without breaking the host, so
    # this stands in for the loader and raises the error its contract names.
    def failing_trial_compile() -> str:
        raise ProbeLoadError("loading tc_egress.bpf.c: 2 errors generated")

    assert check_bcc(failing_trial_compile).line() == (
        "FAIL  bcc            loading tc_egress.bpf.c: 2 errors generated"
        " — fix: check the kernel-headers line; `leaktap -v doctor` shows the compiler log"
    )


def test_crashing_check_is_reported_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def check_widget() -> CheckResult:
        raise ValueError("unexpected")

    results = run_checks([check_widget, lambda: check_kernel("6.1.0")])
    assert [r.line() for r in results] == [
        "FAIL  widget         check crashed: ValueError('unexpected')"
        " — fix: report a bug with the output of `leaktap -v doctor`",
        "ok    kernel         6.1.0 (ring buffers need >= 5.8)",
    ]
    assert "doctor check widget crashed" in caplog.text


@pytest.mark.kernel
def test_xdp_check_reports_native_for_a_veth_and_fails_for_a_missing_interface() -> None:
    import subprocess

    from leaktap.controller.commands.doctor import Status, check_xdp

    subprocess.run(["ip", "link", "add", "lt-doc0", "type", "veth", "peer", "name", "lt-doc1"],
                   check=True)
    try:
        ok = check_xdp("lt-doc0")
        assert (ok.status, ok.detail) == (Status.OK, "driver veth: native XDP")
    finally:
        subprocess.run(["ip", "link", "del", "lt-doc0"], check=True)
    missing = check_xdp("lt-doc0")
    assert missing.status == Status.FAIL and "no interface lt-doc0" in missing.line()
