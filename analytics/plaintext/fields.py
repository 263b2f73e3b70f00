"""Fields a tenant declared must only leave encrypted, found with plaintext values.

Fields are found by structure: a JSON body is parsed and walked (nested
objects, arrays, escaped keys; names matched case-insensitively), form and
multipart bodies are split into their fields; XML (Bulk 1.0) and CSV uploads
(Bulk 2.0 ingest) are read by pattern, as is JSON that does not parse (a body
window cut mid-document). A value alerts when it is plaintext (SSN, Luhn-valid
card number, e-mail, phone, IBAN) or contains a national id, card number or
IBAN within other text; a configured envelope prefix or high-entropy base64
is ciphertext.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from leaktap.analytics.plaintext.decode import multipart_parts
from leaktap.analytics.plaintext.redact import KeyedHasher, mask_value

_SSN = re.compile(r"(?!000|666|9\d\d)\d{3}-?(?!00)\d{2}-?(?!0000)\d{4}")
_CARD = re.compile(r"\d(?:[ -]?\d){12,18}")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_PHONE = re.compile(r"\+?\(?\d[\d ().-]{6,18}\d")
_IBAN = re.compile(r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
CIPHERTEXT_MIN_ENTROPY = 3.5  # bits per character; base64 of random bytes is ~6
MAX_CSV_ROWS = 50
JSON_PARSE_MAX = 4 << 20  # bodies parsed as JSON; larger ones are read by pattern
WALK_VALUES_MAX = 100_000
_DECODER = json.JSONDecoder()
# inside other text: a national id with its separators, a card, an IBAN
_SSN_IN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")
_CARD_IN = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
_IBAN_IN = re.compile(r"(?<![A-Z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Z0-9])")


@dataclass(frozen=True, slots=True)
class FieldHit:
    field: str
    kind: str  # ssn | card | email | phone | iban
    offset: int  # of the value within the scanned bytes
    masked: str
    value_hash: str


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(value: str) -> bool:
    s = value.replace(" ", "")
    moved = s[4:] + s[:4]
    try:
        number = int("".join(str(int(ch, 36)) for ch in moved))
    except ValueError:
        return False
    return number % 97 == 1


def entropy(value: str) -> float:
    counts = Counter(value)
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def classify_value(value: str, envelope_prefixes: Iterable[str] = ()) -> str:
    """ciphertext | ssn | card | email | phone | iban | other"""
    v = value.strip()
    prefixes = envelope_prefixes if isinstance(envelope_prefixes, tuple) else tuple(
        p for p in envelope_prefixes if p)
    if prefixes and v.startswith(prefixes):
        return "ciphertext"
    if _SSN.fullmatch(v):
        return "ssn"
    if _CARD.fullmatch(v):
        digits = re.sub(r"\D", "", v)
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            return "card"
    if _EMAIL.fullmatch(v):
        return "email"
    if _IBAN.fullmatch(v) and iban_ok(v):
        return "iban"
    if _PHONE.fullmatch(v) and 7 <= sum(ch.isdigit() for ch in v) <= 15:
        return "phone"
    if _BASE64.fullmatch(v) and entropy(v) >= CIPHERTEXT_MIN_ENTROPY:
        return "ciphertext"
    return "other"


PLAINTEXT_KINDS = frozenset({"ssn", "card", "email", "phone", "iban"})


def embedded_kind(value: str) -> tuple[str, str] | None:
    """(kind, the matched part) of a national id, card or IBAN inside longer text."""
    if m := _SSN_IN.search(value):
        return "ssn", m.group()
    for m in _CARD_IN.finditer(value):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            return "card", m.group()
    for m in _IBAN_IN.finditer(value):
        if iban_ok(m.group()):
            return "iban", m.group()
    return None


def _leaves(value: Any) -> Iterable[str]:
    """Every scalar under a JSON value (arrays and nested objects included)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            yield v
        elif isinstance(v, int | float) and not isinstance(v, bool):
            yield str(v)


class FieldPolicy:
    """One tenant's must-be-encrypted fields (matched case-insensitively)."""

    def __init__(self, fields: Iterable[str], envelope_prefixes: Iterable[str] = ()) -> None:
        self.fields = sorted({f for f in fields if f}, key=str.lower)
        self.envelope_prefixes = tuple(p for p in envelope_prefixes if p)
        self._lower = {f.lower(): f for f in self.fields}
        self._names = [f.lower().encode() for f in self.fields]
        # per field: its JSON key, and that key followed by each envelope (both separators)
        self._enveloped_keys = [
            (b'"' + n + b'"', [b'"' + n + b'"' + sep + b'"' + p.lower().encode()
                               for sep in (b":", b": ") for p in self.envelope_prefixes])
            for n in self._names] if self.envelope_prefixes else []
        names = b"|".join(re.escape(f.encode()) for f in self.fields) or b"(?!)"
        self._json = re.compile(
            rb'"(' + names + rb')"\s*:\s*("(?:[^"\\]|\\.){0,512}"|-?\d[\d.eE+-]{0,40})', re.I)
        lower_names = b"|".join(re.escape(f.lower().encode()) for f in self.fields) or b"(?!)"
        # an enveloped value never leaves the regex engine (the common case: many per body)
        skip = b"".join(b"(?!" + re.escape(p.lower().encode()) + b")"
                        for p in self.envelope_prefixes)
        self._json_key = re.compile(
            rb'"(' + lower_names + rb')"\s*:\s*(?:"' + skip + rb'([^"\\]{0,512})"'
            rb"|(-?\d[\d.eE+-]{0,40})|(?=[\[{]))")
        self._form_rx = re.compile(rb"(?:^|[&?])(" + names + rb")=([^&\s]{0,1024})", re.I)
        self._xml = re.compile(rb"<(" + names + rb")>([^<]{0,512})</", re.I)

    def __bool__(self) -> bool:
        return bool(self.fields)

    def scan(self, body: bytes, content_type: str, hasher: KeyedHasher,
             full_content_type: str = "") -> list[FieldHit]:
        """Declared fields carrying plaintext values (or values containing one) in `body`."""
        hits: list[FieldHit] = []
        if not self.fields or not body:
            return hits
        lowered = body.lower()
        if b"\\" not in body and b"%" not in body and not any(
                name in lowered for name in self._names):
            return hits  # no escaped names possible: a body naming none of the fields has none
        if self._all_enveloped(body, lowered):
            return hits
        for name, value, offset in self._values(body, content_type, full_content_type,
                                                lowered):
            kind = classify_value(value, self.envelope_prefixes)
            shown = value
            if kind not in PLAINTEXT_KINDS:
                if kind == "ciphertext":
                    continue
                embedded = embedded_kind(value)
                if embedded is None:
                    continue
                kind, shown = embedded
            field = self._lower.get(name.lower(), name)
            hits.append(FieldHit(field, kind, offset, mask_value(shown), hasher.hash(shown)))
        return hits

    def _all_enveloped(self, body: bytes, lowered: bytes) -> bool:
        """Plain JSON in which every field name is a key followed by an enveloped value
        (the normal state of a policy that works), found by counting alone."""
        if (not self._enveloped_keys or body[:64].lstrip()[:1] not in (b"{", b"[")
                or b"\\" in body or b"<" in body):
            return False
        for key, enveloped in self._enveloped_keys:
            if lowered.count(key) != sum(lowered.count(e) for e in enveloped):
                return False
        return True

    def _values(self, body: bytes, content_type: str, full_content_type: str = "",
                lowered: bytes | None = None) -> Iterable[tuple[str, str, int]]:
        start = body[:64].lstrip()[:1]
        is_json = start in (b"{", b"[")  # by content: a Content-Type can say anything
        if is_json and b"\\" not in body:
            # no escapes, so no escaped names: find the names, parse only their values
            yield from self._json_fast(body, lowered if lowered is not None else body.lower())
        elif is_json and (parsed := self._json_document(body, content_type)) is not None:
            yield from self._walk(parsed)
        else:
            yield from self._json_by_pattern(body)
        if content_type.startswith("multipart/"):
            for part, headers in multipart_parts(body, full_content_type):
                disposition = next((v for k, v in headers if k == "content-disposition"), "")
                named = re.search(r'name="([^"]{1,128})"', disposition)
                if named and named.group(1).lower() in self._lower:
                    yield named.group(1), part.decode("utf-8", "replace"), -1
        elif content_type == "application/x-www-form-urlencoded" or (
                not is_json and b"=" in body[:256]):
            yield from self._form(body)
        for m in self._xml.finditer(body) if b"<" in body else ():
            yield m.group(1).decode(), m.group(2).decode("utf-8", "replace"), m.start(2)
        if content_type == "text/csv" or (not is_json and self._csv_header(body)):
            yield from self._csv_values(body)

    @staticmethod
    def _json_document(body: bytes, content_type: str) -> Any:
        start = body[:64].lstrip()[:1]
        if len(body) > JSON_PARSE_MAX or not (start in (b"{", b"[") or "json" in content_type):
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None

    def _json_fast(self, body: bytes, lowered: bytes) -> list[tuple[str, str, int]]:
        """Values of the fields in unescaped JSON, found by name in one regex pass."""
        found: list[tuple[str, str, int]] = []
        for m in self._json_key.finditer(lowered):
            name = self._lower[m.group(1).decode()]
            if m.start(2) >= 0:
                found.append((name, body[m.start(2) : m.end(2)].decode("utf-8", "replace"),
                              m.start(2)))
            elif m.start(3) >= 0:
                found.append((name, m.group(3).decode(), m.start(3)))
            else:  # an array or object: every scalar under it
                text = body[m.end() :].decode("utf-8", "replace")
                try:
                    value, _ = _DECODER.raw_decode(text)
                except ValueError:
                    continue
                found.extend((name, leaf, m.end()) for leaf in _leaves(value))
        return found

    def _walk(self, doc: Any) -> list[tuple[str, str, int]]:
        found: list[tuple[str, str, int]] = []
        names = self._lower
        stack = [doc]
        seen = 0
        while stack and seen < WALK_VALUES_MAX:
            v = stack.pop()
            seen += 1
            if type(v) is dict:
                for key, value in v.items():
                    if key.lower() in names:
                        if type(value) is str:
                            found.append((key, value, -1))
                        else:
                            found.extend((key, leaf, -1) for leaf in _leaves(value))
                    elif type(value) is dict or type(value) is list:
                        stack.append(value)
            elif type(v) is list:
                stack.extend(x for x in v if type(x) is dict or type(x) is list)
        return found

    def _json_by_pattern(self, body: bytes) -> Iterable[tuple[str, str, int]]:
        for m in self._json.finditer(body):
            raw = m.group(2)
            if raw.startswith(b'"'):
                if b"\\" not in raw:
                    value = raw[1:-1].decode("utf-8", "replace")
                else:
                    try:
                        value = json.loads(raw)
                    except ValueError:
                        value = raw[1:-1].decode("utf-8", "replace")
            else:
                value = raw.decode()
            yield m.group(1).decode(), str(value), m.start(2)

    def _form(self, body: bytes) -> Iterable[tuple[str, str, int]]:
        if len(body) > JSON_PARSE_MAX:
            for m in self._form_rx.finditer(body):
                yield (m.group(1).decode(), unquote_plus(m.group(2).decode("latin-1")),
                       m.start(2))
            return
        text = body.decode("latin-1")
        for key, value in parse_qsl(text, keep_blank_values=False):
            if key.lower() in self._lower:
                yield key, value, -1

    def _csv_header(self, body: bytes) -> bool:
        first = body[:4096].split(b"\n", 1)[0].decode("utf-8", "replace").lower()
        return "," in first and any(c.strip().strip('"') in self._lower for c in first.split(","))

    def _csv_values(self, body: bytes) -> Iterable[tuple[str, str, int]]:
        text = body.decode("utf-8", "replace")
        reader = csv.reader(io.StringIO(text))
        try:
            header = next(reader)
        except (StopIteration, csv.Error):
            return
        columns = [(i, self._lower[h.strip().lower()]) for i, h in enumerate(header)
                   if h.strip().lower() in self._lower]
        try:
            for row_no, row in enumerate(reader):
                if row_no >= MAX_CSV_ROWS:
                    break
                for i, name in columns:
                    if i < len(row):
                        yield name, row[i], -1  # CSV offsets are not tracked
        except csv.Error:
            return
