"""The catalogue of ways to slip a value past plaintext inspection (issue 19).

Each class has an id, what the attacker does, the finding it must raise, and
(for the stream side) the chunks the monitor hands the inspector: ("w", data,
total_len, offset) for captured bytes of one write, ("lost", nbytes, reason)
for bytes the kernel dropped. Kernel-side classes (capture, probing) name the
tests that cover them instead. tests/analytics/test_plaintext_streams.py runs
every stream class; tests/e2e/test_plaintext_tls.py sends the main ones through
a real TLS client.
"""

from __future__ import annotations

import base64
import gzip
import json
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import brotli
import h2.config
import h2.connection
import zstandard

CANARY = "CANARY-ACME-0001-7f3a"
TOKEN = "00D5g000004ABCD!AR8AQUnitTestBearerTokenValue3f9a"
HOST = "acme.my.salesforce.com"

Step = tuple  # ("w", data, total_len, offset) | ("lost", nbytes, reason)


@dataclass(frozen=True)
class Evasion:
    id: str
    what: str
    finding: str  # the finding kind it must raise
    layer: str = "stream"  # stream (this inspector) | kernel (capture and probing)
    steps: Callable[[], list[Step]] | None = None
    tenant: str = "acme"
    # steps of another tenant before these (the first use of a token)
    setup: Callable[[], list[Step]] | None = None
    covered_by: tuple[str, ...] = field(default=())


def http1(body: bytes, headers: dict[str, str] | None = None, path: str = "/services/data/"
          "v59.0/sobjects/Account", token: str = TOKEN) -> bytes:
    headers = {"Content-Type": "application/json", **(headers or {})}
    head = [f"POST {path} HTTP/1.1", f"Host: {HOST}", f"Authorization: Bearer {token}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    if "Transfer-Encoding" not in headers:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def record(value: str = CANARY) -> bytes:
    return json.dumps({"Name": "Acme", "Description": f"note {value} end"}).encode()


def whole(data: bytes) -> list[Step]:
    return [("w", data, len(data), 0)]


def writes(*parts: bytes) -> list[Step]:
    return [("w", p, len(p), 0) for p in parts]


def chunks_of(data: bytes, size: int) -> list[Step]:
    """One write captured in successive chunks, as the kernel hands a large write over."""
    return [("w", data[i : i + size], len(data), i) for i in range(0, len(data), size)]


def split_at(data: bytes, needle: bytes, inside: int) -> list[Step]:
    cut = data.index(needle) + inside
    return writes(data[:cut], data[cut:])


def chunked_request(pieces: list[bytes]) -> bytes:
    body = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
    return http1(body, {"Transfer-Encoding": "chunked"})


def h2_request(bodies: list[bytes], headers: list[tuple[str, str]] | None = None) -> bytes:
    """Client preface, SETTINGS, HEADERS and one DATA frame per body, as one byte string."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST"), (":path", "/crm/v3/objects/contacts"),
                          (":scheme", "https"), (":authority", "api.hubapi.com"),
                          ("content-type", "application/json"), *(headers or [])])
    for i, body in enumerate(bodies):
        conn.send_data(1, body, end_stream=i == len(bodies) - 1)
    return conn.data_to_send()


def utf16_body() -> bytes:
    return http1(record().decode().encode("utf-16"), {"Content-Type": "text/plain"})


def gap_in_body() -> list[Step]:
    """The kernel dropped a middle chunk of a large body; the canary lies after it."""
    body = b'{"pad": "' + b"x" * 20000 + b'", "note": "' + CANARY.encode() + b'"}'
    data = http1(body)
    return [("w", data[:4096], len(data), 0), ("lost", 8192, "rate_limit"),
            ("w", data[12288:], len(data), 12288)]


def resync_after_gap() -> list[Step]:
    """Unknown bytes lost between requests: the next request line is found again."""
    first = http1(b'{"a": 1}')
    return [("w", first[:30], len(first), 0), ("lost", 5000, "ring_full"),
            *whole(http1(record()))]


def h2_table_lost() -> list[Step]:
    data = h2_request([b"{}"])
    later = h2.connection.H2Connection()  # a header block the inspector never saw
    return [*whole(data), ("lost", 300, "rate_limit"), *whole(data[-50:] + later.data_to_send())]


def h2_gap_in_data() -> list[Step]:
    data = h2_request([b" " * 12000 + record()])
    return [("w", data[:4096], len(data), 0), ("w", data[8192:], len(data), 8192)]


def h2_header_split() -> list[Step]:
    data = h2_request([b"{}"], [("x-note", f"see {CANARY}")])
    cut = len(data) - 30  # inside the HEADERS frame, before the DATA frame
    return writes(data[:cut - 20], data[cut - 20 :])


def bomb() -> list[Step]:
    return whole(http1(gzip.compress(b"\0" * (64 << 20)), {"Content-Encoding": "gzip"}))


def flood_then_write() -> list[Step]:
    return [("lost", 400_000, "rate_limit"), *whole(http1(b'{"a": 1}'))]


def h2_value_across_frames() -> bytes:
    rec = record()
    cut = rec.index(CANARY.encode()) + 6
    return h2_request([rec[:cut], rec[cut:]])


EVASIONS: list[Evasion] = [
    Evasion("split_two_writes", "the value split across two writes", "canary_token",
            steps=lambda: split_at(http1(record()), CANARY.encode(), 7)),
    Evasion("byte_at_a_time", "a 300-byte request written one byte per write", "canary_token",
            steps=lambda: writes(*(bytes([b]) for b in http1(record())))),
    Evasion("chunked_boundary", "HTTP/1.1 chunked encoding with the value across a chunk "
            "boundary", "canary_token",
            steps=lambda: whole(chunked_request([record()[:20], record()[20:]]))),
    Evasion("h2_two_data_frames", "two HTTP/2 DATA frames in one write, the value across them",
            "canary_token", steps=lambda: whole(h2_value_across_frames())),
    Evasion("authorization_split", "an Authorization header split across writes (token "
            "reuse by a second tenant)", "oauth_token_reuse", tenant="globex",
            setup=lambda: whole(http1(b"{}")),
            steps=lambda: split_at(http1(b"{}"), b"Authorization: Bear", 10)),
    Evasion("after_4kb_padding", "the record after 4 KB of padding (large write in chunks)",
            "canary_token", steps=lambda: chunks_of(http1(b" " * 4096 + record()), 4096)),
    Evasion("at_70kb", "the record at 70 KB of one write", "canary_token",
            steps=lambda: chunks_of(http1(b" " * 70_000 + record()), 4096)),
    Evasion("gzip", "Content-Encoding: gzip", "canary_token",
            steps=lambda: whole(http1(gzip.compress(record()), {"Content-Encoding": "gzip"}))),
    Evasion("deflate", "Content-Encoding: deflate", "canary_token",
            steps=lambda: whole(http1(zlib.compress(record()), {"Content-Encoding": "deflate"}))),
    Evasion("br", "Content-Encoding: br", "canary_token",
            steps=lambda: whole(http1(brotli.compress(record(), quality=11),
                                      {"Content-Encoding": "br"}))),
    Evasion("zstd", "Content-Encoding: zstd", "canary_token",
            steps=lambda: whole(http1(zstandard.ZstdCompressor().compress(record() * 3),
                                      {"Content-Encoding": "zstd"}))),
    Evasion("gzip_split_chunked", "gzip body sent chunked, one byte per chunk", "canary_token",
            steps=lambda: whole(http1(b"".join(
                b"1\r\n" + bytes([b]) + b"\r\n" for b in gzip.compress(record()))
                + b"0\r\n\r\n", {"Content-Encoding": "gzip", "Transfer-Encoding": "chunked"}))),
    Evasion("hex", "the value hex-encoded", "canary_token",
            steps=lambda: whole(http1(json.dumps({"n": CANARY.encode().hex()}).encode()))),
    Evasion("utf16", "the body in UTF-16", "canary_token", steps=lambda: whole(utf16_body())),
    Evasion("json_u_escaped", "JSON with every character \\u-escaped", "canary_token",
            steps=lambda: whole(http1(('{"n": "' + "".join(
                f"\\u{ord(c):04x}" for c in CANARY) + '"}').encode()))),
    Evasion("double_url", "the value URL-encoded twice", "canary_token",
            steps=lambda: whole(http1(("note=" + urllib.parse.quote(urllib.parse.quote(
                "x " + CANARY + "/", safe=""), safe="")).encode(),
                {"Content-Type": "application/x-www-form-urlencoded"}))),
    Evasion("base64_lines", "MIME base64 with line breaks", "canary_token",
            steps=lambda: whole(http1(json.dumps({"blob": base64.encodebytes(
                b"z" * 40 + record()).decode()}).encode()))),
    Evasion("multipart_base64", "a multipart part in base64", "canary_token",
            steps=lambda: whole(http1(
                b"--b1\r\nContent-Disposition: form-data; name=f\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(record())
                + b"\r\n--b1--\r\n", {"Content-Type": "multipart/form-data; boundary=b1"}))),
    Evasion("gap_in_body", "a chunk of a large body lost, the value after it", "canary_token",
            steps=gap_in_body),
    Evasion("resync_after_gap", "bytes lost between requests, the value in the next one",
            "canary_token", steps=resync_after_gap),
    Evasion("h2_gap_in_data", "an HTTP/2 DATA payload partly lost, the value after the hole",
            "canary_token", steps=h2_gap_in_data),
    Evasion("h2_header_block_split", "an HTTP/2 header block (Huffman-coded value) split "
            "across writes", "canary_token", steps=h2_header_split),
    Evasion("pipelined", "two requests in one write, the value in the second", "canary_token",
            steps=lambda: whole(http1(b"{}") + http1(record()))),
    Evasion("h2_table_lost", "the HTTP/2 header table lost to a dropped write",
            "inspection_evaded", steps=h2_table_lost),
    Evasion("decompression_bomb", "a gzip body that expands 1000-fold", "inspection_evaded",
            steps=bomb),
    Evasion("flood_before_write", "a flood drops most of the connection's bytes",
            "inspection_evaded", steps=flood_then_write),
    Evasion("field_in_array", "an encrypted field's value in an array", "unencrypted_field",
            steps=lambda: whole(http1(b'{"Contact": {"SSN__c": ["123-45-6789"]}}'))),
    Evasion("field_escaped_key", "an encrypted field's name JSON-escaped", "unencrypted_field",
            steps=lambda: whole(http1(b'{"\\u0053SN__c": "123-45-6789"}'))),
    Evasion("field_extra_text", "a national id inside longer text", "unencrypted_field",
            steps=lambda: whole(http1(b'{"ssn__C": "ssn is 123-45-6789, ok"}'))),
    Evasion("field_card_in_text", "a card number inside a form field's text",
            "unencrypted_field",
            steps=lambda: whole(http1(b"a=1&SSN__c=card+4111+1111+1111+1111+x",
                                      {"Content-Type": "application/x-www-form-urlencoded"}))),
    Evasion("field_multipart", "an encrypted field as a multipart form part", "unencrypted_field",
            steps=lambda: whole(http1(
                b'--b2\r\nContent-Disposition: form-data; name="ssn__c"\r\n\r\n'
                b"DE89 3704 0044 0532 0130 00\r\n--b2--\r\n",
                {"Content-Type": "multipart/form-data; boundary=b2"}))),
    Evasion("field_nested_object", "an encrypted field in a nested object of an array",
            "unencrypted_field",
            steps=lambda: whole(http1(b'{"records": [{"attrs": {"Ssn__C": "123456789"}}]}'))),
    Evasion("rate_limit_flood", "2,000 junk writes/s exhaust the process's event budget",
            "inspection_evaded", layer="kernel",
            covered_by=("tests/e2e/test_plaintext_tls.py (kernel side, issue 19.4)",)),
    Evasion("renamed_libssl", "a renamed copy of libssl", "canary_token", layer="kernel",
            covered_by=("tests/e2e/test_plaintext_tls.py (kernel side, issue 19.5)",)),
    Evasion("new_mapping", "a new libssl mapping under select: all", "canary_token",
            layer="kernel",
            covered_by=("tests/e2e/test_plaintext_tls.py (kernel side, issue 19.5)",)),
]

BY_ID = {e.id: e for e in EVASIONS}
