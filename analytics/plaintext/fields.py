"""Fields a tenant declared must only leave encrypted, found with plaintext values.

Fields are found in JSON (`"SSN__c": "..."`), form bodies (`SSN__c=...`),
XML (`<SSN__c>...</SSN__c>`, Bulk 1.0) and CSV uploads (Bulk 2.0 ingest),
by pattern rather than by parsing, because the capture may end mid-body.
A value alerts when it looks like plaintext (SSN, Luhn-valid card number,
e-mail, phone, IBAN); a configured envelope prefix or high-entropy base64
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
from urllib.parse import unquote_plus

from leaktap.analytics.plaintext.redact import KeyedHasher, mask_value

_SSN = re.compile(r"(?!000|666|9\d\d)\d{3}-?(?!00)\d{2}-?(?!0000)\d{4}")
_CARD = re.compile(r"\d(?:[ -]?\d){12,18}")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_PHONE = re.compile(r"\+?\(?\d[\d ().-]{6,18}\d")
_IBAN = re.compile(r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
CIPHERTEXT_MIN_ENTROPY = 3.5  # bits per character; base64 of random bytes is ~6
MAX_CSV_ROWS = 50


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
    if any(v.startswith(p) for p in envelope_prefixes if p):
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


class FieldPolicy:
    """One tenant's must-be-encrypted fields (matched case-insensitively)."""

    def __init__(self, fields: Iterable[str], envelope_prefixes: Iterable[str] = ()) -> None:
        self.fields = sorted({f for f in fields if f}, key=str.lower)
        self.envelope_prefixes = tuple(envelope_prefixes)
        self._lower = {f.lower(): f for f in self.fields}
        names = b"|".join(re.escape(f.encode()) for f in self.fields) or b"(?!)"
        self._json = re.compile(
            rb'"(' + names + rb')"\s*:\s*("(?:[^"\\]|\\.){0,512}"|-?\d[\d.eE+-]{0,40})', re.I)
        self._form = re.compile(rb"(?:^|[&?])(" + names + rb")=([^&\s]{0,1024})", re.I)
        self._xml = re.compile(rb"<(" + names + rb")>([^<]{0,512})</", re.I)

    def __bool__(self) -> bool:
        return bool(self.fields)

    def scan(self, body: bytes, content_type: str, hasher: KeyedHasher) -> list[FieldHit]:
        """Declared fields carrying plaintext-looking values in `body`."""
        hits: list[FieldHit] = []
        if not self.fields or not body:
            return hits
        for name, value, offset in self._values(body, content_type):
            kind = classify_value(value, self.envelope_prefixes)
            if kind in PLAINTEXT_KINDS:
                field = self._lower.get(name.lower(), name)
                hits.append(FieldHit(field, kind, offset, mask_value(value), hasher.hash(value)))
        return hits

    def _values(self, body: bytes, content_type: str) -> Iterable[tuple[str, str, int]]:
        for m in self._json.finditer(body):
            raw = m.group(2)
            if raw.startswith(b'"'):
                try:
                    value = json.loads(raw)
                except ValueError:
                    value = raw[1:-1].decode("utf-8", "replace")
            else:
                value = raw.decode()
            yield m.group(1).decode(), str(value), m.start(2)
        if content_type in ("application/x-www-form-urlencoded", "") or b"=" in body[:256]:
            for m in self._form.finditer(body):
                yield (m.group(1).decode(), unquote_plus(m.group(2).decode("latin-1")),
                       m.start(2))
        for m in self._xml.finditer(body):
            yield m.group(1).decode(), m.group(2).decode("utf-8", "replace"), m.start(2)
        if content_type == "text/csv" or self._csv_header(body):
            yield from self._csv_values(body)

    def _csv_header(self, body: bytes) -> bool:
        first = body.split(b"\n", 1)[0].decode("utf-8", "replace").lower()
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
