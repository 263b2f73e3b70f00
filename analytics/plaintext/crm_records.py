"""How many CRM records a call moved: counted in the response (reads) or the request
(writes), from each vendor's documented JSON shapes.

Responses: Salesforce `records` (+ `totalSize`/`done`), HubSpot `results`,
Dynamics `value`, Zendesk the resource array (+ `count`), Zoho `data` (+
`info.count`), Pipedrive `data` (+ `additional_data.pagination`); a single
record is 1. A response cut by the capture bound is counted as far as it is
complete: exact when its metadata gives the page size before the cut, else the
complete array elements as a lower bound (`partial`), else unknown. Bulk 2.0
results are CSV (rows after the header). Work is bounded: bodies over the parse
bound or too deep are unknown, never a crash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

PARSE_MAX = 4 << 20  # bodies parsed as JSON
ELEMENTS_MAX = 1_000_000  # array elements counted in a cut body
_DECODER = json.JSONDecoder()
_WS = re.compile(r"[\s,]*")
# the arrays holding records, by vendor (Zendesk: the resource name, found by shape)
_ARRAY_KEYS = {
    "salesforce": ("records", "searchRecords"),
    "hubspot": ("results",),
    "dynamics": ("value",), "dynamics365": ("value",),
    "zoho": ("data",),
    "pipedrive": ("data", "items"),
    "zendesk": ("results",),
}
_ZD_META = frozenset({"next_page", "previous_page", "count", "end_time", "end_of_stream",
                      "after_cursor", "before_cursor", "after_url", "before_url", "meta",
                      "links", "facets"})
_SF_META = re.compile(r'"totalSize"\s*:\s*(\d{1,12})\s*,\s*"done"\s*:\s*(true|false)')
_ZD_ARRAY = re.compile(r'"([a-z_]{2,40})"\s*:\s*\[')


@dataclass(frozen=True, slots=True)
class Count:
    records: int | None  # None: unknown
    partial: bool = False  # a lower bound: the body was cut

    @property
    def known(self) -> bool:
        return self.records is not None


UNKNOWN = Count(None)


def parse_json(body: bytes) -> Any:
    """The body as JSON, or None (not JSON, cut, too large or too deep)."""
    if not body or len(body) > PARSE_MAX or body[:64].lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _records_in(vendor: str, doc: Any) -> int | None:
    """Records of a parsed response document."""
    if isinstance(doc, list):
        return len(doc)
    if not isinstance(doc, dict):
        return None
    for key in _ARRAY_KEYS.get(vendor, ()):
        value = doc.get(key)
        if isinstance(value, list):
            return len(value)
    if vendor == "pipedrive" and "data" in doc:
        data = doc["data"]
        return 1 if isinstance(data, dict) else 0 if data is None else None
    if vendor in ("zendesk", "zoho"):  # {"tickets": [...]}, Zoho settings {"profiles": [...]}
        arrays = [v for k, v in doc.items() if k not in _ZD_META and isinstance(v, list)]
        if len(arrays) == 1:
            return len(arrays[0])
        singles = [v for k, v in doc.items() if k not in _ZD_META and isinstance(v, dict)]
        if len(singles) == 1 and not arrays:
            return 1  # {"ticket": {...}}
        return None
    if vendor == "salesforce" and isinstance(doc.get("attributes"), dict):
        return 1
    if vendor == "hubspot" and "id" in doc and isinstance(doc.get("properties"), dict):
        return 1
    if vendor in ("dynamics", "dynamics365") and str(doc.get("@odata.context", "")).endswith(
            "$entity"):
        return 1
    return None


def _csv_rows(body: bytes, truncated: bool) -> Count:
    """Rows of a CSV result after its header (a cut last line is not a row)."""
    lines = body.count(b"\n")
    if truncated or not body.endswith(b"\n"):
        complete = lines - 1  # the header, then whole lines only
        return Count(max(complete, 0), partial=truncated)
    return Count(max(lines - 1, 0))


def _cut_array(text: str, start: int) -> int:
    """Complete elements of the JSON array opening at text[start] ('[')."""
    pos = start + 1
    n = 0
    while n < ELEMENTS_MAX:
        m = _WS.match(text, pos)
        pos = m.end() if m else pos
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            _, pos = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError):
            break
        n += 1
    return n


def _array_start(vendor: str, text: str, keys: tuple[str, ...]) -> int | None:
    """Where the records array of a cut body opens."""
    for key in keys:
        m = re.search(r'"' + re.escape(key) + r'"\s*:\s*\[', text)
        if m is not None:
            return m.end() - 1
    if vendor == "zendesk":  # the resource array: {"tickets": [...]}
        for m in _ZD_ARRAY.finditer(text[:4096]):
            if m.group(1) not in _ZD_META:
                return m.end() - 1
    if text.lstrip().startswith("["):
        return text.index("[")
    return None


def _count_cut(vendor: str, body: bytes, keys: tuple[str, ...] | None = None) -> Count:
    """Records of a body cut by the capture bound (`keys`: its arrays' names)."""
    text = body.decode("utf-8", "replace")
    if vendor == "salesforce" and (m := _SF_META.search(text[:4096])) and m.group(2) == "true":
        return Count(int(m.group(1)))  # one page holds the whole result: it is the count
    start = _array_start(vendor, text, _ARRAY_KEYS.get(vendor, ()) if keys is None else keys)
    if start is None:
        return UNKNOWN
    return Count(_cut_array(text, start), partial=True)


def count_response(vendor: str, body: bytes, truncated: bool, doc: Any = None) -> Count:
    """Records in a response body (`doc`: the body already parsed, if it was)."""
    if not body:
        return UNKNOWN
    if doc is None and not truncated:
        doc = parse_json(body)
    if doc is not None:
        n = _records_in(vendor, doc)
        return Count(n) if n is not None else UNKNOWN
    start = body[:64].lstrip()[:1]
    if start not in (b"{", b"["):
        if b"," in body[:4096] and b"\n" in body:
            return _csv_rows(body, truncated)
        return UNKNOWN
    if truncated or len(body) <= PARSE_MAX:
        return _count_cut(vendor, body[:PARSE_MAX])
    return UNKNOWN


_WRITE_ARRAY_KEYS = ("inputs", "records", "data", "Targets", "batchRequests",
                     "compositeRequest")


def count_request(vendor: str, method: str, body: bytes, cut: bool, doc: Any = None) -> Count:
    """Records a write carries in its request: an array of inputs, else one record."""
    if not body:  # a write without a body names one record in its path; a body not kept: ?
        return Count(1) if not cut and method in ("DELETE", "PATCH", "PUT", "POST") else UNKNOWN
    if doc is None and not cut:
        doc = parse_json(body)
    if isinstance(doc, list):
        return Count(len(doc))
    if isinstance(doc, dict):
        for key in _WRITE_ARRAY_KEYS:
            value = doc.get(key)
            if isinstance(value, list):
                return Count(len(value))
        if vendor == "zendesk":  # create_many: {"tickets": [...]}
            arrays = [v for v in doc.values() if isinstance(v, list)
                      and v and isinstance(v[0], dict)]
            if len(arrays) == 1:
                return Count(len(arrays[0]))
        return Count(1)
    if body[:64].lstrip()[:1] in (b"{", b"["):
        return _count_cut(vendor, body, _WRITE_ARRAY_KEYS) if cut else UNKNOWN
    if b"," in body[:4096] and b"\n" in body:  # Bulk 2.0 ingest upload: CSV
        return _csv_rows(body, cut)
    return Count(1)
