"""The kernel/user ABI as Python sees it, read from bpf/include/lt_types.h.

Structs come from the ctypes classes BCC derives from the C declarations
(``table.Key``/``table.Leaf``, ``ringbuf.event``); this module adds what BCC
does not expose: the enums and #define limits, parsed from the header itself,
so there is exactly one definition of each.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

_ENUM = re.compile(r"enum\s+(\w+)\s*\{(.*?)\};", re.S)
_ENUMERATOR = re.compile(r"^\s*(\w+)\s*(?:=\s*(0x[0-9a-fA-F]+|\d+))?\s*,", re.M)
_DEFINE = re.compile(r"^#define\s+(LT_\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*$", re.M)


def header_path() -> Path:
    from leaktap.controller.kernel.loader import bpf_dir

    return Path(bpf_dir() / "include" / "lt_types.h")


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)


@cache
def enums(path: Path | None = None) -> dict[str, dict[str, int]]:
    """{enum name: {enumerator: value}} for every enum in the header."""
    text = _strip_comments((path or header_path()).read_text())
    result: dict[str, dict[str, int]] = {}
    for name, body in _ENUM.findall(text):
        values: dict[str, int] = {}
        nxt = 0
        for member, value in _ENUMERATOR.findall(body + ","):
            nxt = int(value, 0) if value else nxt
            values[member] = nxt
            nxt += 1
        result[name] = values
    return result


@cache
def defines(path: Path | None = None) -> dict[str, int]:
    """Integer #defines named LT_* (first definition wins, as in the #ifndef guards)."""
    text = _strip_comments((path or header_path()).read_text())
    out: dict[str, int] = {}
    for name, value in _DEFINE.findall(text):
        out.setdefault(name, int(value, 0))
    return out


def stat_names() -> list[str]:
    """lt_stats index -> lower-case reason name without the LT_ prefix."""
    stats = enums()["lt_stat"]
    names = [""] * stats["LT_STAT_MAX"]
    for member, value in stats.items():
        if member != "LT_STAT_MAX":
            names[value] = member.removeprefix("LT_").lower()
    return names


def event_kind_names() -> dict[int, str]:
    return {v: k.removeprefix("LT_EV_").lower() for k, v in enums()["lt_event_kind"].items()}


def flow_flags() -> dict[str, int]:
    return enums()["lt_flow_flag"]
