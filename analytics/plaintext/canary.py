"""Canary tokens in bytes: raw, URL-encoded, JSON-escaped, base64-wrapped.

The inspector scans every decoded view of a message (decode.decoded_views), so
deeper encodings are undone before this matcher runs.

Every encoded form of every token is precomputed, so one regex pass over the
bytes finds them all. A base64-wrapped token sits at one of three alignments
inside the larger base64 text; the characters that depend only on the token's
own bytes are the same whatever surrounds it, and those are what is searched.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from urllib.parse import quote, quote_plus

MIN_TOKEN = 8
MIN_B64_CORE = 8
# up to this many forms, one bytes.find each (memmem) beats a regex alternation,
# which Python's re tries position by position
FIND_FORMS_MAX = 96


@dataclass(frozen=True, slots=True)
class Canary:
    """A planted value; `record` names what it was planted in (not secret)."""

    token: str
    tenant: str
    record: str
    environment: str | None = None

    @property
    def label(self) -> str:
        return f"{self.tenant}/{self.record}"


@dataclass(frozen=True, slots=True)
class CanaryHit:
    canary: Canary
    form: str  # raw | url | json | base64 | base64url
    offset: int
    length: int = 0  # of the matched form


def _base64_cores(raw: bytes) -> list[tuple[bytes, str]]:
    out = []
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + raw)
        start = (4 * shift + 2) // 3
        end = (8 * (shift + len(raw))) // 6
        core = enc[start:end]
        if len(core) >= MIN_B64_CORE:
            out.append((core, "base64"))
            url = core.translate(bytes.maketrans(b"+/", b"-_"))
            if url != core:
                out.append((url, "base64url"))
    return out


def encoded_forms(token: str) -> list[tuple[bytes, str]]:
    """(bytes to search, form name) for one token, most literal first."""
    raw = token.encode()
    forms: list[tuple[bytes, str]] = [(raw, "raw")]
    for enc in (quote(token, safe=""), quote_plus(token, safe=""), quote(token, safe="")
                .lower()):
        forms.append((enc.encode(), "url"))
    dumped = json.dumps(token)[1:-1]
    forms.append((dumped.encode(), "json"))
    forms.append((dumped.replace("/", "\\/").encode(), "json"))
    forms.append((json.dumps(token, ensure_ascii=True)[1:-1].encode(), "json"))
    forms.extend(_base64_cores(raw))
    seen: set[bytes] = set()
    unique = []
    for value, form in forms:
        if value not in seen:
            seen.add(value)
            unique.append((value, form))
    return unique


class CanaryMatcher:
    """Finds registered canaries in bytes or text; tokens can be added at run time."""

    def __init__(self, canaries: list[Canary] | tuple[Canary, ...] = ()) -> None:
        self._by_form: dict[bytes, tuple[Canary, str]] = {}
        self._rx: re.Pattern[bytes] | None = None
        for c in canaries:
            self._register(c)
        self._compile()

    def __len__(self) -> int:
        return len({c.token for c, _ in self._by_form.values()})

    @property
    def longest_form(self) -> int:
        """Bytes a scan window must overlap its predecessor by to see every form whole."""
        return max(map(len, self._by_form), default=0)

    def add(self, canary: Canary) -> None:
        if len(canary.token) < MIN_TOKEN:
            raise ValueError(f"a canary token needs at least {MIN_TOKEN} characters")
        self._register(canary)
        self._compile()

    def _register(self, canary: Canary) -> None:
        if len(canary.token) < MIN_TOKEN:
            raise ValueError(f"a canary token needs at least {MIN_TOKEN} characters")
        for value, form in encoded_forms(canary.token):
            self._by_form.setdefault(value, (canary, form))

    def _compile(self) -> None:
        # longest first: a raw token inside its own JSON form is reported once
        forms = sorted(self._by_form, key=len, reverse=True)
        self._forms = forms
        self._rx = re.compile(b"|".join(map(re.escape, forms))) if forms else None

    def scan(self, data: bytes, base_offset: int = 0) -> list[CanaryHit]:
        if self._rx is None or not data:
            return []
        hits = []
        if len(self._forms) <= FIND_FORMS_MAX:
            for form in self._forms:
                at = data.find(form)
                if at >= 0:
                    canary, name = self._by_form[form]
                    hits.append(CanaryHit(canary, name, base_offset + at, len(form)))
            return hits
        for m in self._rx.finditer(data):
            canary, name = self._by_form[m.group()]
            hits.append(CanaryHit(canary, name, base_offset + m.start(), m.end() - m.start()))
        return hits
