"""Minute buckets: one row of egress/ingress bytes per (minute, tenant, CRM instance).

Rows are read as leaktap writes them (`leaktap export-buckets`, the store): a
null `crm_instance` is an instance leaktap could not name (the series "unknown",
as the live agent keys it) and a null `crm_vendor` is non-CRM traffic, read
but not analysed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from leaktap.analytics.allowlist import UNKNOWN_INSTANCE

logger = logging.getLogger(__name__)

MINUTE = 60
_MAX_BYTES = 2**50  # far above any NIC's minute; larger means a corrupt counter
LINES_PER_REASON = 3  # line numbers quoted per reason in the summary


class Bucket(NamedTuple):
    ts: int
    tenant: str
    crm_vendor: str
    crm_instance: str
    bytes_out: int
    bytes_in: int


class BucketError(ValueError):
    """A row that cannot be used; the message says which field and why (with the
    value), `reason` the same without the value, for one summary line per reason."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def _text(row: dict[str, object], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise BucketError(f"{key}: expected a non-empty string, got {value!r}",
                          f"{key}: not a non-empty string")
    return value


def _instance(row: dict[str, object]) -> str:
    # null: leaktap could not name the instance (a shared host, an ambiguous address)
    return UNKNOWN_INSTANCE if row.get("crm_instance", "") is None else _text(row, "crm_instance")


def _count(row: dict[str, object], key: str) -> int:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BucketError(f"{key}: expected a number, got {value!r}", f"{key}: not a number")
    if value != value or not 0 <= value <= _MAX_BYTES or value != int(value):
        raise BucketError(f"{key}: expected a whole number of bytes >= 0, got {value!r}",
                          f"{key}: not a whole number >= 0")
    return int(value)


def bucket_from_dict(row: object) -> Bucket | None:
    """The row as a Bucket; None for a row of non-CRM traffic (crm_vendor null)."""
    if not isinstance(row, dict):
        raise BucketError("expected a JSON object", "not a JSON object")
    ts = _count(row, "ts")
    if ts % MINUTE:
        raise BucketError(f"ts: {ts} is not minute-aligned", "ts: not minute-aligned")
    tenant = _text(row, "tenant")
    if "crm_vendor" in row and row["crm_vendor"] is None:
        _count(row, "bytes_out"), _count(row, "bytes_in")
        return None
    return Bucket(
        ts,
        tenant,
        _text(row, "crm_vendor"),
        _instance(row),
        _count(row, "bytes_out"),
        _count(row, "bytes_in"),
    )


_raw_decode = json.JSONDecoder().raw_decode
# raw_decode without its Python frame (an attribute typeshed does not declare)
_scan_once: Callable[[str, int], tuple[Any, int]] = (
    json.JSONDecoder().scan_once)  # type: ignore[attr-defined]
_new_tuple = tuple.__new__  # a Bucket without NamedTuple's Python-level __new__


def parse_bucket(line: str) -> Bucket | None:
    """One JSONL row; None for non-CRM traffic, which the detectors do not watch."""
    try:
        row, end = _raw_decode(line)
    except ValueError as e:
        raise BucketError(f"not JSON: {e}", "not JSON") from e
    if end != len(line) and line[end:].strip():
        raise BucketError(f"not JSON: extra data at column {end + 1}", "not JSON")
    # Fast path for the well-formed row (millions of them); anything else goes through
    # bucket_from_dict, which says precisely what is wrong.
    try:
        ts, tenant, vendor, instance, out, inb = (
            row["ts"], row["tenant"], row["crm_vendor"], row["crm_instance"],
            row["bytes_out"], row["bytes_in"],
        )
    except (KeyError, TypeError):
        return bucket_from_dict(row)
    if instance is None:
        instance = UNKNOWN_INSTANCE
    if (
        type(ts) is int and type(out) is int and type(inb) is int
        and type(tenant) is str and type(vendor) is str and type(instance) is str
        and ts >= 0 and not ts % MINUTE and 0 <= out <= _MAX_BYTES and 0 <= inb <= _MAX_BYTES
        and 0 < len(tenant) <= 256 and 0 < len(vendor) <= 256 and 0 < len(instance) <= 256
    ):
        return Bucket(ts, tenant, vendor, instance, out, inb)
    return bucket_from_dict(row)


def _well_formed(text: str) -> Bucket | None:
    """The usual row (`text`: a line without its trailing whitespace) as a Bucket at the
    least cost; None for anything else, which `parse_bucket` then reads (and judges) as
    always. Accepts only what parse_bucket's own fast path accepts, with the same result."""
    try:
        row, end = _scan_once(text, 0)
        ts, tenant, vendor, instance, out, inb = (
            row["ts"], row["tenant"], row["crm_vendor"], row["crm_instance"],
            row["bytes_out"], row["bytes_in"],
        )
    except (StopIteration, ValueError, KeyError, TypeError):
        return None
    if instance is None:
        instance = UNKNOWN_INSTANCE
    if (
        end == len(text)
        and type(ts) is int and type(out) is int and type(inb) is int
        and type(tenant) is str and type(vendor) is str and type(instance) is str
        and ts >= 0 and not ts % MINUTE and 0 <= out <= _MAX_BYTES and 0 <= inb <= _MAX_BYTES
        and 0 < len(tenant) <= 256 and 0 < len(vendor) <= 256 and 0 < len(instance) <= 256
    ):
        bucket: Bucket = _new_tuple(Bucket, (ts, tenant, vendor, instance, out, inb))
        return bucket
    return None


@dataclass
class RowReport:
    """What reading a file left out: bad rows per reason (count, first line numbers)."""

    rows: int = 0  # rows read (blank lines aside)
    not_crm: int = 0  # non-CRM traffic (crm_vendor null): read, not analysed
    bad: dict[str, int] = field(default_factory=dict)
    lines: dict[str, list[int]] = field(default_factory=dict)  # reason -> first lines
    first_message: dict[str, str] = field(default_factory=dict)

    @property
    def bad_rows(self) -> int:
        return sum(self.bad.values())

    def add_bad(self, lineno: int, error: BucketError) -> None:
        reason = error.reason
        self.bad[reason] = self.bad.get(reason, 0) + 1
        first = self.lines.setdefault(reason, [])
        if len(first) < LINES_PER_REASON:
            first.append(lineno)
        self.first_message.setdefault(reason, str(error))

    def summary(self, source: str) -> list[str]:
        """One line per reason, most frequent first."""
        return [
            f"{source}: {n} row(s) skipped: {reason} (line(s) "
            f"{', '.join(map(str, self.lines[reason]))}{', ...' if n > LINES_PER_REASON else ''}"
            f"; first: {self.first_message[reason]})"
            for reason, n in sorted(self.bad.items(), key=lambda kv: (-kv[1], kv[0]))
        ]


def read_buckets(
    lines: Iterable[str], source: str = "<buckets>", report: RowReport | None = None
) -> Iterator[Bucket]:
    """Valid CRM rows in file order. Bad or out-of-order rows are skipped and counted in
    `report`; at the end one WARNING per reason gives the count and the first lines."""
    report = report if report is not None else RowReport()
    newest = -1
    for lineno, line in enumerate(lines, 1):
        text = line.rstrip()
        if not text:
            continue
        report.rows += 1
        bucket = _well_formed(text)
        try:
            if bucket is None:
                bucket = parse_bucket(line)
                if bucket is None:
                    report.not_crm += 1
                    continue
            if bucket[0] < newest:
                raise BucketError(f"ts: {bucket.ts} is older than an earlier row ({newest})",
                                  "ts: older than an earlier row")
        except BucketError as e:
            report.add_bad(lineno, e)
            continue
        newest = bucket[0]
        yield bucket
    for message in report.summary(source):
        logger.warning("%s", message)
    if report.not_crm:
        logger.info("%s: %d row(s) of non-CRM traffic (crm_vendor null) not analysed",
                    source, report.not_crm)
