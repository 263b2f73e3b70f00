"""Compile, load, pin and attach leaktap's BPF programs.

The only module that imports bcc (the agent runs it in a short-lived child,
kernel/compile.py, and never maps LLVM itself). BCC rewrites map calls (``lt_flows.lookup``)
only in the main translation unit, so the program files and the headers they
include from bpf/include are expanded into one text here, with ``#line``
markers so that compiler and verifier messages name the original file.

Kernel knobs reach C only as integers (``-DLT_X=%d``). The counting maps
(``LT_TABLE`` in bpf/include/lt_maps.h) are pinned under a directory named by a
digest of the sources and flags; a restart adopts them by path (see adopt_pins).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from leaktap.controller.errors import ProbeLoadError
from leaktap.controller.kernel import abi, pinned
from leaktap.controller.kernel.hostfs import BPF_FS_MAGIC, filesystem_magic
from leaktap.controller.kernel.uprobe_attach import PerfAttachments, remove_stale_events

logger = logging.getLogger(__name__)

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "leaktap"
# under the pin root: the compiler child's transient pins, one directory per load
LOAD_DIR = "loading"  # bpffs refuses names with a dot
# under the pin root: the connect programs' cgroup links (enforcement/cgroup_attach.py)
LINKS_DIR = "links"

# The BPF object for each mode: program files compiled together so they share maps.
MODE_SOURCES = {
    "tc": ("tc_egress.bpf.c", "tc_ingress.bpf.c"),
    "xdp": ("xdp_gateway.bpf.c",),
    # TLS plaintext: uprobes and tracepoints, their own maps and ring buffer (load_ssl);
    # Go crypto/tls's programs use the OpenSSL side's maps and capture path
    "ssl": ("ssl_uprobe.bpf.c", "ssl_go.bpf.c"),
    # connect-time refusal for enforcing tenants (controller/enforcement/connect_guard.py)
    "connect": ("cgroup_connect.bpf.c",),
}
PROGRAMS = {
    "tc": {"egress": "lt_tc_egress", "ingress": "lt_tc_ingress"},
    "xdp": {"ingress": "lt_xdp_gw"},
    "connect": {"connect4": "lt_cg_connect4", "connect6": "lt_cg_connect6"},
}
# cgroup/connect programs are verified for their attach type (enum bpf_attach_type)
CGROUP_ATTACH_TYPES = {"connect4": 10, "connect6": 11}  # BPF_CGROUP_INET{4,6}_CONNECT
# tail programs put in the prog array lt_progs at their index (bpf/include/lt_hello_read.h):
# the hello's server name is read and judged there, outside the egress program's budget
TAIL_PROGRAMS = {"tc": ("lt_tc_hello", "lt_tc_name")}
# clsact parents (TC_H_CLSACT:TC_H_MIN_EGRESS / INGRESS) and our filter slot:
# a fixed priority and handle let a restart find and replace a crashed run's filter.
TC_PARENT = {"egress": 0xFFFFFFF3, "ingress": 0xFFFFFFF2}
TC_PRIO = 0x4C54  # "LT"
TC_HANDLE = 1

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def bpf_dir() -> Path:
    """Where the shipped C sources live (package data of leaktap.bpf)."""
    return Path(str(resources.files("leaktap.bpf")))


def expand_source(files: tuple[str, ...], root: Path | None = None) -> str:
    """Inline our own quoted includes (once each) into one C text."""
    root = root or bpf_dir()
    seen: set[Path] = set()

    def expand(path: Path) -> list[str]:
        out = [f'#line 1 "{path.name}"\n']
        for lineno, line in enumerate(path.read_text().splitlines(keepends=True), 1):
            m = _INCLUDE.match(line)
            if not m:
                out.append(line)
                continue
            inc = root / "include" / m.group(1)
            if not inc.exists():
                inc = root / m.group(1)
            if inc not in seen:
                seen.add(inc)
                out.extend(expand(inc))
            out.append(f'#line {lineno + 1} "{path.name}"\n')
        return out

    text: list[str] = []
    for name in files:
        text.extend(expand(root / name))
        text.append("\n")
    return "".join(text)


# KernelOptions field -> the lt_types.h limit it sets (default and range come from there)
KERNEL_LIMITS = {
    "flows_max": "LT_FLOWS_MAX",
    "cgroups_max": "LT_CGROUPS_MAX",
    "hello_pending_max": "LT_HELLO_PENDING_MAX",
    "ringbuf_pages": "LT_RINGBUF_PAGES",
    "hello_segs_max": "LT_HELLO_SEGS_MAX",
    "events_per_sec": "LT_EVENTS_PER_SEC",
}


@dataclass(frozen=True)
class KernelOptions:
    """Sizes compiled into the programs; see bpf/include/lt_types.h for the rationale."""

    flows_max: int = abi.limit("LT_FLOWS_MAX").default
    cgroups_max: int = abi.limit("LT_CGROUPS_MAX").default
    hello_pending_max: int = abi.limit("LT_HELLO_PENDING_MAX").default
    ringbuf_pages: int = abi.limit("LT_RINGBUF_PAGES").default
    hello_segs_max: int = abi.limit("LT_HELLO_SEGS_MAX").default
    events_per_sec: int = abi.limit("LT_EVENTS_PER_SEC").default
    dedup: bool = False  # mirror ports: count a packet repeated back to back once
    # sample DNS queries and answers whatever the hook's direction (replay: a capture's
    # both directions go through one program); XDP always does
    dns_both_ways: bool = False
    # the ring also carries the single-segment hellos the kernel names (the path before
    # issue 12's naming at line rate: perf/bench_kernel_naming.py compares the two)
    ring_named_hellos: bool = False
    pin: bool = False  # pin the counting maps under <pin_root>/<abi>
    pin_root: str = str(PIN_ROOT)

    def __post_init__(self) -> None:
        for option, name in KERNEL_LIMITS.items():
            problem = abi.limit(name).problem(getattr(self, option))
            if problem is not None:
                raise ProbeLoadError(f"{option} {problem}")

    def cflags(self) -> list[str]:
        return [
            *(f"-D{name}={getattr(self, option):d}" for option, name in KERNEL_LIMITS.items()),
            f"-DLT_DEDUP={int(self.dedup):d}",
            f"-DLT_DNS_BOTH_WAYS={int(self.dns_both_ways):d}",
            f"-DLT_RING_NAMED={int(self.ring_named_hellos):d}",
            f"-DLT_NR_CPUS={_possible_cpus():d}",  # the front cache's regions (lt_fcache.h)
        ]


def _possible_cpus() -> int:
    from leaktap.controller.kernel.pinned import possible_cpus

    return possible_cpus()


def abi_digest(source: str, cflags: list[str]) -> str:
    """Identity of a map layout: pinned maps are reused only by the same build."""
    h = hashlib.sha256(source.encode())
    for flag in cflags:
        h.update(b"\0" + flag.encode())
    return h.hexdigest()[:12]


@dataclass
class Probes:
    """A compiled and loaded BPF object for one mode, with its maps."""

    mode: str
    options: KernelOptions
    bpf: Any
    pin_dir: Path | None
    functions: dict[str, Any] = field(default_factory=dict)
    attach_modes: dict[str, str] = field(default_factory=dict)  # iface -> tc | native | generic

    def table(self, name: str) -> Any:
        return self.bpf[name.encode()]

    def fd(self, direction: str) -> int:
        return int(self.functions[direction].fd)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.bpf.cleanup()


def _bpffs_mounted(path: Path) -> bool:
    try:
        return filesystem_magic(path) == BPF_FS_MAGIC
    except OSError:
        return False


def _prepare_pin_dir(digest: str, root: Path) -> Path:
    """root/<digest>, created; pins of other builds under root are removed."""
    if not _bpffs_mounted(root.parent if not root.exists() else root):
        raise ProbeLoadError(
            f"{root} is not on a bpf filesystem: mount -t bpf bpf {BPFFS} "
            "(scripts/setup.sh does)"
        )
    root.mkdir(exist_ok=True)
    for stale in root.iterdir():
        if stale.name not in (digest, LOAD_DIR, LINKS_DIR):  # LOAD_DIR: loads in progress
            logger.warning(
                "removing pinned maps of another build (%s): their counts since the last "
                "poll are lost",
                stale.name,
            )
            shutil.rmtree(stale, ignore_errors=True)
    pin_dir = root / digest
    resumed = pin_dir.exists() and any(pin_dir.iterdir())
    pin_dir.mkdir(exist_ok=True)
    if resumed:
        logger.info("resuming pinned maps in %s", pin_dir)
    return pin_dir


# a counting map's declaration: LT_TABLE("type", key, value, name, max)
_PINNED_DECLARATION = re.compile(r'^\s*LT_TABLE\(\s*"[^"]*"\s*,[^,]*,[^,]*,\s*(\w+)\s*,', re.M)


def pinned_table_names(source: str) -> list[str]:
    """The maps a source declares with LT_TABLE: the ones pinned across restarts."""
    return _PINNED_DECLARATION.findall(source)


def adopt_pins(bpf: Any, pin_dir: Path, names: list[str]) -> None:
    """Make each of `names` the map pinned at pin_dir/<name>, or pin BCC's new one.

    Runs after BCC created the maps and before any program is loaded: a program
    refers to a map by the fd number its instructions carry, so putting the pinned
    map's fd at that number (dup2) makes every program use the pinned map. This
    opens pins only by path (BPF_OBJ_GET). BCC's own BPF_TABLE_PINNED turns a pin
    into a map id and reopens the id (BPF_MAP_GET_FD_BY_ID), which the kernel keeps
    for CAP_SYS_ADMIN: with it, every restart of an agent without that capability
    failed. A pin whose shape differs (it cannot, short of a hand-made pin: the
    directory is named by the layout's digest) is replaced, with a warning."""
    for name in names:
        fd = int(bpf[name.encode()].map_fd)
        path = pin_dir / name
        if path.exists():
            old = pinned.obj_get(str(path))
            try:
                have, want = pinned.map_info(old), pinned.map_info(fd)
                shape = ("type", "key_size", "value_size", "max_entries", "map_flags")
                differ = [f"{k} {getattr(have, k)} != {getattr(want, k)}" for k in shape
                          if getattr(have, k) != getattr(want, k)]
                if not differ:
                    os.dup2(old, fd, inheritable=False)
                    continue
                logger.warning("pinned map %s does not match this build (%s): replaced, "
                               "its counts since the last poll are lost", path, ", ".join(differ))
                path.unlink()
            finally:
                os.close(old)
        pinned.obj_pin(fd, str(path))


def _bcc() -> Any:
    """BCC's BPF class, or a ProbeLoadError that says how to get it."""
    try:
        from bcc import BPF
    except ImportError as e:
        raise ProbeLoadError(
            "cannot import bcc: install python3-bpfcc and use a venv made with "
            "--system-site-packages (scripts/setup.sh)"
        ) from e
    return BPF


# "in-process" compiles in the calling process (it then maps LLVM: ~120 MB resident)
COMPILE_ENV = "LT_COMPILE"


def load(mode: str = "tc", options: KernelOptions | None = None) -> Probes:
    """Compile and load the programs of `mode`; ProbeLoadError says what failed.

    The compiler runs in a short-lived child (kernel/compile.py) that pins the
    programs and maps; this process reopens them by path and never maps LLVM."""
    options = options or KernelOptions()
    if mode not in PROGRAMS:
        raise ProbeLoadError(f"unknown mode {mode!r}; expected one of {sorted(MODE_SOURCES)}")
    if os.environ.get(COMPILE_ENV) == "in-process":
        return compile_in_process(mode, options)
    from leaktap.controller.kernel.compile import load_in_child

    return load_in_child(mode, options)


def compile_in_process(mode: str, options: KernelOptions) -> Probes:
    """Compile and load with BCC in this process (the compiler child's work)."""
    BPF = _bcc()
    files = MODE_SOURCES[mode]
    try:
        source = expand_source(files)
    except OSError as e:
        raise ProbeLoadError(f"reading BPF sources {files}: {e}") from e
    cflags = options.cflags() + ["-Wno-unused-value"]
    pin_dir = None
    if options.pin:
        pin_dir = _prepare_pin_dir(abi_digest(source, cflags), Path(options.pin_root))
    started = time.monotonic()
    try:
        bpf = BPF(text=source.encode(), cflags=cflags)
    except Exception as e:
        raise ProbeLoadError(
            f"compiling {', '.join(files)}: {e} (see the compiler output above)"
        ) from e
    _release_compiler_heap()
    probes = Probes(mode=mode, options=options, bpf=bpf, pin_dir=pin_dir)
    if pin_dir is not None:
        try:
            adopt_pins(bpf, pin_dir, pinned_table_names(source))
        except ProbeLoadError:
            probes.close()
            raise
    prog_type = {"tc": BPF.SCHED_CLS, "connect": BPF.CGROUP_SOCK_ADDR}.get(mode, BPF.XDP)
    for direction, name in PROGRAMS[mode].items():
        try:
            probes.functions[direction] = bpf.load_func(
                name.encode(), prog_type, attach_type=CGROUP_ATTACH_TYPES.get(direction, -1))
        except Exception as e:
            probes.close()
            raise ProbeLoadError(f"loading {name} from {', '.join(files)}: {e}") from e
    _load_tail_programs(probes, prog_type)
    logger.info("compiled and loaded %s in %.1f s", ", ".join(files), time.monotonic() - started)
    return probes


def _load_tail_programs(probes: Probes, prog_type: int) -> None:
    """Load TAIL_PROGRAMS and put each at its index of lt_progs (the map keeps them)."""
    names = TAIL_PROGRAMS.get(probes.mode, ())
    for index, name in enumerate(names):
        try:
            fn = probes.bpf.load_func(name.encode(), prog_type)
            table = probes.table("lt_progs")
            table[table.Key(index)] = table.Leaf(fn.fd)
        except Exception as e:
            probes.close()
            raise ProbeLoadError(f"loading tail program {name}: {e}") from e


def describe_tables(bpf: Any) -> dict[str, dict[str, Any]]:
    """Every map of a loaded BCC module: type, size, BCC's key/value type descriptions
    (its JSON, from which both BCC and kernel/pinned.py build the ctypes classes) and
    the layouts BCC's classes have, for the compiler child's manifest."""
    import ctypes
    import json

    from bcc.libbcc import lib

    from leaktap.controller.kernel.pinned import layout

    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    out = {}
    for i in range(lib.bpf_num_tables(bpf.module)):
        name = lib.bpf_table_name(bpf.module, i)
        table = bpf[name]
        one_leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU: one CPU's value
        out[name.decode()] = {
            "type": int(table.ttype),
            "max_entries": int(table.max_entries),
            "key_desc": json.loads(lib.bpf_table_key_desc(bpf.module, name).decode()),
            "leaf_desc": json.loads(lib.bpf_table_leaf_desc(bpf.module, name).decode()),
            "key_layout": layout(table.Key),
            "leaf_layout": layout(one_leaf),
            "key_size": ctypes.sizeof(table.Key),
            "value_size": ctypes.sizeof(one_leaf),
            "fd": int(table.map_fd),
        }
    return out


def _release_compiler_heap() -> None:
    """Give clang/LLVM's freed compile-time heap back to the OS (glibc keeps it)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def trial_compile() -> str:
    """Compile and load the TC programs once, for `leaktap doctor`."""
    started = time.monotonic()
    probes = load("tc", KernelOptions(flows_max=1024, cgroups_max=64))
    try:
        elapsed = time.monotonic() - started
        return f"{', '.join(MODE_SOURCES['tc'])} compiled and loaded in {elapsed:.1f} s"
    finally:
        probes.close()


# ---- TC attachment (pyroute2) -------------------------------------------------


def _ifindex(ipr: Any, iface: str) -> int:
    found = ipr.link_lookup(ifname=iface)
    if not found:
        raise ProbeLoadError(f"no such interface: {iface}")
    return int(found[0])


def _our_filters(ipr: Any, index: int, parent: int) -> list[Any]:
    try:
        filters = ipr.get_filters(index=index, parent=parent)
    except Exception:  # noqa: BLE001 - no clsact qdisc: nothing of ours there
        return []
    ours = []
    for f in filters:
        opts = f.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if f.get_attr("TCA_KIND") == "bpf" and name and str(name).split(":")[0].startswith("lt_"):
            ours.append(f)
    return ours


def detach_tc(iface: str) -> int:
    """Remove every leaktap filter from `iface` (also a crashed run's); returns how many."""
    from pyroute2 import IPRoute

    removed = 0
    with IPRoute() as ipr:
        index = _ifindex(ipr, iface)
        for parent in TC_PARENT.values():
            for f in _our_filters(ipr, index, parent):
                try:
                    ipr.tc("del-filter", "bpf", index, f["handle"], parent=parent,
                           prio=f["info"] >> 16)
                    removed += 1
                except Exception as e:  # noqa: BLE001 - keep removing the others
                    logger.error("removing filter %s from %s: %s", f["handle"], iface, e)
        _drop_empty_clsact(ipr, index)
    return removed


def _drop_empty_clsact(ipr: Any, index: int) -> None:
    """Delete the clsact qdisc when no filter of anyone remains on it."""
    for parent in TC_PARENT.values():
        try:
            if ipr.get_filters(index=index, parent=parent):
                return
        except Exception:  # noqa: BLE001
            return
    with contextlib.suppress(Exception):
        ipr.tc("del", "clsact", index)


def attach_tc(
    probes: Probes, iface: str, directions: tuple[str, ...] = ("egress", "ingress")
) -> None:
    """Attach the TC programs to `iface` on a clsact qdisc, replacing stale leaktap filters."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    stale = detach_tc(iface)
    if stale:
        logger.warning("removed %d leaktap filter(s) left on %s by an earlier run", stale, iface)
    with IPRoute() as ipr:
        index = _ifindex(ipr, iface)
        try:
            ipr.tc("add", "clsact", index)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise ProbeLoadError(f"adding a clsact qdisc to {iface}: {e}") from e
        for direction in directions:
            fn = probes.functions[direction]
            try:
                ipr.tc(
                    "add-filter",
                    "bpf",
                    index,
                    TC_HANDLE,
                    fd=fn.fd,
                    name=fn.name.decode() if isinstance(fn.name, bytes) else fn.name,
                    parent=TC_PARENT[direction],
                    prio=TC_PRIO,
                    classid=1,
                    direct_action=True,
                )
            except NetlinkError as e:
                raise ProbeLoadError(f"attaching {direction} filter to {iface}: {e}") from e
    probes.attach_modes[iface] = "tc"
    logger.info("attached %s to %s", "+".join(directions), iface)


# ---- XDP attachment (gateway / mirror-port mode) -------------------------------

XDP_FLAGS_SKB_MODE = 1 << 1  # generic: any driver, after the skb is built
XDP_FLAGS_DRV_MODE = 1 << 2  # native: in the driver, before the skb
_XDP_ATTACHED = {1: "native", 2: "generic", 3: "offload"}


def xdp_program(iface: str) -> tuple[str | None, str | None]:
    """(program name, attach mode) of the XDP program on `iface`, or (None, None)."""
    import json
    import subprocess

    out = subprocess.run(
        ["ip", "-j", "-d", "link", "show", "dev", iface], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise ProbeLoadError(f"no such interface: {iface} ({out.stderr.strip()})")
    xdp = (json.loads(out.stdout) or [{}])[0].get("xdp") or {}
    prog = xdp.get("prog") or {}
    return prog.get("name"), _XDP_ATTACHED.get(xdp.get("mode", 0))


def detach_xdp(iface: str) -> bool:
    """Remove leaktap's XDP program from `iface` (also a crashed run's); never another's."""
    from leaktap.controller.kernel.pinned import libbpf

    name, mode = xdp_program(iface)
    if name is None or not name.startswith("lt_"):
        return False
    flags = XDP_FLAGS_DRV_MODE if mode == "native" else XDP_FLAGS_SKB_MODE
    rc = libbpf().bpf_xdp_detach(_if_index(iface), flags, None)
    if rc < 0:
        raise ProbeLoadError(f"removing XDP from {iface}: {os.strerror(-rc)}")
    return True


def _if_index(iface: str) -> int:
    import socket

    try:
        return socket.if_nametoindex(iface)
    except OSError as e:
        raise ProbeLoadError(f"no such interface: {iface}") from e


def attach_xdp(probes: Probes, iface: str) -> str:
    """Attach the XDP program natively where the driver can, else generic; returns the mode."""
    from leaktap.controller.kernel.pinned import libbpf

    name, _ = xdp_program(iface)
    if name is not None and not name.startswith("lt_"):
        raise ProbeLoadError(
            f"{iface} already runs XDP program {name!r}; leaktap will not replace it"
        )
    if detach_xdp(iface):
        logger.warning("removed a leaktap XDP program left on %s by an earlier run", iface)
    fn = probes.functions["ingress"]
    errors = []
    for flags, mode in ((XDP_FLAGS_DRV_MODE, "native"), (XDP_FLAGS_SKB_MODE, "generic")):
        # libbpf attaches through netlink, like BCC did, from the program's fd
        rc = libbpf().bpf_xdp_attach(_if_index(iface), int(fn.fd), flags, None)
        if rc < 0:
            errors.append(f"{mode}: {os.strerror(-rc)}")
            continue
        probes.attach_modes[iface] = mode
        logger.info("attached XDP to %s in %s mode", iface, mode)
        return mode
    raise ProbeLoadError(f"attaching XDP to {iface}: {'; '.join(errors)}")


@contextlib.contextmanager
def attached(probes: Probes, ifaces: list[str]) -> Iterator[None]:
    """Attach to every interface; detach from all of them on exit, whatever happens."""
    attach, detach = (attach_tc, detach_tc) if probes.mode == "tc" else (attach_xdp, detach_xdp)
    done: list[str] = []
    try:
        for iface in ifaces:
            done.append(iface)
            attach(probes, iface)
        yield
    finally:
        for iface in done:
            try:
                detach(iface)
            except Exception as e:  # noqa: BLE001 - keep detaching the others
                logger.error("detaching from %s: %s", iface, e)
            probes.attach_modes.pop(iface, None)


# ---- TLS plaintext uprobes (ssl_uprobe.bpf.c) ----------------------------------

# symbol -> program: both write entry points (OpenSSL 3 and CPython call the
# _ex form, so hooking SSL_write alone sees nothing of them) and the fd binding
SSL_SYMBOLS = {
    "SSL_write": "lt_ssl_write",
    "SSL_write_ex": "lt_ssl_write_ex",
    "SSL_set_fd": "lt_ssl_set_fd",
    # reads (the from_crm direction): the entry remembers the caller's buffer ...
    "SSL_read": "lt_ssl_read",
    "SSL_read_ex": "lt_ssl_read_ex",
}
# ... and the return probe captures what the call returned
SSL_RETURN_PROBES = {
    "SSL_read": "lt_ssl_read_ret",
    "SSL_read_ex": "lt_ssl_read_ex_ret",
    "SSL_write": "lt_ssl_write_ret",
    "SSL_write_ex": "lt_ssl_write_ex_ret",
}
RETURN_LABEL = ":return"  # a hooked symbol's return probe, in SslProbes.attached
# Go probe label (controller/plaintext/golang.py; before any "@") -> program
GO_PROGRAMS = {
    "go:write": "lt_go_write",
    "go:write_nofd": "lt_go_write_nofd",
    "go:read": "lt_go_read",
    "go:read_ret": "lt_go_read_ret",
}
# SslOptions field -> the lt_types.h limit it sets (default and range come from there)
SSL_LIMITS = {
    "snap_bytes": "LT_SSL_SNAP",
    "ringbuf_pages": "LT_SSL_RINGBUF_PAGES",
    "events_per_sec": "LT_SSL_EVENTS_PER_SEC",
    "procs_max": "LT_SSL_PROCS_MAX",
    "conns_max": "LT_SSL_CONNS_MAX",
    "threads_max": "LT_SSL_THREADS_MAX",
    "chunks_max": "LT_SSL_CHUNKS_MAX",
}


@dataclass(frozen=True)
class SslOptions:
    """Sizes compiled into ssl_uprobe.bpf.c; see bpf/include/lt_types.h (LT_SSL_*)."""

    snap_bytes: int = abi.limit("LT_SSL_SNAP").default  # plaintext.max_bytes
    ringbuf_pages: int = abi.limit("LT_SSL_RINGBUF_PAGES").default
    events_per_sec: int = abi.limit("LT_SSL_EVENTS_PER_SEC").default  # per process
    procs_max: int = abi.limit("LT_SSL_PROCS_MAX").default
    conns_max: int = abi.limit("LT_SSL_CONNS_MAX").default
    threads_max: int = abi.limit("LT_SSL_THREADS_MAX").default
    chunks_max: int = abi.limit("LT_SSL_CHUNKS_MAX").default  # chunks one write may send
    mmap_all: bool = False  # report every process's executable mappings (select: all)
    pin_root: str = str(PIN_ROOT)  # where the compiler child pins them for this process

    def __post_init__(self) -> None:
        for option, name in SSL_LIMITS.items():
            problem = abi.limit(name).problem(getattr(self, option))
            if problem is not None:
                raise ProbeLoadError(f"{option} {problem}")

    def cflags(self) -> list[str]:
        return [
            *(f"-D{name}={getattr(self, option):d}" for option, name in SSL_LIMITS.items()),
            f"-DLT_SSL_MMAP_ALL={int(bool(self.mmap_all))}",
        ]


@dataclass
class SslProbes:
    """The loaded plaintext program set and its uprobe attachments.

    Its tracepoints (send syscalls, exec, exit) attach at load; the uprobes are
    attached per (library, pid), pid -1 meaning every process, as perf events on
    `programs` (kernel/uprobe_attach.py). `bpf` holds the maps: the ones the
    compiler child pinned, reopened (the default), or BCC's module.
    """

    options: SslOptions
    bpf: Any
    programs: dict[str, int]  # function name -> program fd
    perf: PerfAttachments = field(default_factory=PerfAttachments)
    attached: dict[tuple[str, int], tuple[str, ...]] = field(default_factory=dict)
    # library -> {symbol: address}: resolved once (the monitor passes what it read
    # while finding the library; an ELF read costs longer than a fresh curl takes to write)
    addresses: dict[str, dict[str, int]] = field(default_factory=dict)

    def symbols(self, library: str) -> dict[str, int]:
        found = self.addresses.get(library)
        if found is None:
            from leaktap.controller.plaintext.libraries import ElfError, ssl_function_addresses

            try:
                found = ssl_function_addresses(library)
            except (OSError, ElfError) as e:
                raise ProbeLoadError(f"reading the symbols of {library}: {e}") from e
            self.addresses[library] = found
        return found

    def table(self, name: str) -> Any:
        return self.bpf[name.encode()]

    def attach(self, library: str, pid: int = -1) -> tuple[str, ...]:
        """Probe `library` for `pid` (-1: every process); returns the symbols hooked.

        A library without one of the symbols (an old OpenSSL without
        SSL_write_ex) is probed on the others; none at all is an error."""
        if (library, pid) in self.attached:
            return self.attached[library, pid]
        if any(label.startswith("go:") for label in self.addresses.get(library, ())):
            return self._attach_go(library, pid)
        hooked = []
        errors = []
        addresses = self.symbols(library)
        for sym, fn in SSL_SYMBOLS.items():
            if sym not in addresses:
                errors.append(f"{sym}: no such symbol")
                continue
            try:
                self._probe(library, addresses[sym], fn, pid, ret=False)
            except Exception as e:  # noqa: BLE001 - a missing symbol is reported below
                errors.append(f"{sym}: {e}")
                continue
            hooked.append(sym)
            ret = SSL_RETURN_PROBES.get(sym)
            if ret is None:
                continue
            try:
                self._probe(library, addresses[sym], ret, pid, ret=True)
            except Exception as e:  # noqa: BLE001 - an entry without its return is useless
                errors.append(f"{sym} return: {e}")
                self._detach_one(library, hooked.pop(), pid)
                continue
            hooked.append(sym + RETURN_LABEL)
        if not any(s.startswith("SSL_write") for s in hooked):
            for sym in hooked:
                self._detach_one(library, sym, pid)
            raise ProbeLoadError(f"probing {library} for pid {pid}: {'; '.join(errors)}")
        self.attached[library, pid] = tuple(hooked)
        return tuple(hooked)

    def _attach_go(self, binary: str, pid: int) -> tuple[str, ...]:
        """Probe a Go executable at the points golang.py found (label -> address):
        all of them or none (a Read entry without its returns would leak map entries)."""
        hooked: list[str] = []
        for label, addr in self.addresses[binary].items():
            fn = GO_PROGRAMS.get(label.split("@", 1)[0])
            try:
                if fn is None:
                    raise ValueError(f"unknown Go probe label {label}")
                self._probe(binary, addr, fn, pid, ret=False)
            except Exception as e:  # noqa: BLE001 - reported as a load error below
                for done in hooked:
                    self._detach_one(binary, done, pid)
                raise ProbeLoadError(f"probing Go {binary} for pid {pid}: {label}: {e}") from e
            hooked.append(label)
        self.attached[binary, pid] = tuple(hooked)
        return tuple(hooked)

    def _detach_one(self, library: str, sym: str, pid: int) -> None:
        try:
            ret = sym.endswith(RETURN_LABEL)
            addr = self.addresses[library][sym.removesuffix(RETURN_LABEL)]
            self.perf.detach_uprobe(library, addr, pid, ret)
        except Exception as e:  # noqa: BLE001 - the process may be gone; keep going
            logger.debug("detaching %s:%s for pid %d: %s", library, sym, pid, e)

    def program_fd(self, fn: str) -> int:
        """The fd of the loaded program `fn` (a function of ssl_uprobe.bpf.c)."""
        return self.programs[fn]

    def _probe(self, path: str, addr: int, fn: str, pid: int, ret: bool) -> None:
        self.perf.attach_uprobe(self.programs[fn], path, addr, pid, ret)

    def detach(self, library: str, pid: int = -1) -> None:
        for sym in self.attached.pop((library, pid), ()):
            self._detach_one(library, sym, pid)

    def detach_pid(self, pid: int) -> int:
        """Remove every uprobe of `pid`; returns how many libraries it had."""
        libs = [lib for lib, p in self.attached if p == pid]
        for lib in libs:
            self.detach(lib, pid)
        return len(libs)

    def close(self) -> None:
        for library, pid in list(self.attached):
            self.detach(library, pid)
        self.perf.close()
        with contextlib.suppress(Exception):
            self.bpf.cleanup()


def load_ssl(options: SslOptions | None = None) -> SslProbes:
    """Compile and load ssl_uprobe.bpf.c and attach its tracepoints.

    Compiled in the compiler child (kernel/compile.py), which pins the programs
    and maps; this process reopens them and attaches through perf events, and
    never maps LLVM. LT_COMPILE=in-process compiles here with BCC."""
    options = options or SslOptions()
    if os.environ.get(COMPILE_ENV) == "in-process":
        bpf = compile_ssl(options)  # BCC attached its tracepoints
        return SslProbes(options=options, bpf=bpf, programs=ssl_program_fds(bpf))
    from leaktap.controller.kernel.compile import load_ssl_in_child

    remove_stale_events()
    maps, functions = load_ssl_in_child(options)
    probes = SslProbes(options=options, bpf=maps,
                       programs={name: int(fn.fd) for name, fn in functions.items()})
    try:
        for name, fd in probes.programs.items():
            if name.startswith(TRACEPOINT_PREFIX):
                category, _, event = name.removeprefix(TRACEPOINT_PREFIX).partition("__")
                probes.perf.attach_tracepoint(fd, category, event)
    except ProbeLoadError:
        probes.close()
        raise
    return probes


# BCC's name for a TRACEPOINT_PROBE(category, event) function
TRACEPOINT_PREFIX = "tracepoint__"


def compile_ssl(options: SslOptions) -> Any:
    """Compile ssl_uprobe.bpf.c with BCC in this process and load every program
    (BCC attaches the tracepoints); the BCC object."""
    BPF = _bcc()
    files = MODE_SOURCES["ssl"]
    try:
        source = expand_source(files)
    except OSError as e:
        raise ProbeLoadError(f"reading BPF sources {files}: {e}") from e
    started = time.monotonic()
    try:
        bpf = BPF(text=source.encode(), cflags=options.cflags() + ["-Wno-unused-value"])
    except Exception as e:
        raise ProbeLoadError(
            f"compiling {', '.join(files)}: {e} (see the compiler output above)") from e
    # verify the uprobe programs now (the chunk loop takes the verifier a few hundred
    # ms), not at the first attach, where a fresh process would outrun it
    try:
        for fn in ssl_uprobe_programs():
            bpf.load_func(fn.encode(), BPF.KPROBE)
    except Exception as e:
        bpf.cleanup()
        raise ProbeLoadError(f"loading the uprobe programs of {', '.join(files)}: {e}") from e
    logger.info("compiled and loaded %s in %.1f s", ", ".join(files), time.monotonic() - started)
    return bpf


def ssl_uprobe_programs() -> list[str]:
    return sorted({*SSL_SYMBOLS.values(), *SSL_RETURN_PROBES.values(), *GO_PROGRAMS.values()})


def ssl_program_fds(bpf: Any) -> dict[str, int]:
    """Every program of a compiled plaintext object by function name: the uprobe
    programs and the tracepoint programs BCC loaded and attached."""
    BPF = _bcc()
    programs = {fn: int(bpf.load_func(fn.encode(), BPF.KPROBE).fd) for fn in ssl_uprobe_programs()}
    for (category, event) in tracepoints_of(expand_source(MODE_SOURCES["ssl"])):
        fn = f"{TRACEPOINT_PREFIX}{category}__{event}"
        programs[fn] = int(bpf.load_func(fn.encode(), BPF.TRACEPOINT).fd)
    return programs


_TRACEPOINT_PROBE = re.compile(r"^\s*TRACEPOINT_PROBE\(\s*(\w+)\s*,\s*(\w+)\s*\)", re.M)


def tracepoints_of(source: str) -> list[tuple[str, str]]:
    """(category, event) of each TRACEPOINT_PROBE a source defines."""
    return _TRACEPOINT_PROBE.findall(source)
