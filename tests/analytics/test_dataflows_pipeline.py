"""The read side and the data-flow map together (issue 14.1 + 14.3), without the kernel:
the vendor fixtures as the bytes a client writes and reads (HTTP/1.1 in odd-sized
chunks with gzip and chunked answers, HubSpot over HTTP/2), through ContentInspector's
pairing into DataFlowMap, give the exact requests and records per object, in SQLite."""

from __future__ import annotations

import gzip
from pathlib import Path

import h2.config
import h2.connection

from leaktap.analytics.plaintext.dataflows import DataFlowMap, DataFlowSettings
from leaktap.analytics.plaintext.inspector import (
    FROM_CRM,
    TO_CRM,
    ContentInspector,
    WriteContext,
)
from leaktap.analytics.plaintext.redact import KeyedHasher
from leaktap.controller.storage import Store
from tests.analytics.crm_fixtures import ALL_CALLS, EXE, SECRETS, Call

REASONS = {200: "OK", 201: "Created", 204: "No Content", 403: "Forbidden"}
PIECE = 13  # bytes per captured chunk: every head and body is split


def ctx(vendor: str, direction: str) -> WriteContext:
    return WriteContext((1, vendor), "acme", crm_vendor=vendor, crm_instance="acme",
                        destination=f"acme.{vendor}.example", pid=11, comm="crm-sync",
                        direction=direction, exe=EXE)


def feed(ins: ContentInspector, c: WriteContext, data: bytes) -> None:
    for i in range(0, len(data), PIECE):
        ins.inspect(c, data[i : i + PIECE], len(data[i : i + PIECE]))


def h1_request(call: Call) -> bytes:
    head = f"{call.method} {call.target} HTTP/1.1\r\nHost: acme.example\r\n"
    if call.request:
        head += f"Content-Type: application/json\r\nContent-Length: {len(call.request)}\r\n"
    return (head + "\r\n").encode() + call.request


def h1_response(call: Call, i: int) -> bytes:
    head = f"HTTP/1.1 {call.status} {REASONS[call.status]}\r\nContent-Type: application/json\r\n"
    body = call.response
    if call.status == 204:
        return (head + "\r\n").encode()
    if i % 3 == 0:
        body = gzip.compress(body)
        head += "Content-Encoding: gzip\r\n"
    if i % 3 == 1:  # chunked
        parts = b"".join(f"{len(body[j:j + 40]):x}\r\n".encode() + body[j : j + 40] + b"\r\n"
                         for j in range(0, len(body), 40))
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + parts + b"0\r\n\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def hubspot_over_h2(ins: ContentInspector, calls: list[Call]) -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                  header_encoding=None))
    client.initiate_connection()
    server.initiate_connection()
    c_out, c_in = ctx("hubspot", TO_CRM), ctx("hubspot", FROM_CRM)
    for n, call in enumerate(calls):
        sid = 1 + 2 * n
        client.send_headers(sid, [(":method", call.method), (":path", call.target),
                                  (":scheme", "https"), (":authority", "api.hubapi.com")],
                            end_stream=not call.request)
        if call.request:
            client.send_data(sid, call.request, end_stream=True)
    sent = client.data_to_send()
    feed(ins, c_out, sent)
    server.receive_data(sent)
    for n, call in enumerate(calls):
        sid = 1 + 2 * n
        server.send_headers(sid, [(":status", str(call.status)),
                                  ("content-type", "application/json")])
        server.send_data(sid, call.response, end_stream=True)
    feed(ins, c_in, server.data_to_send())


def test_fixture_traffic_through_the_read_side_gives_exact_counts_per_object(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "lt.db")
    fmap = DataFlowMap(DataFlowSettings(warmup_s=3600), write=store.put_dataflows)
    ins = ContentInspector(KeyedHasher(b"p" * 32))
    ins.exchange_sinks.append(fmap)
    for vendor in sorted({c.vendor for c in ALL_CALLS}):
        calls = [c for c in ALL_CALLS if c.vendor == vendor]
        if vendor == "hubspot":
            hubspot_over_h2(ins, calls)
            continue
        for i, call in enumerate(calls):  # one keep-alive connection per vendor
            feed(ins, ctx(vendor, TO_CRM), h1_request(call))
            feed(ins, ctx(vendor, FROM_CRM), h1_response(call, i))
    fmap.flush()
    got = {(r["crm_vendor"], r["object"], r["operation"], r["direction"]):
           (r["requests"], r["records"], r["status_4xx"]) for r in store.dataflows()}
    expected: dict[tuple[str, str, str, str], tuple[int, int, int]] = {}
    for c in ALL_CALLS:
        key = (c.vendor, c.object, c.operation, c.direction)
        n, records, refused = expected.get(key, (0, 0, 0))
        expected[key] = (n + 1, records + c.records, refused + (c.status >= 400))
    assert got == expected
    assert {r["exe"] for r in store.dataflows()} == {EXE}
    assert fmap.stats["exchanges"] == len(ALL_CALLS)
    database = b"".join(p.read_bytes() for p in tmp_path.glob("lt.db*"))
    for value in SECRETS:
        assert value.encode() not in database, value
    store.close()
