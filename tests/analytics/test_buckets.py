from __future__ import annotations

import json
import logging

import pytest

from leaktap.analytics.buckets import Bucket, BucketError, parse_bucket, read_buckets

GOOD = {"ts": 1704067200, "tenant": "acme", "crm_vendor": "salesforce",
        "crm_instance": "acme", "bytes_out": 1200, "bytes_in": 3400}


def line(**changes: object) -> str:
    row = {**GOOD, **changes}
    return json.dumps({k: v for k, v in row.items() if v is not ...})


def test_parse_good_row() -> None:
    assert parse_bucket(line()) == Bucket(1704067200, "acme", "salesforce", "acme", 1200, 3400)
    assert parse_bucket(line(bytes_out=5.0)).bytes_out == 5  # a whole float is a count


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        (line(ts=...), "ts"),
        (line(ts=1704067201), "minute-aligned"),
        (line(ts="1704067200"), "ts"),
        (line(tenant=""), "tenant"),
        (line(crm_vendor=None), "crm_vendor"),
        (line(crm_instance=7), "crm_instance"),
        (line(bytes_out=-1), "bytes_out"),
        (line(bytes_out=1.5), "bytes_out"),
        (line(bytes_in=True), "bytes_in"),
        (line(bytes_in=...), "bytes_in"),
        (line(bytes_out=float("nan")).replace("NaN", "NaN"), "bytes_out"),
    ],
)
def test_bad_rows_name_the_field(text: str, reason: str) -> None:
    with pytest.raises(BucketError, match=reason):
        parse_bucket(text)


def test_read_skips_bad_rows_with_line_numbers(caplog: pytest.LogCaptureFixture) -> None:
    lines = [
        line(),
        "garbage\n",
        "\n",
        line(ts=1704067260, bytes_in=-5),
        line(ts=1704067260),
        line(ts=1704067200),  # older than the previous row
        line(ts=1704067320),
    ]
    with caplog.at_level(logging.WARNING):
        rows = list(read_buckets(lines, "b.jsonl"))
    assert [r.ts for r in rows] == [1704067200, 1704067260, 1704067320]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("b.jsonl:2: skipped: not JSON") for m in messages)
    assert any(m.startswith("b.jsonl:4: skipped: bytes_in") for m in messages)
    assert any(m.startswith("b.jsonl:6: skipped: ts") and "older" in m for m in messages)
    assert "b.jsonl: 3 bad rows skipped" in messages
