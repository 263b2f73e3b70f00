"""Stream inspection: every evasion class of the catalogue, fed the way the monitor feeds it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leaktap.analytics.plaintext.canary import Canary, CanaryMatcher
from leaktap.analytics.plaintext.fields import FieldPolicy
from leaktap.analytics.plaintext.inspector import (
    ContentInspector,
    Inspection,
    StreamLimits,
    TenantPolicy,
    WriteContext,
)
from leaktap.analytics.plaintext.redact import KeyedHasher
from tests.analytics.plaintext_evasions import CANARY, EVASIONS, TOKEN, Step, http1, record

HASHER = KeyedHasher(b"s" * 32)
STREAM_CLASSES = [e for e in EVASIONS if e.layer == "stream"]


def inspector(**limits: int) -> ContentInspector:
    policy = TenantPolicy(FieldPolicy(["SSN__c"]))
    return ContentInspector(
        HASHER, CanaryMatcher([Canary(CANARY, "acme", "Account/1")]),
        {"acme": policy, "globex": policy}, limits=StreamLimits(**limits))


def run(ins: ContentInspector, steps: list[Step], tenant: str = "acme",
        conn: object = (7, 0xABC)) -> list[Inspection]:
    ctx = WriteContext(conn, tenant, crm_vendor="salesforce", crm_instance="acme",
                       destination="acme.my.salesforce.com", pid=7, comm="crm-sync")
    out = []
    for step in steps:
        if step[0] == "w":
            _, data, total, offset = step
            out.append(ins.inspect(ctx, data, total, offset))
        else:
            _, nbytes, reason = step
            out.append(ins.lost(ctx, nbytes, reason))
    return out


def kinds(results: list[Inspection]) -> list[str]:
    return [f.kind for r in results for f in r.findings]


def test_catalogue_names_every_class_once_and_each_is_covered():
    ids = [e.id for e in EVASIONS]
    assert len(ids) == len(set(ids)) >= 30
    for e in EVASIONS:
        assert (e.steps is not None) == (e.layer == "stream") and (e.steps or e.covered_by)


@pytest.mark.parametrize("evasion", STREAM_CLASSES, ids=lambda e: e.id)
def test_evasion_class_is_caught(evasion):
    ins = inspector()
    if evasion.setup is not None:
        run(ins, evasion.setup(), tenant="acme", conn=(1, 1))
    assert evasion.steps is not None
    results = run(ins, evasion.steps(), tenant=evasion.tenant)
    found = kinds(results)
    assert evasion.finding in found, (evasion.id, found)
    # one finding per message, however many pieces and views it was seen in
    assert found.count(evasion.finding) == 1
    everything = json.dumps([f.__dict__ for r in results for f in r.findings], default=str)
    for secret in (CANARY, TOKEN, "123-45-6789", "4111 1111 1111 1111"):
        assert secret not in everything


def test_split_value_is_not_found_by_a_write_by_write_scan():
    # the mechanism the streams fix: neither write alone holds the value
    data = http1(record())
    cut = data.index(CANARY.encode()) + 7
    matcher = CanaryMatcher([Canary(CANARY, "acme", "Account/1")])
    assert not matcher.scan(data[:cut]) and not matcher.scan(data[cut:])


def test_gaps_are_counted_per_connection_from_offsets_and_loss_reports():
    ins = inspector()
    data = http1(b"x" * 20_000)
    # head captured, a middle chunk missing (offsets jump), the tail never captured
    run(ins, [("w", data[:4096], len(data), 0), ("w", data[8192:12288], len(data), 8192)])
    run(ins, [("lost", 1000, "rate_limit")])  # mid-write: placed when the offsets say
    run(ins, [("w", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 27, 0)])
    (stream,) = [s for _, s in ins.streams]
    tail = len(data) - 12288
    assert stream.loss.written == len(data) + 27
    assert stream.loss.lost == {"not_captured": 4096 + tail}  # the report overlapped it
    assert stream.loss.seen == 8192 + 27
    assert ins.process_loss[7]["rate_limit"] == 1000
    # whole writes lost between writes are a gap of their own
    run(ins, [("lost", 500, "ring_full")])
    assert stream.loss.lost["ring_full"] == 500 and stream.loss.written == len(data) + 527


def test_write_whose_head_was_not_captured_is_a_gap_and_the_parser_resyncs():
    ins = inspector()
    data = http1(b'{"pad": "' + b"y" * 9000 + b'"}') + http1(record())
    results = run(ins, [("w", data[4096:], len(data), 4096)])
    assert kinds(results) == ["canary_token"] and results[0].lost_bytes == 4096


def test_mostly_unseen_connection_to_a_crm_is_reported_once_with_its_numbers():
    ins = inspector(unseen_alert_min_bytes=10_000)
    results = run(ins, [("lost", 30_000, "rate_limit"), ("lost", 30_000, "rate_limit"),
                        *[("w", http1(b"{}"), len(http1(b"{}")), 0)] * 3])
    (finding,) = [f for r in results for f in r.findings]
    assert finding.kind == "inspection_evaded" and finding.tenant == "acme"
    ev = finding.evidence
    assert (ev["lost"], ev["lost_bytes"], ev["comm"]) == ("connection_mostly_unseen", 30_000,
                                                          "crm-sync")


def test_blinding_is_counted_but_not_alerted_away_from_crms():
    ins = inspector()
    ctx = WriteContext((1, 2), "acme", destination="198.18.0.9:443")
    data = http1(b"not gzip at all", {"Content-Encoding": "gzip"})
    assert not ins.inspect(ctx, data, len(data)).findings
    assert ins.stats["decode_errors"] == 1


def test_streams_are_bounded_in_number_and_bytes_with_evictions_counted():
    ins = inspector(streams_max=10, total_bytes_max=200_000, body_window_bytes=64_000)
    body = b"z" * 50_000
    head = http1(body + record())
    for conn in range(50):  # 50 connections each hold an unfinished 50 KB body
        run(ins, [("w", head[:50_200], len(head), 0)], conn=(conn, 1))
    assert len(ins.streams) <= 10 and ins.streams.held_bytes <= 200_000
    assert ins.streams.evicted["streams_max"] == 40
    # an evicted stream that writes again resumes after a reported gap
    results = run(ins, [("w", head[50_200:], len(head), 50_200)], conn=(0, 1))
    assert "stream_evicted" in results[0].blind


def test_large_body_is_scanned_in_overlapping_windows():
    ins = inspector(body_window_bytes=4096, overlap_bytes=256)
    rec = record()
    body = b" " * (4096 - 10) + rec + b" " * 9000
    results = run(ins, [("w", http1(body), len(http1(body)), 0)])
    assert kinds(results) == ["canary_token"]


def test_forget_inspects_what_a_closing_connection_still_holds():
    ins = inspector()
    data = chunked = http1(record(), {"Transfer-Encoding": "chunked"})
    data = chunked.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" + f"{len(record()):x}\r\n".encode()
    data += record()
    run(ins, [("w", data, len(data), 0)])
    out = ins.forget((7, 0xABC))
    assert [f.kind for f in out.findings] == ["canary_token"] and not len(ins.streams)


def test_stream_bounds_come_from_the_plaintext_streams_config():
    from leaktap.controller.config import parse_config

    cfg = parse_config("plaintext: {streams: {max: 100, total_bytes: 2097152, "
                       "decode_max_ratio: 50, unseen_alert_share: 0.8}}")
    limits = StreamLimits.from_settings(cfg.plaintext.streams)
    assert (limits.streams_max, limits.total_bytes_max, limits.decode.max_ratio,
            limits.unseen_alert_share) == (100, 2 << 20, 50, 0.8)
    with pytest.raises(Exception, match="streams"):
        parse_config("plaintext: {streams: {max: 1}}")


def _stream_corpus() -> bytes:
    from tests.analytics.plaintext_evasions import chunked_request, h2_request

    return http1(record()) + chunked_request([b"ab", record()]) + http1(b"{}") + h2_request(
        [record()])


@settings(max_examples=150, deadline=None)
@given(cuts=st.lists(st.integers(0, 2000), max_size=12),
       gaps=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 300)), max_size=3),
       junk=st.binary(max_size=64))
def test_any_slicing_and_gaps_never_raise_and_stay_bounded(cuts, gaps, junk):
    data = junk + _stream_corpus() if junk[:1] == b"\x00" else _stream_corpus() + junk
    ins = inspector(body_window_bytes=4096, total_bytes_max=1 << 20)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    lost = {g[0] % len(data): g[1] for g in gaps}
    for a, b in zip(points, points[1:], strict=False):
        chunk = data[a:b]
        for at, n in lost.items():
            if a <= at < b:
                chunk = data[a:at]
                run(ins, [("w", chunk, len(chunk), 0), ("lost", n, "rate_limit")])
                chunk = data[min(at + n, b):b]
        run(ins, [("w", chunk, len(chunk), 0)])
    assert ins.streams.held_bytes <= (1 << 20) + len(data)
    ins.forget((7, 0xABC))
    assert not len(ins.streams)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_compressed_body_past_the_window_bound_is_decoded_as_a_stream(coding):
    import gzip
    import os
    import zlib

    import brotli
    import zstandard

    compress = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress,
                "zstd": zstandard.ZstdCompressor().compress}[coding]
    # incompressible padding pushes the record ~3 windows in, after the raw bound
    plain = os.urandom(6000).hex().encode() + record() + b" tail"
    data = http1(compress(plain), {"Content-Encoding": coding})
    ins = inspector(body_window_bytes=4096, overlap_bytes=256)
    results = run(ins, chunks(data, 1000))
    assert kinds(results) == ["canary_token"]
    assert ins.stats["decode_errors"] == 0


def test_compressed_bomb_past_the_window_bound_stops_decoding_and_is_reported():
    import zlib

    body = zlib.compress(b"\0" * (32 << 20), 9)  # ~32 KB expanding 1000-fold
    data = http1(body, {"Content-Encoding": "deflate"})
    ins = inspector(body_window_bytes=4096)
    found = [f.evidence["lost"] for r in run(ins, chunks(data, 4096)) for f in r.findings]
    assert found == ["decompression_bomb"]


def chunks(data: bytes, size: int) -> list[Step]:
    return [("w", data[i : i + size], len(data), i) for i in range(0, len(data), size)]


def test_connection_host_is_what_the_requests_named():
    ins = inspector()
    run(ins, [("w", http1(b"{}"), len(http1(b"{}")), 0)])
    assert ins.connection_host((7, 0xABC)) == "acme.my.salesforce.com"
    assert ins.connection_host((7, 0xDEF)) is None and len(ins.streams) == 1


def test_stream_joined_mid_message_is_scanned_raw_then_parsed_from_the_next_request():
    # the agent restarted in the middle of a body: no gap is known, the bytes are not HTTP
    ins = inspector()
    tail = b'adding": "' + b"p" * 300 + b'"}'
    results = run(ins, [*[("w", tail, len(tail), 0)], ("w", http1(record()), len(http1(record())),
                                                          0)])
    assert [r.protocol for r in results] == ["opaque", "http/1.1"]
    assert kinds(results) == ["canary_token"]
    assert results[1].requests == 1


@pytest.mark.parametrize("body,hits", [
    (b'{"r": [{"Email": "enc:v1:QUJD"}, {"email":"enc:v1:REVG"}]}', []),
    (b'{"r": [{"Email": "enc:v1:QUJD"}, {"email":"jane@example.com"}]}', ["email"]),
    (b'{"r": [{"Email": "enc:v1:QUJD"}, {"EMAIL": ["jane@example.com"]}]}', ["email"]),
    (b'{"kind": "email", "Email": "enc:v1:QUJD", "x": "123-45-6789"}', []),
])
def test_enveloped_fast_path_never_hides_a_plaintext_value(body, hits):
    policy = FieldPolicy(["Email"], ["enc:v1:"])
    assert [h.kind for h in policy.scan(body, "application/json", HASHER)] == hits
