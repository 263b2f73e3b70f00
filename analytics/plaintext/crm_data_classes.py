"""The classes of data in a CRM call's fields: email, phone, national_id, card, iban,
free_text. Only the class names leave this module, never a value.

Values are classified with the unencrypted_field detectors (fields.py) over the
string leaves of the parsed request or response JSON, a bounded sample (the
first records carry the same fields as the rest). Keys that hold identifiers,
links or timestamps are skipped: a record id or a date is not a phone number.
"""

from __future__ import annotations

import csv
import io
import re
from typing import Any

from leaktap.analytics.plaintext.fields import classify_value, embedded_kind

LEAVES_MAX = 160  # string values classified per body
STACK_MAX = 4096
FREE_TEXT_MIN_CHARS = 40
FREE_TEXT_MIN_WORDS = 6
CLASS_NAMES = {"ssn": "national_id", "card": "card", "email": "email", "phone": "phone",
               "iban": "iban"}
DATA_CLASSES = ("email", "phone", "national_id", "card", "iban", "free_text")
_SKIP_KEY = re.compile(r"(?i:(?:^|[_.-])(?:id|url|href|uri|type|etag|date|time|at|stamp)$)|^@|"
                       r"odata\.|(?:[a-z0-9](?:Id|Url|Date|Time|At|Stamp))$|"
                       r"(?:[a-z](?:date|time|stamp))$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")
_MAYBE = re.compile(r"[@\d]")
CSV_ROWS_MAX = 16
CSV_BYTES_MAX = 16384


def csv_rows(body: bytes) -> list[dict[str, str]] | None:
    """The first rows of a CSV body (Bulk API uploads and results) as records, or None."""
    head = body[:CSV_BYTES_MAX]
    if b"," not in head or b"\n" not in head:
        return None
    text = head.decode("utf-8", "replace").rsplit("\n", 1)[0]  # whole lines only
    try:
        rows = list(csv.DictReader(io.StringIO(text)))[:CSV_ROWS_MAX]
    except csv.Error:
        return None
    return [{str(k): v for k, v in r.items() if isinstance(v, str)} for r in rows] or None


def _classify(value: str) -> str | None:
    if len(value) > 4096:
        value = value[:4096]
    if _MAYBE.search(value) and not _DATE.match(value):
        if len(value) <= 64:
            kind = classify_value(value)
            if kind in CLASS_NAMES:
                return CLASS_NAMES[kind]
        if len(value) >= 13 and (embedded := embedded_kind(value)) is not None:
            return CLASS_NAMES[embedded[0]]
    if len(value) >= FREE_TEXT_MIN_CHARS and value.count(" ") >= FREE_TEXT_MIN_WORDS - 1:
        return "free_text"
    return None


def data_classes(doc: Any, limit: int = LEAVES_MAX) -> frozenset[str]:
    """The classes of the string values under a parsed JSON document (breadth first)."""
    found: set[str] = set()
    if doc is None:
        return frozenset()
    queue: list[tuple[str, Any]] = [("", doc)]
    head = 0
    leaves = 0
    while head < len(queue) and leaves < limit:
        key, value = queue[head]
        head += 1
        if type(value) is dict:
            if len(queue) < STACK_MAX:
                queue.extend(value.items())
        elif type(value) is list:
            if len(queue) < STACK_MAX:
                queue.extend((key, v) for v in value[:64])
        elif type(value) is str and value and not _SKIP_KEY.search(key):
            leaves += 1
            kind = _classify(value)
            if kind is not None:
                found.add(kind)
                if len(found) == len(DATA_CLASSES):
                    break
    return frozenset(found)
