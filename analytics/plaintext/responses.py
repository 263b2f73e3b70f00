"""HTTP responses from the server's side of a connection (what a process read), parsed
incrementally.

`ResponseStream` is fed the bytes a process read from one connection, in order,
and told about gaps; it finds the protocol from the first bytes and hands over
the same `ParseEvents` as the request side (http.py): response heads, bodies at
their end or in overlapping windows past the bound. A response `Message` has
`status` set and its headers in `request.headers`.

- HTTP/1.1 (RFC 9112 6.3): no body after a HEAD request or for 1xx, 204 and 304;
  a 2xx to CONNECT and a 101 turn the connection into something else (the rest
  is not HTTP); chunked, then Content-Length, else the body runs to the end of
  the connection (`flush`). 1xx heads are interim: the final response follows.
  Responses answer requests in order, so the parser asks `claim` for the oldest
  unanswered request at each final head (its method decides the framing) and
  keeps what it returns in `Message.exchange`.
- HTTP/2: http.Http2Stream with this side's own HPACK table; a server starts
  with a SETTINGS frame (no preface), so a stream that starts with one at its
  first byte has a known table.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from leaktap.analytics.plaintext.http import (
    H1_BODY,
    H1_CHUNK_SIZE,
    H1_HEAD,
    H1_OPAQUE,
    H1_TO_CLOSE,
    H2_FRAME_HEADER,
    Http1Framing,
    Http2Stream,
    Message,
    ParseEvents,
    ParserLimits,
    Request,
)

# claim(): take the oldest unanswered request: its (method, pairing state), or None
Claim = Callable[[], tuple[str, Any] | None]

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?\r\n")
_STATUS_AT_LINE = re.compile(rb"HTTP/1\.[01] \d{3}[ \r]")
_STATUS_START = re.compile(rb"HTTP/1\.[01] \d{3}")
H2_SETTINGS = 0x4


def parse_response_head(block: bytes, head_max: int) -> tuple[int, list[tuple[str, str]]] | None:
    """(status, headers) of a whole response head (status line to the blank line)."""
    m = _STATUS_LINE.match(block)
    if m is None:
        return None
    headers: list[tuple[str, str]] = []
    for raw in block[m.end() : head_max].split(b"\r\n"):
        name, sep, value = raw.partition(b":")
        if sep and name and b" " not in name:
            headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
    return int(m.group(1)), headers


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k == name), None)


class Http1ResponseStream(Http1Framing):
    """HTTP/1.1 responses from one connection, fed in order (see the module docstring)."""

    protocol = "http/1.1"
    HEAD_OVER_BOUND = "http1_response_head_over_bound"
    RESYNC_AFTER_GAP = "http1_response_resync_after_gap"
    NOT_A_HEAD = "http1_not_a_response"
    SNIFF_BYTES = 12  # "HTTP/1.1 200"

    def __init__(self, limits: ParserLimits, claim: Claim, in_sync: bool = True) -> None:
        super().__init__(limits, in_sync)
        self.claim = claim

    def _starts_like_head(self, buf: bytearray) -> bool:
        return _STATUS_START.match(buf) is not None

    def _head(self, out: ParseEvents) -> bool:
        head = self._head_bytes(out)
        if not isinstance(head, bytes):
            return head
        parsed = parse_response_head(head, self.limits.head_max_bytes)
        if parsed is None:
            self._resync(out, self.NOT_A_HEAD)
            return True
        del self.buf[: len(head)]
        status, headers = parsed
        if 100 <= status < 200 and status != 101:
            return True  # interim (100-continue, 103): the final head answers the request
        claimed = self.claim()
        method, exchange = claimed if claimed is not None else ("", None)
        msg = self.msg = Message(Request("", "", headers, "http/1.1"), status=status,
                                 exchange=exchange)
        out.heads.append(msg)
        if status == 101 or (method == "CONNECT" and 200 <= status < 300):
            self.state = H1_OPAQUE  # another protocol from here on
            self._done(out)
            return False
        if method == "HEAD" or status in (204, 304):
            self._done(out)
            return True
        if (_header(headers, "transfer-encoding") or "").lower().endswith("chunked"):
            self.state = H1_CHUNK_SIZE
            return True
        value = _header(headers, "content-length")
        if value is None:
            self.state = H1_TO_CLOSE
            return True
        try:
            length = int(value)
        except ValueError:
            length = -1
        if length < 0:
            self._resync(out, "http1_bad_length")
        elif length == 0:
            self._done(out)
        else:
            self.state, self.left = H1_BODY, length
        return True

    def _resync_search(self, out: ParseEvents) -> bool:
        """The next status line at a line start."""
        buf = self.buf
        m = _STATUS_AT_LINE.search(buf)
        if m is not None:
            del buf[: m.start()]
            self.state = H1_HEAD
            return True
        keep = min(len(buf), 16)
        del buf[: len(buf) - keep]
        return False


def _starts_h2_server(data: bytes) -> bool:
    """A server's first frame: SETTINGS on stream 0, a multiple of 6 bytes long."""
    length = int.from_bytes(data[:3], "big")
    return (data[3] == H2_SETTINGS and data[4] & ~0x1 == 0 and length % 6 == 0
            and int.from_bytes(data[5:9], "big") == 0 and length <= 1 << 14)


class ResponseStream:
    """The server's side of one connection: finds its protocol, then parses it."""

    def __init__(self, limits: ParserLimits, claim: Claim) -> None:
        self.limits = limits
        self.claim = claim
        self.parser: Http1ResponseStream | Http2Stream | None = None
        self._head = bytearray()
        self._gap_first = False  # bytes were lost before the protocol was known

    @property
    def protocol(self) -> str:
        return self.parser.protocol if self.parser is not None else "unknown"

    @property
    def buffered(self) -> int:
        return len(self._head) + (self.parser.buffered if self.parser is not None else 0)

    def feed(self, data: bytes, out: ParseEvents) -> None:
        if self.parser is None:
            self._head += data
            parser = self._sniff()
            if parser is None:
                return
            self.parser = parser
            data, self._head = bytes(self._head), bytearray()
        self.parser.feed(data, out)

    def _sniff(self) -> Http1ResponseStream | Http2Stream | None:
        head = bytes(self._head)
        if not self._gap_first:
            if head.startswith(b"HTTP/1."):
                return Http1ResponseStream(self.limits, self.claim)
            if len(head) < 7 and b"HTTP/1.".startswith(head):
                return None
        if len(head) < H2_FRAME_HEADER:
            return None
        if not self._gap_first and _starts_h2_server(head):
            return Http2Stream(self.limits, table_known=True, preface=False)
        if (head[3] <= 0x9 and int.from_bytes(head[:3], "big") <= 1 << 14
                and _STATUS_AT_LINE.search(head) is None):
            # joined mid-connection: frames, but this side's header table is unknown
            return Http2Stream(self.limits, table_known=False, preface=False)
        return Http1ResponseStream(self.limits, self.claim, in_sync=False)

    def gap(self, n: int, out: ParseEvents) -> None:
        if self.parser is None:
            self._head.clear()
            self._gap_first = True
            return
        self.parser.gap(n, out)

    def flush(self, out: ParseEvents) -> None:
        if self.parser is not None:
            self.parser.flush(out)
        self._head.clear()

    def spill(self, out: ParseEvents) -> int:
        return self.parser.spill(out) if self.parser is not None else 0

    def open_messages(self) -> list[Message]:
        return self.parser.open_messages() if self.parser is not None else []
