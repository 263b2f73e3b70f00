"""Responses read back from a CRM (issue 14.1): parsed from the from_crm stream,
paired with their requests, handed to the exchange sinks as CrmExchange."""

from __future__ import annotations

import gzip
import json
import time
import zlib

import brotli
import h2.config
import h2.connection
import h2.events
import pytest
import zstandard

from leaktap.analytics.plaintext.crm_calls import CrmExchange
from leaktap.analytics.plaintext.inspector import (
    FROM_CRM,
    TO_CRM,
    ContentInspector,
    StreamLimits,
    WriteContext,
)
from leaktap.analytics.plaintext.redact import KeyedHasher

HASHER = KeyedHasher(b"s" * 32)
CONN = (7, 0xABC)
QUERY = "/services/data/v59.0/query?q=SELECT+Id+FROM+Account"
BODY = json.dumps({"totalSize": 3, "done": True,
                   "records": [{"Id": f"001{i}", "Name": f"Acme {i}"} for i in range(3)]}).encode()


class Sink:
    def __init__(self) -> None:
        self.got: list[CrmExchange] = []

    def on_exchange(self, exchange: CrmExchange) -> None:
        self.got.append(exchange)


def make(vendor: str | None = "salesforce", **limits: float) -> tuple[ContentInspector, Sink]:
    ins = ContentInspector(HASHER, limits=StreamLimits(**limits))  # type: ignore[arg-type]
    sink = Sink()
    ins.exchange_sinks.append(sink)
    return ins, sink


def ctx(direction: str, vendor: str | None = "salesforce", conn: object = CONN) -> WriteContext:
    return WriteContext(conn, "acme", crm_vendor=vendor, crm_instance="acme" if vendor else None,
                        destination="acme.my.salesforce.com", pid=7, comm="crm-sync",
                        direction=direction, exe="/usr/bin/python3")


def write(ins: ContentInspector, data: bytes, **kw: object) -> None:
    ins.inspect(ctx(TO_CRM, **kw), data, len(data))  # type: ignore[arg-type]


def read(ins: ContentInspector, data: bytes, **kw: object) -> None:
    ins.inspect(ctx(FROM_CRM, **kw), data, len(data))  # type: ignore[arg-type]


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: acme.my.salesforce.com\r\n{extra}\r\n").encode()


def response(body: bytes, status: str = "200 OK", headers: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def chunked(body: bytes, status: str = "200 OK", headers: str = "", size: int = 7) -> bytes:
    parts = [f"{len(body[i:i + size]):x}\r\n".encode() + body[i:i + size] + b"\r\n"
             for i in range(0, len(body), size)]
    return (f"HTTP/1.1 {status}\r\n{headers}Transfer-Encoding: chunked\r\n\r\n".encode()
            + b"".join(parts) + b"0\r\n\r\n")


def test_a_response_split_at_every_byte_boundary_is_paired_whole():
    answer = response(BODY)
    for cut in range(1, len(answer)):
        ins, sink = make()
        write(ins, get(QUERY))
        read(ins, answer[:cut])
        read(ins, answer[cut:])
        (ex,) = sink.got
        assert (ex.status, ex.response_body, ex.response_bytes) == (200, BODY, len(BODY))
        assert (ex.method, ex.target) == ("GET", QUERY)
        assert (ex.tenant, ex.vendor, ex.instance, ex.pid, ex.exe) == (
            "acme", "salesforce", "acme", 7, "/usr/bin/python3")
        assert ex.response_truncated is False


@pytest.mark.parametrize("coding,encode", [
    ("gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress),
    ("zstd", lambda b: zstandard.ZstdCompressor().compress(b)),
])
def test_chunked_and_compressed_responses_are_decoded_at_every_byte_boundary(coding, encode):
    answer = chunked(encode(BODY), headers=f"Content-Encoding: {coding}\r\n")
    for cut in range(1, len(answer), 1 if coding == "gzip" else 5):
        ins, sink = make()
        write(ins, get("/services/data/v59.0/sobjects/Account"))
        read(ins, answer[:cut])
        read(ins, answer[cut:])
        (ex,) = sink.got
        assert (ex.status, ex.response_body, ex.response_truncated) == (200, BODY, False)
        assert ex.response_bytes == len(encode(BODY))


def test_a_request_body_split_and_gzipped_is_carried_decoded():
    body = json.dumps({"Name": "Acme"}).encode()
    sent = gzip.compress(body)
    ins, sink = make()
    request = get("/services/data/v59.0/sobjects/Account", "POST",
                  f"Content-Encoding: gzip\r\nContent-Length: {len(sent)}\r\n") + sent
    for i in range(len(request)):
        write(ins, request[i:i + 1])
    read(ins, response(b'{"id":"001","success":true}', "201 Created"))
    (ex,) = sink.got
    assert (ex.method, ex.request_body, ex.request_bytes, ex.status) == (
        "POST", body, len(sent), 201)


def test_pipelined_requests_are_answered_in_order_with_100_continue_head_204_and_304():
    ins, sink = make()
    write(ins, get("/a", "POST", "Expect: 100-continue\r\nContent-Length: 2\r\n"))
    write(ins, b"{}")
    write(ins, get("/b", "HEAD") + get("/c", "DELETE") + get("/d") + get("/e"))
    read(ins, b"HTTP/1.1 100 Continue\r\n\r\n" + response(b'{"ok":1}', "201 Created")
         # HEAD: a Content-Length, but no body follows
         + b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n"
         + b"HTTP/1.1 204 No Content\r\n\r\n"
         + b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"
         + response(b'{"x":2}', "403 Forbidden"))
    assert [(e.target, e.status, e.response_body) for e in sink.got] == [
        ("/a", 201, b'{"ok":1}'), ("/b", 200, b""), ("/c", 204, b""), ("/d", 304, b""),
        ("/e", 403, b'{"x":2}')]


def test_a_body_read_to_the_close_of_the_connection_ends_with_it():
    ins, sink = make()
    write(ins, get("/services/data/v59.0/sobjects/Contact"))
    read(ins, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY[:10])
    read(ins, BODY[10:])
    assert sink.got == []
    ins.forget(CONN)
    (ex,) = sink.got
    assert (ex.status, ex.response_body, ex.response_truncated) == (200, BODY, False)


def test_unanswered_requests_come_out_with_no_status_and_late_answers_do_not_shift_pairs():
    ins, sink = make(exchange_timeout_s=30)
    write(ins, get("/slow"))
    assert ins.expire_exchanges(now=time.monotonic() + 10) == 0
    assert ins.expire_exchanges(now=time.monotonic() + 31) == 1
    assert [(e.target, e.status, e.response_body) for e in sink.got] == [("/slow", None, b"")]
    write(ins, get("/next"))
    read(ins, response(b'{"late":1}') + response(b'{"next":1}', "404 Not Found"))
    assert [(e.target, e.status) for e in sink.got] == [("/slow", None), ("/next", 404)]
    assert sink.got[1].response_body == b'{"next":1}'
    assert ins.stats["exchange_late_responses_dropped"] == 1


def test_a_closed_connection_emits_what_it_still_owes():
    ins, sink = make()
    write(ins, get("/one") + get("/two"))
    read(ins, response(b"{}"))
    ins.forget(CONN)
    assert [(e.target, e.status) for e in sink.got] == [("/one", 200), ("/two", None)]
    assert ins.stats["exchange_closed_unanswered"] == 1


def test_a_response_over_the_body_bound_is_cut_and_marked():
    big = json.dumps({"records": [{"Id": "x" * 100}] * 200}).encode()
    ins, sink = make(exchange_body_bytes=1000, body_window_bytes=4096)
    write(ins, get("/big"))
    for i in range(0, len(answer := response(big)), 333):
        read(ins, answer[i:i + 333])
    (ex,) = sink.got
    assert ex.response_body == big[:1000] and ex.response_truncated
    assert ex.response_bytes == len(big)


def test_a_hole_in_a_response_body_cuts_it():
    ins, sink = make()
    write(ins, get("/holed"))
    answer = response(BODY)
    head = len(answer) - len(BODY)
    c = ctx(FROM_CRM)
    ins.inspect(c, answer[: head + 10], len(answer[: head + 10]))
    ins.lost(c, 20, "rate_limited")
    ins.inspect(c, answer[head + 30 :], len(answer[head + 30 :]))
    (ex,) = sink.got
    assert ex.status == 200 and ex.response_body == BODY[:10] and ex.response_truncated
    assert ins.stats["lost_bytes_from_crm_rate_limited"] == 20
    assert "lost_bytes_rate_limited" not in ins.stats  # a read's loss is not a write's


def test_a_connection_to_no_crm_is_paired_but_not_handed_over():
    ins, sink = make()
    write(ins, get("/v1/chat"), vendor=None)
    read(ins, response(b"{}"), vendor=None)
    assert sink.got == [] and ins.stats["exchanges_not_crm"] == 1


def test_responses_run_no_detectors():
    ins, sink = make()
    write(ins, get("/x"))
    result = ins.inspect(ctx(FROM_CRM), response(b'{"token": "Bearer 00Dabc!xyz"}'), 64)
    assert result.findings == [] and len(sink.got) == 1


def h2_pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None))
    client.initiate_connection()
    server.initiate_connection()
    return client, server


def test_http2_streams_interleaved_are_paired_by_stream_id_with_the_server_table():
    client, server = h2_pair()
    ins, sink = make()
    for sid, path in ((1, "/crm/v3/objects/contacts"), (3, "/crm/v3/objects/deals"),
                      (5, "/crm/v3/objects/companies")):
        client.send_headers(sid, [(":method", "GET"), (":path", path), (":scheme", "https"),
                                  (":authority", "api.hubapi.com")], end_stream=True)
    sent = client.data_to_send()
    write(ins, sent)
    server.receive_data(sent)
    bodies = {1: b'{"results": [1, 2]}' * 50, 3: b'{"results": []}', 5: b""}
    # headers of all three first (the server's HPACK table grows), then DATA interleaved
    for sid, status in ((1, "200"), (3, "403"), (5, "204")):
        server.send_headers(sid, [(":status", status), ("content-type", "application/json"),
                                  ("x-request-id", f"req-{sid}")], end_stream=sid == 5)
    one = bodies[1]
    server.send_data(1, one[:300])
    server.send_data(3, bodies[3], end_stream=True)
    server.send_data(1, one[300:], end_stream=True)
    answer = server.data_to_send()
    for i in range(0, len(answer), 17):
        read(ins, answer[i:i + 17])
    got = {e.target: (e.status, e.response_body) for e in sink.got}
    assert got == {"/crm/v3/objects/contacts": (200, one),
                   "/crm/v3/objects/deals": (403, bodies[3]),
                   "/crm/v3/objects/companies": (204, b"")}
    assert [e.target for e in sink.got] == ["/crm/v3/objects/companies",
                                             "/crm/v3/objects/deals", "/crm/v3/objects/contacts"]


def test_http2_interim_head_then_final_and_an_unanswered_stream():
    client, server = h2_pair()
    ins, sink = make()
    for sid in (1, 3):
        client.send_headers(sid, [(":method", "POST"), (":path", f"/api/data/v9.2/s{sid}"),
                                  (":scheme", "https"), (":authority", "x.crm.dynamics.com")])
        client.send_data(sid, b'{"a":1}', end_stream=True)
    sent = client.data_to_send()
    write(ins, sent)
    server.receive_data(sent)
    server.send_headers(1, [(":status", "100")])
    server.send_headers(1, [(":status", "201")])
    server.send_data(1, b'{"id":1}', end_stream=True)
    read(ins, server.data_to_send())
    ins.forget(CONN)
    assert [(e.target, e.status, e.request_body) for e in sink.got] == [
        ("/api/data/v9.2/s1", 201, b'{"a":1}'), ("/api/data/v9.2/s3", None, b'{"a":1}')]


def test_request_bodies_awaiting_answers_are_bounded_oldest_dropped_first():
    ins, sink = make()
    ins.book.body_bytes_max = 10_000
    body = b'{"Name": "' + b"x" * 3000 + b'"}'
    post = get("/services/data/v59.0/sobjects/Account", "POST",
               f"Content-Length: {len(body)}\r\n") + body
    for _ in range(5):
        write(ins, post)
    assert ins.book.held_bytes <= 10_000
    assert ins.stats["exchange_bodies_dropped"] >= 2
    read(ins, response(b"{}", "201 Created") * 5)
    got = [e.request_body for e in sink.got]
    # the oldest bodies went first; each exchange still says how long its body was
    assert got[0] == b"" and got[-1] == body
    assert {e.request_bytes for e in sink.got} == {len(body)}
    assert ins.book.held_bytes == 0


def test_without_a_sink_nothing_is_paired_nor_parsed():
    ins = ContentInspector(HASHER)
    write(ins, get("/x"))
    read(ins, response(BODY))
    assert len(ins.book) == 0 and ins.streams.peek((CONN, FROM_CRM)) is None
    assert ins.stats["from_crm_bytes_not_paired"] == len(response(BODY))
