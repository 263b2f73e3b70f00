from __future__ import annotations

import json
import logging

import pytest

from leaktap.analytics.buckets import (
    Bucket,
    BucketError,
    RowReport,
    parse_bucket,
    read_buckets,
)

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
        (line(crm_vendor=...), "crm_vendor"),
        (line(crm_instance=""), "crm_instance"),
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


def test_read_skips_bad_rows_with_one_summary_line_per_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lines = [
        line(),
        "garbage\n",
        "\n",
        line(ts=1704067260, bytes_in=-5),
        line(ts=1704067260),
        line(ts=1704067200),  # older than the previous row
        line(ts=1704067320),
    ] + ["also garbage\n"] * 5
    report = RowReport()
    with caplog.at_level(logging.WARNING):
        rows = list(read_buckets(lines, "b.jsonl", report))
    assert [r.ts for r in rows] == [1704067200, 1704067260, 1704067320]
    assert report.bad == {"not JSON": 6, "bytes_in: not a whole number >= 0": 1,
                          "ts: older than an earlier row": 1}
    assert report.lines["not JSON"] == [2, 8, 9]  # the first three
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3  # one per reason, never one per row
    assert messages[0].startswith("b.jsonl: 6 row(s) skipped: not JSON (line(s) 2, 8, 9, ...")
    assert any(m.startswith("b.jsonl: 1 row(s) skipped: bytes_in: not a whole number >= 0 "
                            "(line(s) 4;") for m in messages)
    assert any(m.startswith("b.jsonl: 1 row(s) skipped: ts: older than an earlier row "
                            "(line(s) 6;") for m in messages)


def test_null_instance_and_vendor_are_what_leaktap_writes() -> None:
    """leaktap writes crm_instance null for an instance it could not name (a shared host)
    and crm_vendor null for non-CRM traffic (issue 11.4): neither is a bad row."""
    assert parse_bucket(line(crm_instance=None)) == Bucket(
        1704067200, "acme", "salesforce", "unknown", 1200, 3400)
    assert parse_bucket(line(crm_vendor=None, crm_instance=None)) is None
    report = RowReport()
    rows = list(read_buckets(
        [line(crm_instance=None), line(crm_vendor=None, crm_instance=None), line()],
        "b.jsonl", report))
    assert [r.crm_instance for r in rows] == ["unknown", "acme"]
    assert (report.rows, report.not_crm, report.bad) == (3, 1, {})


def test_the_readers_fast_path_reads_every_row_as_parse_bucket_does() -> None:
    """read_buckets takes the usual row through a cheaper path (issue 18.5); every row, odd
    or not, must come out as parse_bucket reads it line by line: the same bucket, or the
    same reason and message for a bad row."""
    odd = [
        line(), " " + line(), line() + " x", line() + "  \t", line() + "\r\n", "[1, 2]",
        line(crm_instance=None), line(crm_vendor=None, crm_instance=None), line(bytes_out=5.0),
        line(bytes_out=True), line(ts=1704067201), line(tenant=""), line(tenant="t" * 257),
        line(bytes_in=2**51), line(ts=-60), line(tenant=None), line(crm_vendor=...),
        line(extra=[1, {"a": None}]), '{"ts": 1704067200, "tenant": "ac\\u006de"}',
        json.dumps({**GOOD, "tenant": "caf\u00e9 \u2603"}, ensure_ascii=False),
        line()[:-1], line() + line(), '{"ts": 01}', "{}", "null", "\"text\"",
    ]
    for number, text in enumerate(odd):
        try:
            expected: object = parse_bucket(text)
        except BucketError as e:
            expected = (e.reason, str(e))
        report = RowReport()
        rows = list(read_buckets([f"{text}\n" if number % 2 else text], "b.jsonl", report))
        got: object = rows[0] if rows else None
        if report.bad:
            [reason] = report.bad
            got = (reason, report.first_message[reason])
        assert (text, got) == (text, expected)
        assert type(got) is type(expected)
