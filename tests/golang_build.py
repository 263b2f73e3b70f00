"""Building the tests' Go programs from source with the distribution's toolchain
(golang-go, installed by scripts/setup.sh): stdlib only, no network, a private
build cache, the local toolchain only (never a downloaded one)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.prerequisites import missing

REPO = Path(__file__).resolve().parents[1]
GO_CLIENT = REPO / "tests" / "e2e" / "go_client" / "main.go"
STRIPPED = "-s -w"


def go_binary() -> str:
    go = shutil.which("go") or ("/usr/bin/go" if Path("/usr/bin/go").exists() else None)
    if go is None:
        missing("no Go toolchain (scripts/setup.sh installs golang-go)")
    return go


def go_env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "",
            "GOCACHE": str(tmp / "gocache"), "GOPATH": str(tmp / "gopath"),
            "HOME": str(tmp)}


def build(source: Path, out: Path, ldflags: str = "", extra: tuple[Path, ...] = (),
          cgo: bool = True) -> Path:
    """`go build` a main.go (and `extra` files of package main) into `out`, with
    `-ldflags` when given; cgo=False links it fully statically (CGO_ENABLED=0)."""
    argv = [go_binary(), "build", "-o", str(out)]
    if ldflags:
        argv.append(f"-ldflags={ldflags}")
    result = subprocess.run([*argv, str(source), *map(str, extra)], cwd=source.parent,
                            env={**go_env(out.parent), "CGO_ENABLED": "1" if cgo else "0"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def go_tool_nm(binary: Path, tmp: Path) -> dict[str, int]:
    """{symbol: address} as `go tool nm` reads them (from .symtab: unstripped builds)."""
    out = subprocess.run([go_binary(), "tool", "nm", str(binary)], env=go_env(tmp),
                         capture_output=True, text=True, check=True, timeout=120).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3:
            found.setdefault(parts[2], int(parts[0], 16))
    return found
