"""The kernel/user ABI as Python sees it, read from bpf/include/lt_types.h.

Structs come from the ctypes classes BCC derives from the C declarations
(``table.Key``/``table.Leaf``, ``ringbuf.event``); this module adds what BCC
does not expose: the enums and #define limits, parsed from the header itself,
so there is exactly one definition of each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

_ENUM = re.compile(r"enum\s+(\w+)\s*\{(.*?)\};", re.S)
_ENUMERATOR = re.compile(r"^\s*(\w+)\s*(?:=\s*(0x[0-9a-fA-F]+|\d+))?\s*,", re.M)
_DEFINE = re.compile(r"^#define\s+(LT_\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*$", re.M)


def header_path() -> Path:
    # the package data the loader compiles (loader.bpf_dir), without importing the loader
    return Path(str(resources.files("leaktap.bpf"))) / "include" / "lt_types.h"


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


@dataclass(frozen=True)
class Limit:
    """A kernel limit set with -D<name>: its default and the values the programs accept
    (lt_types.h: <name>, <name>_FLOOR, <name>_CEIL, <name>_POW2)."""

    name: str
    default: int
    floor: int
    ceil: int
    power_of_two: bool = False

    def problem(self, value: object) -> str | None:
        """Why `value` cannot be compiled in, or None when it can."""
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, not {value!r}"
        if self.power_of_two and (value < 1 or value & (value - 1)):
            return f"must be a power of two in {self.floor}..{self.ceil}, not {value}"
        if not self.floor <= value <= self.ceil:
            return f"must be in {self.floor}..{self.ceil}, not {value}"
        return None


def limit(name: str) -> Limit:
    """The limit `name` (e.g. LT_RINGBUF_PAGES) as lt_types.h defines it."""
    values = defines()
    try:
        return Limit(name, values[name], values[f"{name}_FLOOR"], values[f"{name}_CEIL"],
                     values.get(f"{name}_POW2", 0) == 1)
    except KeyError as e:
        raise KeyError(f"lt_types.h defines no {e.args[0]}") from e


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
