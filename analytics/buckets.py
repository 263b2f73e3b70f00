"""Minute buckets: one row of egress/ingress bytes per (minute, tenant, CRM instance)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from typing import NamedTuple

logger = logging.getLogger(__name__)

MINUTE = 60
_MAX_BYTES = 2**50  # far above any NIC's minute; larger means a corrupt counter


class Bucket(NamedTuple):
    ts: int
    tenant: str
    crm_vendor: str
    crm_instance: str
    bytes_out: int
    bytes_in: int


class BucketError(ValueError):
    """A row that cannot be used; the message says which field and why."""


def _text(row: dict[str, object], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise BucketError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _count(row: dict[str, object], key: str) -> int:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BucketError(f"{key}: expected a number, got {value!r}")
    if value != value or not 0 <= value <= _MAX_BYTES or value != int(value):
        raise BucketError(f"{key}: expected a whole number of bytes >= 0, got {value!r}")
    return int(value)


def bucket_from_dict(row: object) -> Bucket:
    if not isinstance(row, dict):
        raise BucketError("expected a JSON object")
    ts = _count(row, "ts")
    if ts % MINUTE:
        raise BucketError(f"ts: {ts} is not minute-aligned")
    return Bucket(
        ts,
        _text(row, "tenant"),
        _text(row, "crm_vendor"),
        _text(row, "crm_instance"),
        _count(row, "bytes_out"),
        _count(row, "bytes_in"),
    )


_raw_decode = json.JSONDecoder().raw_decode


def parse_bucket(line: str) -> Bucket:
    try:
        row, end = _raw_decode(line)
    except ValueError as e:
        raise BucketError(f"not JSON: {e}") from e
    if end != len(line) and line[end:].strip():
        raise BucketError(f"not JSON: extra data at column {end + 1}")
    # Fast path for the well-formed row (millions of them); anything else goes through
    # bucket_from_dict, which says precisely what is wrong.
    try:
        ts, tenant, vendor, instance, out, inb = (
            row["ts"], row["tenant"], row["crm_vendor"], row["crm_instance"],
            row["bytes_out"], row["bytes_in"],
        )
    except (KeyError, TypeError):
        return bucket_from_dict(row)
    if (
        type(ts) is int and type(out) is int and type(inb) is int
        and type(tenant) is str and type(vendor) is str and type(instance) is str
        and ts >= 0 and not ts % MINUTE and 0 <= out <= _MAX_BYTES and 0 <= inb <= _MAX_BYTES
        and 0 < len(tenant) <= 256 and 0 < len(vendor) <= 256 and 0 < len(instance) <= 256
    ):
        return Bucket(ts, tenant, vendor, instance, out, inb)
    return bucket_from_dict(row)


def read_buckets(lines: Iterable[str], source: str = "<buckets>") -> Iterator[Bucket]:
    """Valid rows in file order; bad or out-of-order rows are logged with their line and skipped."""
    newest = -1
    bad = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            bucket = parse_bucket(line)
            if bucket.ts < newest:
                raise BucketError(f"ts: {bucket.ts} is older than an earlier row ({newest})")
        except BucketError as e:
            bad += 1
            logger.warning("%s:%d: skipped: %s", source, lineno, e)
            continue
        newest = bucket.ts
        yield bucket
    if bad:
        logger.warning("%s: %d bad rows skipped", source, bad)
