"""Compilation in a short-lived child: the resident agent never maps LLVM.

``load_in_child`` runs ``python -m leaktap.controller.kernel.compile`` with a
JSON request on stdin. The child compiles and loads the programs with BCC
exactly as an in-process load does (same sources, cflags, ABI digest and pin
directory: the counting maps are pinned there by BCC), pins every other map
and the programs into a private load directory on the bpffs, prints a manifest
(map -> pin path, sizes and BCC's type descriptions; program -> pin path) on
stdout and exits. The parent reopens everything by path with libbpf, checks
each map against the manifest, and removes the load directory: from then on
its fds keep the programs and transient maps alive, and only the counting
maps stay pinned for the next start. The plaintext programs (mode "ssl") go the
same way, none of their maps persisting; kernel/uprobe_attach.py attaches them.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from leaktap.controller.errors import ProbeLoadError
from leaktap.controller.kernel import loader, pinned

logger = logging.getLogger(__name__)

# a compile takes seconds; a child stuck this long is killed and reported
COMPILE_TIMEOUT_S = float(os.environ.get("LT_COMPILE_TIMEOUT_S", "180"))
# load directories under the pin root: "<parent pid>-<nonce>", one per load
LOAD_DIR = loader.LOAD_DIR
_ERROR = "leaktap-compile: error: "
CHILD_COMMAND = [sys.executable, "-m", "leaktap.controller.kernel.compile"]
_STDERR_TAIL = 4000
# what a request carries: the network programs' options or the plaintext ones
Options = loader.KernelOptions | loader.SslOptions
T = TypeVar("T")


# ---- child ------------------------------------------------------------------------


def compile_and_pin(mode: str, options: Options, load_dir: Path) -> dict[str, Any]:
    """Compile and load in this process, pin what the counting maps' pins do not
    cover into load_dir, and return the manifest."""
    existing = next(d for d in load_dir.parents if d.exists())
    if not loader._bpffs_mounted(existing):
        raise ProbeLoadError(
            f"{options.pin_root} is not on a bpf filesystem: mount -t bpf bpf {loader.BPFFS} "
            "(scripts/setup.sh does)")
    _remove_orphans(load_dir.parent)
    if isinstance(options, loader.SslOptions):
        return _pin_ssl(options, load_dir)
    probes = loader.compile_in_process(mode, options)
    try:
        load_dir.mkdir(parents=True)
        maps: dict[str, Any] = loader.describe_tables(probes.bpf)
        for name, entry in maps.items():
            fd = entry.pop("fd")
            kept = probes.pin_dir / name if probes.pin_dir is not None else None
            if kept is not None and kept.exists():  # a counting map, pinned by BCC
                entry["path"], entry["persistent"] = str(kept), True
            else:
                entry["path"], entry["persistent"] = str(load_dir / name), False
                pinned.obj_pin(fd, entry["path"])
        programs = {}
        for direction, fn in probes.functions.items():
            prog_name = fn.name.decode() if isinstance(fn.name, bytes) else str(fn.name)
            path = str(load_dir / prog_name)
            pinned.obj_pin(int(fn.fd), path)
            programs[direction] = {"name": prog_name, "path": path}
    finally:
        probes.close()  # the pins keep everything alive
    return {
        "mode": mode,
        "pin_dir": str(probes.pin_dir) if probes.pin_dir is not None else None,
        "maps": maps,
        "programs": programs,
    }


def _pin_ssl(options: loader.SslOptions, load_dir: Path) -> dict[str, Any]:
    """The plaintext programs: every map and program pinned into load_dir (none
    persists: their counters restart with the agent)."""
    bpf = loader.compile_ssl(options)
    try:
        load_dir.mkdir(parents=True)
        maps: dict[str, Any] = loader.describe_tables(bpf)
        for name, entry in maps.items():
            entry["path"], entry["persistent"] = str(load_dir / name), False
            pinned.obj_pin(entry.pop("fd"), entry["path"])
        programs = {}
        for name, fd in loader.ssl_program_fds(bpf).items():
            programs[name] = {"name": name, "path": str(load_dir / name)}
            pinned.obj_pin(fd, programs[name]["path"])
    finally:
        bpf.cleanup()  # the pins keep everything alive; BCC's tracepoint attachments go
    return {"mode": "ssl", "pin_dir": None, "maps": maps, "programs": programs}


def _remove_orphans(root: Path) -> None:
    """Load directories of processes that died before removing them."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        pid = entry.name.partition("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(entry, ignore_errors=True)


def main() -> int:
    """Child entry point: a JSON request on stdin, the manifest on stdout, exit 2 on error."""
    # BCC and clang may print to stdout: keep it for the manifest alone
    manifest_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        request = json.load(sys.stdin)
        kind = loader.SslOptions if request["mode"] == "ssl" else loader.KernelOptions
        options: Options = kind(**request["options"])
        manifest = compile_and_pin(request["mode"], options, Path(request["load_dir"]))
    except ProbeLoadError as e:
        sys.stderr.write(f"{_ERROR}{e}\n")
        return 2
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        sys.stderr.write(f"{_ERROR}{type(e).__name__}: {e}\n")
        return 2
    json.dump(manifest, manifest_out)
    manifest_out.close()
    return 0


# ---- parent -----------------------------------------------------------------------


def load_dir_for(options: Options) -> Path:
    """A fresh load directory under the pin root (on the bpffs)."""
    root = Path(options.pin_root)
    return root / LOAD_DIR / f"{os.getpid()}-{secrets.token_hex(4)}"


def _failure(files: str, stderr: str) -> ProbeLoadError:
    """One line for the user; the compiler's whole output goes to the log."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    reason = next((ln[len(_ERROR):] for ln in reversed(lines) if ln.startswith(_ERROR)), None)
    if reason is None:
        reason = lines[-1] if lines else "the compiler child died without a message"
    if len(lines) > 1:
        logger.error("compiler output:\n%s", stderr[-_STDERR_TAIL:])
    # clang's first error names file:line: the most useful part of a long message
    first = next((ln.strip() for ln in lines
                  if ": error: " in ln and not ln.startswith(_ERROR)), None)
    if first is not None and first not in reason:
        reason = f"{reason.removesuffix(' (see the compiler output above)')}; first: {first}"
    if any(ln.startswith(_ERROR) for ln in lines):
        return ProbeLoadError(reason)  # the child's own message says what it was doing
    return ProbeLoadError(f"compiling {files}: {reason}")


def load_in_child(mode: str, options: loader.KernelOptions) -> loader.Probes:
    """Compile in a child, then reopen its programs and maps by path."""
    return _compile_in_child(mode, options, lambda m: open_manifest(mode, options, m))


def load_ssl_in_child(options: loader.SslOptions) -> tuple[pinned.PinnedObject,
                                                           dict[str, pinned.PinnedProgram]]:
    """The plaintext programs compiled in a child: their maps and programs, reopened."""
    return _compile_in_child("ssl", options, open_pinned)


def _compile_in_child(mode: str, options: Options, open_: Callable[[dict[str, Any]], T]) -> T:
    """Run the compiler child and open its manifest with `open_` before its load
    directory goes."""
    files = ", ".join(loader.MODE_SOURCES[mode])
    load_dir = load_dir_for(options)
    request = {"mode": mode, "options": dataclasses.asdict(options), "load_dir": str(load_dir)}
    try:
        try:
            done = subprocess.run(
                CHILD_COMMAND,
                input=json.dumps(request), capture_output=True, text=True,
                timeout=COMPILE_TIMEOUT_S, check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise ProbeLoadError(
                f"compiling {files}: no result within {COMPILE_TIMEOUT_S:.0f} s "
                "(LT_COMPILE_TIMEOUT_S)") from e
        except OSError as e:
            raise ProbeLoadError(f"compiling {files}: cannot start the compiler child: {e}") from e
        for line in done.stderr.splitlines():  # the child's own log lines, relayed
            level, _, text = line.partition(" ")
            if level in ("INFO", "WARNING") and text.startswith("leaktap."):
                logger.log(getattr(logging, level), "compiler child: %s", text)
        if done.returncode != 0:
            raise _failure(files, done.stderr)
        try:
            manifest = json.loads(done.stdout)
        except ValueError as e:
            raise ProbeLoadError(f"compiling {files}: unreadable manifest: {e}") from e
        return open_(manifest)
    finally:
        # the transient pins: the parent's fds keep those objects alive now
        shutil.rmtree(load_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            load_dir.parent.rmdir()  # the last load leaves no empty directory


def open_manifest(mode: str, options: loader.KernelOptions,
                  manifest: dict[str, Any]) -> loader.Probes:
    """Open every map and program of a manifest; a mismatch is a ProbeLoadError."""
    obj, functions = open_pinned(manifest)
    pin_dir = manifest.get("pin_dir")
    probes = loader.Probes(mode=mode, options=options, bpf=obj,
                           pin_dir=Path(pin_dir) if pin_dir else None)
    probes.functions.update(functions)
    return probes


def open_pinned(manifest: dict[str, Any]) -> tuple[pinned.PinnedObject,
                                                   dict[str, pinned.PinnedProgram]]:
    """The manifest's maps (checked against it) and programs, opened by path."""
    obj = pinned.PinnedObject()
    functions: dict[str, pinned.PinnedProgram] = {}
    try:
        for name, m in manifest["maps"].items():
            fd = pinned.obj_get(m["path"])
            obj.fds.append(fd)
            key_type = pinned.decode_type(m["key_desc"])
            leaf_type = pinned.decode_type(m["leaf_desc"])
            _check_map(name, fd, m, key_type, leaf_type)
            obj.tables[name] = pinned.PinnedTable(
                name, fd, int(m["type"]), key_type, leaf_type, int(m["max_entries"]), obj)
        for direction, p in manifest["programs"].items():
            fd = pinned.obj_get(p["path"])
            obj.fds.append(fd)
            functions[direction] = pinned.PinnedProgram(p["name"], fd)
    except Exception:
        obj.cleanup()
        raise
    return obj, functions


def _check_map(name: str, fd: int, m: dict[str, Any], key_type: Any, leaf_type: Any) -> None:
    """The reopened map is the one described, and the rebuilt classes are BCC's."""
    info = pinned.map_info(fd)
    value_size = int(m["value_size"])
    if info.type == pinned.MAP_RINGBUF:
        return  # no key or value: records are decoded by the event class
    problems = []
    if info.type != int(m["type"]):
        problems.append(f"type {info.type} != {m['type']}")
    if info.key_size != ctypes.sizeof(key_type) or info.key_size != int(m["key_size"]):
        problems.append(f"key {info.key_size} bytes, described {ctypes.sizeof(key_type)}")
    if info.value_size != ctypes.sizeof(leaf_type) or info.value_size != value_size:
        problems.append(f"value {info.value_size} bytes, described {ctypes.sizeof(leaf_type)}")
    if pinned.layout(key_type) != m["key_layout"] or pinned.layout(leaf_type) != m["leaf_layout"]:
        problems.append("field layout differs from BCC's")
    if problems:
        raise ProbeLoadError(f"pinned map {name} ({m['path']}): {'; '.join(problems)}")


if __name__ == "__main__":
    sys.exit(main())
