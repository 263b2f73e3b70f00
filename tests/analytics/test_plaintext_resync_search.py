"""find_request_line: the resynchronising HTTP/1.1 parser's search for the next request
line finds exactly what the full regex search finds, from the literal " HTTP/1."."""

from __future__ import annotations

import random

from leaktap.analytics.plaintext.http import _REQUEST_AT_LINE, find_request_line

PIECES = [b"GET", b"POST", b"PROPFIND", b"MKCOL", b"XGET", b"get", b" ", b"  ", b"/a", b"/b?c=d",
          b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", b" HTTP/1.2\r\n", b" HTTP/1.", b"HTTP/1.1",
          b"\r\n", b"\t", b"x" * 5, b"\x00\xff", b"H", b"1.1\r\n"]


def _span(m: object) -> tuple[int, int] | None:
    return None if m is None else m.span(1)  # type: ignore[attr-defined]


def test_same_match_as_the_full_search_on_random_buffers() -> None:
    rng = random.Random(19)
    for _ in range(20000):
        buf = b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 14)))
        assert _span(find_request_line(buf)) == _span(_REQUEST_AT_LINE.search(buf)), buf
        assert _span(find_request_line(bytearray(buf))) == _span(_REQUEST_AT_LINE.search(buf))


def test_request_after_a_body_and_in_opaque_bytes() -> None:
    buf = b"x" * 4096 + b"{}POST /services/data HTTP/1.1\r\nHost: a\r\n\r\n"
    m = find_request_line(buf)
    assert m is not None and m.start(1) == 4098
    assert find_request_line(b"x" * 4096) is None
    assert find_request_line(b"GET  HTTP/1.1\r\n") is None  # no target
