"""The host names a catalogue regex rule can match, when they are few enough to list.

The kernel compares server names with map keys (the whole name, or the name
without its first label), so a regex rule is enforceable in the kernel only as
the finite set of names it matches. Most catalogue regexes are a captured first
label followed by a short enumerable tail, e.g. Dynamics 365's
``(?P<instance>…)\\.(?:api\\.)?crm[0-9]{0,2}\\.dynamics\\.com``: 222 suffixes.
This walks Python's own parse of the pattern (so it agrees with `re` on what the
pattern means) and lists the strings of a pattern built from literals,
alternations, character classes and bounded repeats, giving up (None) on
anything else or past a cap: a rule that would need more names stays
unenforceable and is reported, never approximated.
"""

from __future__ import annotations

import re

# Python's own parser (3.11+), so that the listing agrees with `re` on the pattern
from re import _constants as sre_constants  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

NAMES_CAP = 4096  # names one rule may expand into (each becomes a map entry per tenant)
# a captured first label that may be any label (a customer's own name); a group
# that constrains the label (a region code) is enumerated with the rest instead
_FIRST_LABEL_GROUP = "instance"


class _TooMany(Exception):
    pass


def _class_chars(items: list[tuple[Any, Any]]) -> list[str]:
    chars: list[str] = []
    for op, arg in items:
        if op is sre_constants.LITERAL:
            chars.append(chr(arg))
        elif op is sre_constants.RANGE:
            chars.extend(chr(c) for c in range(arg[0], arg[1] + 1))
        else:
            raise ValueError(f"character class item {op}")
        if len(chars) > NAMES_CAP:
            raise _TooMany
    return sorted(set(chars))


def _product(prefixes: list[str], options: list[str]) -> list[str]:
    if len(prefixes) * len(options) > NAMES_CAP:
        raise _TooMany
    return [p + o for p in prefixes for o in options]


def _strings(items: Any) -> list[str]:
    """Every string the parsed sequence `items` matches (ValueError: not enumerable)."""
    out = [""]
    for op, arg in items:
        if op is sre_constants.LITERAL:
            options = [chr(arg)]
        elif op is sre_constants.IN:
            options = _class_chars(arg)
        elif op is sre_constants.SUBPATTERN:
            options = _strings(arg[-1])
        elif op is sre_constants.BRANCH:
            options = [s for branch in arg[1] for s in _strings(branch)]
        elif op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT):
            low, high, body = arg
            if high is sre_constants.MAXREPEAT:
                raise ValueError("unbounded repeat")
            unit = _strings(body)
            options, run = ([""] if low == 0 else []), [""]
            for count in range(1, high + 1):
                run = _product(run, unit)
                if count >= low:
                    options.extend(run)
                if len(options) > NAMES_CAP:
                    raise _TooMany
        else:
            raise ValueError(f"regex construct {op}")
        out = _product(out, sorted(set(options)))
    return out


def regex_names(pattern: str) -> tuple[str | None, list[str]] | None:
    """(first-label group, names) of a catalogue regex: with a leading
    `(?P<instance>…)\\.` that never spans a dot, `names` are the ".suffix"es that
    follow the captured label (group "instance"); otherwise the whole host names
    (group None). None when the names cannot be listed (unsupported construct, or
    more than NAMES_CAP)."""
    try:
        parsed = list(sre_parse.parse(pattern, re.IGNORECASE))
    except re.error:
        return None
    group = None
    if len(parsed) > 1 and parsed[0][0] is sre_constants.SUBPATTERN:
        numbers = {v: k for k, v in re.compile(pattern).groupindex.items()}
        name = numbers.get(parsed[0][1][0])
        # the kernel strips exactly one label: the capture must never span a dot
        if (name == _FIRST_LABEL_GROUP and parsed[1] == (sre_constants.LITERAL, ord("."))
                and not _may_match_dot(parsed[0][1][-1])):
            group, parsed = name, parsed[1:]
    try:
        names = _strings(parsed)
    except (ValueError, _TooMany):
        return None
    return group, [n.lower() for n in names]


def _may_match_dot(items: Any) -> bool:
    """Whether the parsed sequence could match a '.' (conservative: unknown is yes)."""
    for op, arg in items:
        if op is sre_constants.LITERAL:
            if arg == ord("."):
                return True
        elif op is sre_constants.IN:
            for item_op, item_arg in arg:
                if item_op is sre_constants.LITERAL and item_arg == ord("."):
                    return True
                if item_op is sre_constants.RANGE and item_arg[0] <= ord(".") <= item_arg[1]:
                    return True
                if item_op not in (sre_constants.LITERAL, sre_constants.RANGE):
                    return True
        elif op is sre_constants.SUBPATTERN:
            if _may_match_dot(arg[-1]):
                return True
        elif op is sre_constants.BRANCH:
            if any(_may_match_dot(branch) for branch in arg[1]):
                return True
        elif op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT):
            if _may_match_dot(arg[2]):
                return True
        else:
            return True
    return False
