"""HTTP requests from the first bytes of each TLS write of one connection.

The kernel captures the first N bytes of every write together with the
write's full length, so a connection is followed write by write:

- HTTP/1.1: a write starting with a request line opens a request (method,
  target, headers); Content-Length says how many following bytes are its body.
- HTTP/2: the client preface starts the connection; frames are followed
  across writes by their lengths. HEADERS blocks are decoded with `hpack`
  while the connection's header table is known: every header block since the
  preface was seen whole. After a block was missed (truncated capture, probe
  attached mid-connection, rate-limited write) the table is unknown and later
  header blocks are reported as undecodable instead of guessed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import hpack

logger = logging.getLogger(__name__)
# hpack logs every decoded header, values included, at DEBUG: an agent run with
# debug logging would write bearer tokens to its log. Never below WARNING.
logging.getLogger("hpack").setLevel(logging.WARNING)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_REQUEST_LINE = re.compile(
    rb"(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS|TRACE|CONNECT|PROPFIND|MKCOL) ([^\s]+)"
    rb"(?: (HTTP/1\.[01]))?"
)
_METHOD_START = re.compile(rb"[A-Z]{3,10} ")
MAX_HEAD_BYTES = 65536
MAX_HEADERS = 256
H2_FRAME_HEADER = 9
H2_MAX_FRAME = 1 << 24
H2_DATA, H2_HEADERS, H2_CONTINUATION = 0x0, 0x1, 0x9
H2_END_HEADERS, H2_PADDED, H2_PRIORITY = 0x4, 0x8, 0x20
H2_STREAMS_MAX = 1024


@dataclass(slots=True)
class Request:
    """A request head as far as it was captured."""

    method: str
    path: str
    headers: list[tuple[str, str]]  # lower-case names, in order
    protocol: str  # http/1.1 | h2
    stream_id: int = 0
    complete: bool = True  # False: the head went on beyond the capture
    offset: int = 0  # of the head within its write
    _first: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for k, v in self.headers:
            self._first.setdefault(k, v)

    def header(self, name: str) -> str | None:
        return self._first.get(name)

    @property
    def host(self) -> str | None:
        value = self.header(":authority") or self.header("host")
        if not value:
            return None
        host = value.rsplit("@", 1)[-1]
        if host.startswith("["):
            return host[1 : host.find("]")] if "]" in host else None
        return host.split(":", 1)[0].lower() or None

    @property
    def content_type(self) -> str:
        return (self.header("content-type") or "").split(";", 1)[0].strip().lower()


@dataclass(slots=True)
class BodyChunk:
    """Captured body bytes of `request`, at `offset` within the write."""

    request: Request
    data: bytes
    offset: int
    body_offset: int  # of data[0] within the request body


@dataclass(slots=True)
class Parsed:
    """What one write contained."""

    requests: list[Request] = field(default_factory=list)
    bodies: list[BodyChunk] = field(default_factory=list)
    protocol: str = "unknown"  # http/1.1 | h2 | opaque | unknown
    undecodable_headers: int = 0  # HTTP/2 header blocks whose table is unknown


def parse_request_head(data: bytes, start: int = 0) -> tuple[Request, int] | None:
    """(request, end of head) for a head starting at data[start]; end is -1 when
    the blank line after the headers lies beyond the capture."""
    m = _REQUEST_LINE.match(data, start)
    if m is None:
        return None
    end = data.find(b"\r\n\r\n", start, start + MAX_HEAD_BYTES)
    head_end = end + 4 if end >= 0 else -1
    block = data[start : end if end >= 0 else start + MAX_HEAD_BYTES]
    lines = block.split(b"\r\n")
    complete_line = len(lines) > 1 or end >= 0
    headers: list[tuple[str, str]] = []
    # the last line of an incomplete head may be cut: keep it out
    for raw in lines[1 : len(lines) if end >= 0 else -1][:MAX_HEADERS]:
        name, sep, value = raw.partition(b":")
        if sep and name and b" " not in name:
            headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
    request = Request(
        method=m.group(1).decode(),
        path=m.group(2).decode("latin-1"),
        headers=headers,
        protocol="http/1.1",
        complete=head_end >= 0 and complete_line,
        offset=start,
    )
    return request, head_end


def looks_like_request_line(data: bytes, start: int = 0) -> bool:
    return _METHOD_START.match(data, start) is not None and _REQUEST_LINE.match(
        data, start) is not None


@dataclass(slots=True)
class _Http1:
    request: Request | None = None
    body_left: int | None = 0  # None: unknown length (chunked), until the next request
    body_seen: int = 0


@dataclass(slots=True)
class _Http2:
    decoder: hpack.Decoder
    table_known: bool = True
    frame_left: int = 0  # payload bytes of the current frame still to come
    frame_type: int = -1
    frame_stream: int = 0
    partial_header: bytes = b""  # a frame header split across two writes
    block: bytearray = field(default_factory=bytearray)  # HEADERS awaiting CONTINUATION
    block_stream: int = 0
    streams: dict[int, Request] = field(default_factory=dict)
    body_seen: dict[int, int] = field(default_factory=dict)


class HttpConnection:
    """Follows one TLS connection's writes (client to server)."""

    def __init__(self) -> None:
        self.protocol = "unknown"
        self._h1 = _Http1()
        self._h2: _Http2 | None = None

    def feed(self, data: bytes, total_len: int) -> Parsed:
        """Parse one write: `data` is its captured prefix, `total_len` its length."""
        total_len = max(total_len, len(data))
        if self.protocol == "unknown":
            if data.startswith(H2_PREFACE):
                self._start_h2(table_known=True)
                out = Parsed(protocol="h2")
                self._feed_h2(data, total_len, len(H2_PREFACE), out)
                return out
            if looks_like_request_line(data):
                self.protocol = "http/1.1"
            elif _plausible_h2_frame(data):
                # probe attached mid-connection: frames, but no header table
                self._start_h2(table_known=False)
            else:
                return Parsed(protocol="opaque")
        out = Parsed(protocol=self.protocol)
        if self.protocol == "h2":
            self._feed_h2(data, total_len, 0, out)
        else:
            self._feed_h1(data, total_len, out)
        return out

    # -- HTTP/1.1 -------------------------------------------------------------------

    def _feed_h1(self, data: bytes, total_len: int, out: Parsed) -> None:
        st = self._h1
        pos = 0
        while pos < total_len:
            if st.body_left and st.request is not None:
                take = min(st.body_left, total_len - pos)
                if pos < len(data):
                    out.bodies.append(BodyChunk(st.request, data[pos : pos + take], pos,
                                                st.body_seen))
                st.body_left -= take
                st.body_seen += take
                pos += take
                continue
            if pos >= len(data):
                return  # beyond the capture: nothing to see, lengths unknown
            if looks_like_request_line(data, pos):
                parsed = parse_request_head(data, pos)
                assert parsed is not None
                request, head_end = parsed
                out.requests.append(request)
                st.request, st.body_seen = request, 0
                if head_end < 0:
                    # the rest of this write is head; its body length is unknown
                    st.body_left = 0
                    return
                st.body_left = _content_length(request)
                pos = head_end
                if st.body_left == 0:
                    continue
                if st.body_left is None:
                    if pos < len(data):
                        out.bodies.append(BodyChunk(request, data[pos:], pos, 0))
                        st.body_seen = total_len - pos
                    return
                continue
            if st.request is not None and st.body_left is None:
                # chunked or unknown length: the write continues the body
                out.bodies.append(BodyChunk(st.request, data[pos:], pos, st.body_seen))
                st.body_seen += total_len - pos
            return

    # -- HTTP/2 ---------------------------------------------------------------------

    def _start_h2(self, table_known: bool) -> None:
        self.protocol = "h2"
        decoder = hpack.Decoder()
        # the server's SETTINGS may allow a larger table than the default
        decoder.max_allowed_table_size = 1 << 16
        decoder.max_header_list_size = 1 << 18
        self._h2 = _Http2(decoder=decoder, table_known=table_known)

    def _feed_h2(self, data: bytes, total_len: int, pos: int, out: Parsed) -> None:
        st = self._h2
        assert st is not None
        if st.partial_header:
            # offsets then count the carried bytes too; they are evidence only
            data = st.partial_header + data
            total_len += len(st.partial_header)
            pos = 0
            st.partial_header = b""
            if len(data) < H2_FRAME_HEADER:
                st.partial_header = data if total_len == len(data) else b""
                return
        while pos < total_len:
            if st.frame_left:
                take = min(st.frame_left, total_len - pos)
                if st.frame_type == H2_DATA and pos < len(data):
                    self._h2_data(st, data[pos : pos + take], pos, out)
                elif st.frame_type in (H2_HEADERS, H2_CONTINUATION):
                    self._lose_table(st, "header block split across writes")
                st.frame_left -= take
                pos += take
                continue
            if pos + H2_FRAME_HEADER > len(data):
                if len(data) == total_len:
                    st.partial_header = data[pos:]  # the header continues in the next write
                else:
                    # a frame header beyond the capture: it may have been a header
                    # block; resynchronise on the next write
                    self._lose_table(st, "frame header beyond the capture")
                return
            length = int.from_bytes(data[pos : pos + 3], "big")
            ftype, flags = data[pos + 3], data[pos + 4]
            stream = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            if length >= H2_MAX_FRAME or ftype > 0x10:
                self._lose_table(st, "not an HTTP/2 frame")
                return
            pos += H2_FRAME_HEADER
            payload = data[pos : pos + length]
            whole = len(payload) == length
            if ftype in (H2_HEADERS, H2_CONTINUATION):
                if whole:
                    self._h2_headers(st, ftype, flags, stream, payload, pos, out)
                else:
                    self._lose_table(st, "header block beyond the capture")
                    out.undecodable_headers += 1
            elif ftype == H2_DATA and payload:
                self._h2_data_frame(st, flags, stream, payload, pos, out)
            st.frame_type, st.frame_stream = ftype, stream
            consumed = min(length, total_len - pos)
            st.frame_left = length - consumed
            pos += consumed

    @staticmethod
    def _lose_table(st: _Http2, why: str) -> None:
        if st.table_known:
            logger.debug("HTTP/2 header table lost: %s", why)
        st.table_known = False
        st.block.clear()

    def _h2_headers(self, st: _Http2, ftype: int, flags: int, stream: int, payload: bytes,
                    pos: int, out: Parsed) -> None:
        if ftype == H2_HEADERS:
            start, end = 0, len(payload)
            if flags & H2_PADDED:
                if not payload:
                    return
                start, end = 1, len(payload) - payload[0]
            if flags & H2_PRIORITY:
                start += 5
            if end < start:
                self._lose_table(st, "bad padding")
                return
            st.block = bytearray(payload[start:end])
            st.block_stream = stream
        else:
            if stream != st.block_stream:
                self._lose_table(st, "CONTINUATION of another stream")
                return
            st.block += payload
        if not flags & H2_END_HEADERS:
            return
        block, st.block = bytes(st.block), bytearray()
        if not st.table_known:
            out.undecodable_headers += 1
            return
        try:
            headers = st.decoder.decode(block, raw=True)
        except Exception as e:  # noqa: BLE001 - any HPACK error leaves the table unknown
            self._lose_table(st, f"HPACK: {type(e).__name__}")
            out.undecodable_headers += 1
            return
        decoded = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers]
        pseudo = dict(h for h in decoded if h[0].startswith(":"))
        if ":method" not in pseudo:
            return  # trailers
        request = Request(
            method=pseudo[":method"], path=pseudo.get(":path", ""), headers=decoded,
            protocol="h2", stream_id=stream, offset=pos,
        )
        if len(st.streams) >= H2_STREAMS_MAX:
            st.streams.pop(next(iter(st.streams)))
            st.body_seen.clear()
        st.streams[stream] = request
        st.body_seen[stream] = 0
        out.requests.append(request)

    def _h2_data_frame(self, st: _Http2, flags: int, stream: int, payload: bytes, pos: int,
                       out: Parsed) -> None:
        if flags & H2_PADDED and payload:
            pad = payload[0]
            payload, pos = payload[1:], pos + 1
            # padding is only at the very end; a truncated payload keeps all data
            if len(payload) > pad:
                payload = payload[: len(payload) - pad] if pad else payload
        st.frame_stream = stream
        self._h2_data(st, payload, pos, out, stream)

    def _h2_data(self, st: _Http2, payload: bytes, pos: int, out: Parsed,
                 stream: int | None = None) -> None:
        sid = st.frame_stream if stream is None else stream
        request = st.streams.get(sid)
        if request is None:
            request = Request("?", "?", [], "h2", sid, complete=False)
        seen = st.body_seen.get(sid, 0)
        out.bodies.append(BodyChunk(request, payload, pos, seen))
        st.body_seen[sid] = seen + len(payload)


def _content_length(request: Request) -> int | None:
    if (request.header("transfer-encoding") or "").lower().endswith("chunked"):
        return None
    value = request.header("content-length")
    if value is None:
        # a request without a length has no body (RFC 9112 6.3), unless chunked
        return 0
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 0 else None


def _plausible_h2_frame(data: bytes) -> bool:
    if len(data) < H2_FRAME_HEADER:
        return False
    length = int.from_bytes(data[:3], "big")
    return data[3] <= 0x9 and length <= 1 << 14 and (
        length + H2_FRAME_HEADER <= len(data) or len(data) >= 4096)
