"""`leaktap doctor`: can this host run the agent?

One line per check, in a fixed order, then a summary. FAIL lines are fatal
(exit 1), warn lines disable an optional feature; both carry their fix.

Each check is a small function that takes the paths it inspects as parameters,
defaulting to the real ones, so tests can aim it at a directory that is not a
bpffs or at a header tree that does not exist, without mocking anything.
"""

from __future__ import annotations

import argparse
import ctypes
import enum
import errno
import functools
import importlib.metadata
import logging
import os
import platform
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from leaktap.controller.errors import ProbeLoadError
from leaktap.controller.kernel.hostfs import (
    BPF_FS_MAGIC,
    MOUNTINFO_PATH,
    TRACEFS_MAGIC,
    filesystem_magic,
    find_cgroup2_mount,
    mountinfo_entries,
)
from leaktap.controller.plaintext.libraries import LIBSSL_SONAME, find_shared_library

if TYPE_CHECKING:
    from leaktap.controller.config import LeaktapConfig

logger = logging.getLogger(__name__)

SETUP_SCRIPT = "scripts/setup.sh"

# Ring buffers (BPF_MAP_TYPE_RINGBUF) arrived in 5.8.
MIN_KERNEL = (5, 8)

BTF_PATH = Path("/sys/kernel/btf/vmlinux")
HEADERS_BUILD_DIR = Path("/lib/modules") / os.uname().release / "build"
TRACEFS_PATHS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
BPFFS_PATH = Path("/sys/fs/bpf")

# Filesystem magics from include/uapi/linux/magic.h.

# bpf(2) has no libc wrapper; its number differs per architecture.
BPF_SYSCALL_NR = {"x86_64": 321, "aarch64": 280}
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_ARRAY = 2


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check; `impact` says what a warning disables."""

    name: str
    status: Status
    detail: str
    fix: str = ""
    impact: str = ""

    def line(self) -> str:
        text = self.detail
        if self.impact:
            text += f" — {self.impact}"
        if self.fix:
            text += f"; fix: {self.fix}" if self.impact else f" — fix: {self.fix}"
        return f"{self.status:<6}{self.name:<15}{text}"


Check = Callable[[], CheckResult]


def check_kernel(release: str | None = None) -> CheckResult:
    release = release or os.uname().release
    match = re.match(r"(\d+)\.(\d+)", release)
    need = ".".join(map(str, MIN_KERNEL))
    if match is None:
        return CheckResult(
            "kernel", Status.FAIL, f"cannot parse kernel release {release!r}",
            fix=f"boot a Linux kernel >= {need}",
        )
    if (int(match[1]), int(match[2])) < MIN_KERNEL:
        return CheckResult(
            "kernel", Status.FAIL, f"{release} is too old (ring buffers need >= {need})",
            fix=f"boot a kernel >= {need} (Debian 12 ships 6.1)",
        )
    return CheckResult("kernel", Status.OK, f"{release} (ring buffers need >= {need})")


def check_btf(path: Path = BTF_PATH) -> CheckResult:
    # Our programs compile against the kernel headers, so BTF is only a bonus.
    if path.is_file():
        return CheckResult("btf", Status.OK, f"present at {path}")
    return CheckResult(
        "btf", Status.WARN, f"{path} not found",
        impact="BCC uses the kernel headers instead",
        fix="boot a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    )


def check_bpf_syscall(machine: str | None = None) -> CheckResult:
    """Create and close a one-entry array map, so that missing CAP_BPF or a seccomp
    filter shows up here rather than as a cryptic BCC error later."""
    machine = machine or platform.machine()
    number = BPF_SYSCALL_NR.get(machine)
    if number is None:
        return CheckResult(
            "bpf-syscall", Status.FAIL, f"bpf() syscall number unknown on {machine}",
            fix="run leaktap on x86_64 or aarch64",
        )
    # union bpf_attr for BPF_MAP_CREATE, up to map_name; the kernel zero-fills the rest.
    attr = struct.pack(
        "=IIIIIII16s", BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0, 0, 0, b"lt_doctor"
    )
    attr_buf = ctypes.create_string_buffer(attr, len(attr))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(
        ctypes.c_long(number), ctypes.c_int(BPF_MAP_CREATE), attr_buf, ctypes.c_uint(len(attr))
    )
    if fd < 0:
        err = ctypes.get_errno()
        detail = f"bpf(BPF_MAP_CREATE) failed: {_errno_name(err)} ({os.strerror(err)})"
        if err == errno.ENOSYS:
            fix = "boot a kernel built with CONFIG_BPF_SYSCALL=y"
        else:
            fix = (
                "run as root or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN; "
                "in a container, also allow bpf() in the seccomp profile"
            )
        return CheckResult("bpf-syscall", Status.FAIL, detail, fix=fix)
    os.close(fd)
    return CheckResult("bpf-syscall", Status.OK, "created and closed a BPF array map")


def _errno_name(err: int) -> str:
    return errno.errorcode.get(err, f"errno {err}")


def check_bcc(trial_compile: Callable[[], str] | None = None) -> CheckResult:
    """Compile and load the real TC egress program through the loader."""
    if trial_compile is None:
        try:
            # The loader is the only module that imports bcc.
            from leaktap.controller.kernel import loader
        except ImportError as e:
            if e.name == "bcc":
                return CheckResult(
                    "bcc", Status.FAIL, f"cannot import bcc: {e}",
                    fix="apt-get install python3-bpfcc and use a venv made with "
                    f"--system-site-packages (or run {SETUP_SCRIPT})",
                )
            return CheckResult(
                "bcc", Status.FAIL, f"cannot import the leaktap loader: {e}",
                fix=f"reinstall leaktap (run {SETUP_SCRIPT})",
            )
        trial_compile = loader.trial_compile
    try:
        description = trial_compile()
    except ProbeLoadError as e:
        return CheckResult(
            "bcc", Status.FAIL, str(e),
            fix="check the kernel-headers line; `leaktap -v doctor` shows the compiler log",
        )
    return CheckResult("bcc", Status.OK, f"BCC {_bcc_version()}: {description}")


def _bcc_version() -> str:
    try:
        return importlib.metadata.version("bcc")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def check_kernel_headers(build_dir: Path = HEADERS_BUILD_DIR) -> CheckResult:
    include = build_dir / "include"
    if not include.is_dir():
        return CheckResult(
            "kernel-headers", Status.FAIL, f"{include} does not exist",
            fix=f"run {SETUP_SCRIPT} (installs headers for this kernel, or links "
            "Debian's cloud header tree)",
        )
    if build_dir.is_symlink():
        return CheckResult("kernel-headers", Status.OK, f"{build_dir} -> {build_dir.resolve()}")
    return CheckResult("kernel-headers", Status.OK, f"{build_dir}")


def check_tracefs(paths: Sequence[Path] = TRACEFS_PATHS) -> CheckResult:
    for path in paths:
        try:
            if filesystem_magic(path) == TRACEFS_MAGIC:
                return CheckResult("tracefs", Status.OK, f"mounted at {path}")
        except OSError:
            continue
    return CheckResult(
        "tracefs", Status.WARN, f"not mounted at {' or '.join(map(str, paths))}",
        impact="uprobes (plaintext inspection) may be unavailable",
        fix=f"mount -t tracefs tracefs {paths[0]} (or run {SETUP_SCRIPT})",
    )


def check_bpffs(path: Path = BPFFS_PATH) -> CheckResult:
    # Pinned maps need a real bpffs; a plain directory at that path would let
    # the pin fail only at run time.
    fix = f"mount -t bpf bpf {path} (or run {SETUP_SCRIPT})"
    try:
        magic = filesystem_magic(path)
    except FileNotFoundError:
        return CheckResult("bpffs", Status.FAIL, f"{path} does not exist", fix=fix)
    if magic != BPF_FS_MAGIC:
        return CheckResult("bpffs", Status.FAIL, f"{path} is not a bpf filesystem", fix=fix)
    return CheckResult("bpffs", Status.OK, f"mounted at {path}")


def check_cgroup2(mountinfo: Path = MOUNTINFO_PATH) -> CheckResult:
    # Tenants are matched on cgroup v2 paths, relative to this mount.
    mount = find_cgroup2_mount(mountinfo)
    if mount is None:
        return CheckResult(
            "cgroup-v2", Status.WARN, f"no cgroup2 mount in {mountinfo}",
            impact="tenant matching by cgroup unavailable",
            fix="mount -t cgroup2 none /sys/fs/cgroup/unified "
            "(or boot with systemd.unified_cgroup_hierarchy=1)",
        )
    v1_mounted = any(fstype == "cgroup" for _, fstype in mountinfo_entries(mountinfo))
    mode = " (hybrid mode: cgroup v1 controllers also mounted)" if v1_mounted else ""
    return CheckResult("cgroup-v2", Status.OK, f"mounted at {mount}{mode}")


def check_libssl(soname: str = LIBSSL_SONAME) -> CheckResult:
    path = find_shared_library(soname)
    if path is None:
        return CheckResult(
            "libssl", Status.WARN, f"{soname} not found",
            impact="plaintext inspection unavailable", fix="apt-get install libssl3",
        )
    return CheckResult("libssl", Status.OK, f"{soname} at {path}")


# Drivers with native (in-driver) XDP; on others the agent attaches in generic
# mode, which runs after the skb is built and costs more per packet.
NATIVE_XDP_DRIVERS = frozenset({
    "veth", "virtio_net", "tun", "mlx5_core", "mlx4_en", "i40e", "ice", "ixgbe", "ixgbevf",
    "igb", "igc", "bnxt_en", "ena", "nfp", "qede", "sfc", "thunder-nicvf", "netsec",
    "xen-netfront", "hv_netvsc", "gve", "stmmac", "mvneta", "mvpp2", "cpsw", "fec",
    "netdevsim", "lan966x-switch", "dpaa2-eth", "enetc", "octeontx2-nicvf", "af_xdp",
})


def interface_driver(iface: str, sys_net: Path = Path("/sys/class/net")) -> str | None:
    """The kernel driver behind `iface` (ethtool's "driver:"), None if unknown."""
    link = sys_net / iface / "device" / "driver"
    if link.exists():
        return link.resolve().name
    try:
        out = subprocess.run(["ethtool", "-i", iface], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("driver:"):
            return line.split(":", 1)[1].strip() or None
    return None


def check_xdp(iface: str, sys_net: Path = Path("/sys/class/net")) -> CheckResult:
    """Gateway mode: whether `iface` gets native or generic XDP."""
    name = f"xdp {iface}"
    if not (sys_net / iface).exists():
        return CheckResult(name, Status.FAIL, f"no interface {iface}",
                           fix="name an existing interface with --iface")
    driver = interface_driver(iface, sys_net)
    if driver in NATIVE_XDP_DRIVERS:
        return CheckResult(name, Status.OK, f"driver {driver}: native XDP")
    return CheckResult(
        name, Status.WARN, f"driver {driver or 'unknown'}: generic XDP",
        impact="runs after the skb is built, more CPU per packet",
        fix="use a NIC whose driver supports native XDP for line rate",
    )


def check_plaintext_select(select: object, enabled: bool = True,
                           libssl: Callable[[], str | None] | None = None) -> CheckResult:
    """The cost of plaintext.select: `all` puts a uprobe trap on every process's
    SSL_write (a tight 4 KiB TLS write loop runs at about half speed)."""
    name = "plaintext"
    if not enabled:
        return CheckResult(name, Status.OK, "plaintext inspection disabled")
    path = (libssl or (lambda: find_shared_library(LIBSSL_SONAME)))()
    where = path or LIBSSL_SONAME
    if select == "all":
        return CheckResult(
            name, Status.WARN, f"select: all probes SSL_write in every process mapping {where}",
            impact="every TLS write on this host traps into the kernel (~1-2 us each; a tight "
            "4 KiB write loop runs at about half speed), selected or not",
            fix="select the CRM connectors: plaintext.select: {cgroups, exes, uids}",
        )
    if not select:
        return CheckResult(name, Status.WARN, "plaintext.select matches no process",
                           impact="nothing is inspected",
                           fix="list cgroups, exes or uids under plaintext.select")
    return CheckResult(name, Status.OK, f"per-process probes on {where} for the selected "
                       "processes only")


def _fetch_coverage(url: str, token: str) -> list[dict[str, Any]]:
    import json
    import ssl
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    # the agent's own (often self-signed) certificate on this host: reading only
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    with urllib.request.urlopen(request, timeout=3, context=context) as response:
        processes: list[dict[str, Any]] = json.load(response)["processes"]
    return processes


def check_coverage(url: str, token: str | None,
                   fetch: Callable[[str, str], list[dict[str, Any]]] = _fetch_coverage,
                   ) -> CheckResult:
    """The running agent's plaintext coverage (GET /v1/coverage), in one line: the
    processes that talked to a CRM in the last 24 h, and why some are not inspected."""
    import urllib.error

    from leaktap.controller.plaintext.coverage import REASON_NOT_SELECTED, summarise

    name = "coverage"
    if token is None:
        return CheckResult(name, Status.OK, "not read: the config names no reader token")
    try:
        report = fetch(url, token)
    except urllib.error.HTTPError as e:  # an agent answered, but not with the report
        return CheckResult(name, Status.WARN, f"the agent at {url} answered HTTP {e.code}",
                           impact="coverage not read",
                           fix="tokens.reader must hold a token the running agent accepts")
    except (OSError, ValueError, KeyError) as e:
        return CheckResult(name, Status.OK, f"no running agent answered at {url} ({e})")
    line = summarise(report)
    if all(e["inspected"] for e in report):
        return CheckResult(name, Status.OK, line)
    unselected = any(e["reason"] == REASON_NOT_SELECTED for e in report)
    return CheckResult(
        name, Status.WARN, line, impact="their TLS plaintext is not inspected",
        fix="add them to plaintext.select" if unselected else
        "GET /v1/coverage gives each process's reason")


DEFAULT_CHECKS: tuple[Check, ...] = (
    check_kernel,
    check_btf,
    check_bpf_syscall,
    check_bcc,
    check_kernel_headers,
    check_tracefs,
    check_bpffs,
    check_cgroup2,
    check_libssl,
)


def check_enforcement(config: LeaktapConfig | None, state: object = None,
                      running: dict[str, Any] | None = None,
                      unenforceable: list[str] | None = None) -> CheckResult:
    """Enforcement as configured (off / dry-run tenants / block tenants) and as the
    kernel holds it: programs attached with no agent running are a crashed run's and
    keep its last policy until the next start. `running`: the agent's own account
    (`enforcement` of its /readyz), when it answers; `unenforceable`: the catalogue
    rules the kernel cannot recognise (None: compiled from the config here)."""
    from leaktap.controller.enforcement.host_state import HostEnforcement, host_enforcement

    name = "enforcement"
    host = state if isinstance(state, HostEnforcement) else host_enforcement(
        find_cgroup2_mount())
    modes = {t.name: t.enforce for t in config.tenants} if config is not None else {}
    block = sorted(t for t, m in modes.items() if m == "block")
    dry = sorted(t for t, m in modes.items() if m == "dry-run")
    configured = (f"block: {', '.join(block) or '-'}; dry-run: {', '.join(dry) or '-'}"
                  if block or dry else "off (every tenant monitors)")
    kernel = (f"{host.connect_programs} connect program(s) on the cgroup root, "
              f"TC filters on {', '.join(host.tc_interfaces) or 'no interface'}")
    attached = host.connect_programs > 0 or bool(host.tc_interfaces)
    if attached and not host.agent_pids:
        return CheckResult(
            name, Status.WARN, f"no agent runs but {kernel}",
            impact="a crashed run's programs keep enforcing its last policy (and counting)",
            fix="start leaktap (it replaces them); stopping it cleanly removes them (fail open)",
        )
    if unenforceable is None:
        unenforceable = _unenforceable(config) if config is not None and (block or dry) else []
    agent = f"agent pid {', '.join(map(str, host.agent_pids))}" if host.agent_pids else \
        "no agent running"
    if running is not None:
        loaded = running.get("policy_loaded_at")
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(loaded)) if loaded else "-"
        agent += (f" (its policy: block {', '.join(running.get('block_tenants', [])) or '-'}, "
                  f"dry-run {', '.join(running.get('dry_run_tenants', [])) or '-'}, loaded {when})")
        if (sorted(running.get("block_tenants", [])), sorted(
                running.get("dry_run_tenants", []))) != (block, dry):
            return CheckResult(
                name, Status.WARN, f"{configured} in the file; {agent}",
                impact="the running agent enforces another policy than the file",
                fix="reload it: POST /v1/config/reload (admin) or kill -HUP the agent")
    if unenforceable:
        return CheckResult(
            name, Status.WARN, f"{configured}; {agent}; {len(unenforceable)} catalogue "
            f"rule(s) the kernel cannot recognise: {', '.join(unenforceable)}",
            impact="a hello naming a host only they match passes the kernel; its address is "
            "still refused at connect once DNS names it",
            fix="add host-pattern catalogue entries for the instances to block "
            "(GET /readyz lists the rules)",
        )
    return CheckResult(name, Status.OK, f"{configured}; {agent}; {kernel}")


def _running_enforcement(config: LeaktapConfig) -> dict[str, Any] | None:
    """The running agent's enforcement state from its /readyz, or None."""
    import json
    import ssl
    import urllib.request

    token = next(iter(config.tokens.reader), None) or next(iter(config.tokens.admin), None)
    if token is None:
        return None
    url = coverage_url(config).removesuffix("/v1/coverage") + "/readyz"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=3, context=context) as response:
            state = json.load(response).get("enforcement")
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _unenforceable(config: LeaktapConfig) -> list[str]:
    from leaktap.controller.attribution.catalogue import CrmCatalogue
    from leaktap.controller.enforcement.kernel_policy import KernelPolicy

    try:
        policy = KernelPolicy.from_config(config, CrmCatalogue(config.catalogue))
    except NotImplementedError:
        return []
    return [f"{r.vendor} ({r.source})" for r in policy.unenforceable_rules]


def run_checks(checks: Sequence[Check] = DEFAULT_CHECKS) -> list[CheckResult]:
    results = []
    for check in checks:
        try:
            results.append(check())
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            name = _check_name(check)
            logger.warning("doctor check %s crashed", name, exc_info=True)
            results.append(CheckResult(
                name, Status.FAIL, f"check crashed: {e!r}",
                fix="report a bug with the output of `leaktap -v doctor`",
            ))
    return results


def _check_name(check: Check) -> str:
    func = check.func if isinstance(check, functools.partial) else check
    return getattr(func, "__name__", "check").removeprefix("check_").replace("_", "-")


def write_report(results: Sequence[CheckResult], stream: TextIO) -> int:
    """Write one line per result and a summary; return the exit code."""
    for result in results:
        stream.write(result.line() + "\n")
    counts = {status: sum(r.status is status for r in results) for status in Status}
    verdict = (
        "leaktap cannot run here: fix the FAIL lines"
        if counts[Status.FAIL] else "leaktap can run on this host"
    )
    stream.write(
        f"summary: {counts[Status.OK]} ok, {counts[Status.WARN]} warn, "
        f"{counts[Status.FAIL]} FAIL — {verdict}\n"
    )
    return 1 if counts[Status.FAIL] else 0


def main(
    args: argparse.Namespace | None = None,
    *,
    stream: TextIO | None = None,
    checks: Sequence[Check] = DEFAULT_CHECKS,
) -> int:
    if args is not None and getattr(args, "mode", None) == "xdp":
        ifaces = getattr(args, "iface", None) or []
        checks = (*checks, *(functools.partial(check_xdp, i) for i in ifaces))
    results = run_checks(checks)
    config: LeaktapConfig | None = None
    if args is not None and getattr(args, "config", None):
        config, config_results = check_config(args.config)
        results.extend(config_results)
        if config is not None:
            pt = config.plaintext
            select = pt.select if pt.select == "all" else any(
                (pt.select.cgroups, pt.select.exes, pt.select.uids))
            results.extend(run_checks([
                functools.partial(check_plaintext_select, select, pt.enabled)]))
            results.extend(run_checks([functools.partial(
                check_coverage, coverage_url(config), next(iter(config.tokens.reader), None))]))
    if args is not None:  # the CLI: what the kernel holds, and the config's modes
        running = _running_enforcement(config) if config is not None else None
        results.extend(run_checks([functools.partial(check_enforcement, config, None,
                                                     running)]))
    return write_report(results, stream or sys.stdout)


def coverage_url(config: LeaktapConfig) -> str:
    """Where the configured agent serves GET /v1/coverage (this host)."""
    from leaktap.controller.config import parse_listen

    host, port = parse_listen(config.listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    scheme = "https" if config.tls is not None else "http"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/v1/coverage"


def check_config(path: str) -> tuple[LeaktapConfig | None, list[CheckResult]]:
    """The configuration as `leaktap run` loads it (files it names included): the
    loaded config and an ok line, or None and one FAIL line per problem, each the
    `FILE:LINE: key: what is wrong` that `run` would stop with."""
    from leaktap.controller.config import load_config
    from leaktap.controller.errors import ConfigError

    try:
        config = load_config(path)
    except ConfigError as e:
        return None, [CheckResult("config", Status.FAIL, line) for line in str(e).splitlines()]
    return config, [CheckResult("config", Status.OK, f"{path}: valid, the files it names usable")]
