"""HTTP requests from one direction of a connection's byte stream, parsed incrementally.

`HttpStream` is fed the stream's bytes in order and told about gaps of known
size; it finds the protocol from the first bytes and hands over what
completes: request heads (`ParseEvents.heads`), bodies at their end
(`done`) or, past `ParserLimits.body_window_bytes`, in windows that overlap
(`windows`), and bytes no message holds (`raw`, scanned as they are).

- HTTP/1.1: Content-Length and chunked framing (de-chunked here). After a gap
  inside a body of known length the parser stays in step; after any other gap,
  and on a stream joined mid-message, it looks for the next request line.
- HTTP/2: frames followed by their lengths, DATA joined per stream until
  END_STREAM, header blocks decoded with `hpack` while the connection's table is
  known. A gap inside a DATA (or other non-header) payload keeps the frame
  boundaries; a gap inside a header block loses the table (reported, later
  blocks undecodable rather than guessed); any other gap loses the frame
  boundaries and the rest of the connection is scanned raw (reported).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

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
class Message:
    """One request (or, on a server's side of a connection, one response: `status`
    set, `request` holding the response's headers): its head, and its body as far
    as it is held (bounded).

    `body` holds the body bytes from `body_base` on; when the body outgrows the
    parser's bound, the held bytes are handed out as a window and only an
    overlap is kept, so a value across the cut is still seen whole.
    """

    request: Request
    body: bytearray = field(default_factory=bytearray)
    body_base: int = 0  # body offset of body[0]
    body_len: int = 0  # body bytes written so far (seen or lost)
    body_lost: int = 0  # body bytes in gaps
    complete: bool = False  # the end of the message was seen
    windows: int = 0  # windows handed out before the end
    bulk_done: bool = False
    reported: set[str] = field(default_factory=set)  # canary hashes already reported
    # a windowed body's Content-Encoding undone across windows (inspector-owned state)
    decoder: Any = None
    decoded_upto: int = 0  # body offset up to which the raw bytes were decoded
    decoded_tail: bytes = b""  # decoded overlap carried to the next window
    status: int | None = None  # a response's final HTTP status; None for a request
    exchange: Any = None  # the request/response pairing's state (inspector-owned)


@dataclass(slots=True)
class ParseEvents:
    """What feeding bytes (or a gap) to a stream parser produced."""

    heads: list[Message] = field(default_factory=list)  # heads complete (credentials)
    # body over the bound: (message, bytes, body offset of bytes[0])
    windows: list[tuple[Message, bytes, int]] = field(default_factory=list)
    done: list[Message] = field(default_factory=list)  # ended (or flushed, complete=False)
    raw: list[bytes] = field(default_factory=list)  # bytes no message holds: scanned raw
    blind: list[tuple[str, int]] = field(default_factory=list)  # (reason, bytes) sync lost
    undecodable_headers: int = 0
    spilled: int = 0  # windows handed out early to keep memory within the total bound


@dataclass(frozen=True, slots=True)
class ParserLimits:
    body_window_bytes: int = 1 << 20  # body bytes held per message before a window
    overlap_bytes: int = 512  # kept across windows and raw scans
    head_max_bytes: int = MAX_HEAD_BYTES
    header_block_max_bytes: int = 1 << 18  # one HTTP/2 header block
    streams_max: int = H2_STREAMS_MAX


def _start_body(msg: Message, data: bytes | bytearray, limits: ParserLimits,
                out: ParseEvents) -> None:
    """Append body bytes to msg, handing out a window when the bound is reached."""
    msg.body_len += len(data)
    msg.body += data
    if len(msg.body) >= limits.body_window_bytes:
        window_out(msg, limits.overlap_bytes, out)


def window_out(msg: Message, overlap: int, out: ParseEvents) -> None:
    """Hand out the held body as a window; keep only the overlap."""
    if len(msg.body) <= overlap:
        return
    out.windows.append((msg, bytes(msg.body), msg.body_base))
    msg.windows += 1
    keep = msg.body[-overlap:] if overlap else bytearray()
    msg.body_base += len(msg.body) - len(keep)
    msg.body = bytearray(keep)


def _hole(msg: Message, n: int, out: ParseEvents) -> None:
    """`n` body bytes lost: what is held is handed out whole, nothing spans the hole."""
    if msg.body:
        window_out(msg, 0, out)
    msg.body_lost += n
    msg.body_len += n
    msg.body_base += n


# a whole request line: after a body the next request follows without a line break
_REQUEST_AT_LINE = re.compile(
    rb"((?:GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS|TRACE|CONNECT|PROPFIND|MKCOL) "
    rb"[^\s]+ HTTP/1\.[01]\r\n)")
_VERSION_AT = b" HTTP/1."
_METHOD_MAX = len(b"PROPFIND")


def find_request_line(buf: bytes | bytearray) -> re.Match[bytes] | None:
    """_REQUEST_AT_LINE.search(buf), found from its literal " HTTP/1." instead of trying
    the method alternation at every byte (~50 us per 4 KiB of an opaque stream).

    A match ends at the first " HTTP/1." it contains; its target is the space-free run
    before it, so it starts within _METHOD_MAX bytes of the last space before that."""
    at = buf.find(_VERSION_AT)
    while at >= 0:
        space = buf.rfind(b" ", 0, at)
        if space >= 0:
            m = _REQUEST_AT_LINE.search(buf, max(0, space - _METHOD_MAX),
                                        at + len(_VERSION_AT) + 3)
            if m is not None:
                return m
        at = buf.find(_VERSION_AT, at + 1)
    return None


# HTTP/1.1 parser states; TO_CLOSE and OPAQUE occur on the response side only
(H1_HEAD, H1_BODY, H1_CHUNK_SIZE, H1_CHUNK_DATA, H1_CHUNK_END, H1_TRAILER, H1_TO_CLOSE,
 H1_OPAQUE, H1_RESYNC) = range(9)
CHUNK_LINE_MAX = 1024


class Http1Framing:
    """One direction of an HTTP/1.1 connection, fed in order: the message framing both
    directions share (Content-Length and chunked bodies, trailers, gaps, windows).

    Subclasses parse their heads (`_head`, which sets `msg` and the body framing),
    find where to start again after a resynchronisation (`_resync_search`), and say
    what bytes outside messages are worth (`_raw`)."""

    HEAD_OVER_BOUND = "http1_head_over_bound"
    RESYNC_AFTER_GAP = "http1_resync_after_gap"
    NOT_A_HEAD = "http1_not_a_request"
    SNIFF_BYTES = 16  # this much of a head without its end is enough to tell it is none

    def __init__(self, limits: ParserLimits, in_sync: bool = True) -> None:
        self.limits = limits
        self.buf = bytearray()
        self.state = H1_HEAD if in_sync else H1_RESYNC
        self.left = 0  # body or chunk bytes still to come
        self.msg: Message | None = None

    @property
    def buffered(self) -> int:
        return len(self.buf) + (len(self.msg.body) if self.msg is not None else 0)

    def open_messages(self) -> list[Message]:
        return [self.msg] if self.msg is not None else []

    def feed(self, data: bytes, out: ParseEvents) -> None:
        if self.state == H1_OPAQUE:
            return
        self.buf += data
        while self.buf and self._step(out):
            pass

    # -- what the two directions do differently ---------------------------------------

    def _head(self, out: ParseEvents) -> bool:
        raise NotImplementedError

    def _starts_like_head(self, buf: bytearray) -> bool:
        raise NotImplementedError

    def _resync_search(self, out: ParseEvents) -> bool:
        raise NotImplementedError

    def _raw(self, out: ParseEvents, data: bytes) -> None:
        """Bytes that belong to no message (scanned raw on the request side)."""

    # -- framing ------------------------------------------------------------------------

    def _head_bytes(self, out: ParseEvents) -> bytes | bool:
        """The complete head in front of the buffer (left there: `_head` removes it once
        it parses), or what `_step` returns instead: True after a resynchronisation (a
        head over the bound, or bytes that start no head), False to wait for more."""
        buf = self.buf
        while buf[:2] == b"\r\n":
            del buf[:2]
        if not buf:
            return False
        end = buf.find(b"\r\n\r\n", 0, self.limits.head_max_bytes + 4)
        if end >= 0:
            return bytes(buf[: end + 4])
        if len(buf) > self.limits.head_max_bytes:
            self._resync(out, self.HEAD_OVER_BOUND, len(buf))
            return True
        if len(buf) >= self.SNIFF_BYTES and not self._starts_like_head(buf):
            self._resync(out, self.NOT_A_HEAD)
            return True
        return False

    def _done(self, out: ParseEvents, complete: bool = True) -> None:
        if self.msg is not None:
            self.msg.complete = complete and not self.msg.body_lost
            out.done.append(self.msg)
        self.msg = None
        if self.state != H1_OPAQUE:
            self.state = H1_HEAD

    def _resync(self, out: ParseEvents, why: str, nbytes: int = 0) -> None:
        if self.msg is not None:
            self._done(out, complete=False)
        out.blind.append((why, nbytes))
        if self.state == H1_HEAD and self.buf:
            # the head in front failed: look for the next one after its start
            self._raw(out, bytes(self.buf[:1]))
            del self.buf[:1]
        self.state = H1_RESYNC

    def _body(self, out: ParseEvents, take: int) -> None:
        assert self.msg is not None
        _start_body(self.msg, self.buf[:take], self.limits, out)
        del self.buf[:take]

    def _step(self, out: ParseEvents) -> bool:  # noqa: PLR0911 - one branch per state
        buf, st = self.buf, self.state
        if st == H1_HEAD:
            return self._head(out)
        if st in (H1_BODY, H1_CHUNK_DATA):
            take = min(self.left, len(buf))
            self._body(out, take)
            self.left -= take
            if self.left == 0:
                if st == H1_BODY:
                    self._done(out)
                else:
                    self.state = H1_CHUNK_END
            return True
        if st == H1_TO_CLOSE:
            self._body(out, len(buf))
            return False
        if st == H1_CHUNK_SIZE:
            end = buf.find(b"\r\n", 0, CHUNK_LINE_MAX)
            if end < 0:
                if len(buf) > CHUNK_LINE_MAX:
                    self._resync(out, "http1_bad_chunk")
                    return True
                return False
            try:
                size = int(bytes(buf[:end]).split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._resync(out, "http1_bad_chunk")
                return True
            del buf[: end + 2]
            if size == 0:
                self.state = H1_TRAILER
            else:
                self.state, self.left = H1_CHUNK_DATA, size
            return True
        if st == H1_CHUNK_END:
            if len(buf) < 2:
                return False
            if buf[:2] != b"\r\n":
                self._resync(out, "http1_bad_chunk")
                return True
            del buf[:2]
            self.state = H1_CHUNK_SIZE
            return True
        if st == H1_TRAILER:
            if buf[:2] == b"\r\n":
                del buf[:2]
                self._done(out)
                return True
            end = buf.find(b"\r\n\r\n", 0, self.limits.head_max_bytes)
            if end < 0:
                if len(buf) > self.limits.head_max_bytes:
                    self._resync(out, self.HEAD_OVER_BOUND, len(buf))
                    return True
                return False
            del buf[: end + 4]
            self._done(out)
            return True
        if st == H1_RESYNC:
            return self._resync_search(out)
        self.buf.clear()  # opaque: another protocol
        return False

    def gap(self, n: int, out: ParseEvents) -> None:
        """`n` bytes of the stream were not seen."""
        if self.state == H1_OPAQUE:
            return
        if self.msg is not None and not self.buf and (
                self.state == H1_TO_CLOSE
                or (self.state in (H1_BODY, H1_CHUNK_DATA) and n <= self.left)):
            # a hole inside a body: the framing stays in step
            _hole(self.msg, n, out)
            if self.state == H1_TO_CLOSE:
                return
            self.left -= n
            if self.left == 0:
                if self.state == H1_BODY:
                    self._done(out, complete=False)
                else:
                    self.state = H1_CHUNK_END
            return
        if self.buf:
            self._raw(out, bytes(self.buf))
            self.buf.clear()
        self._resync(out, self.RESYNC_AFTER_GAP, n)

    def flush(self, out: ParseEvents) -> None:
        """The connection ended: only a body read to its close is complete."""
        if self.buf:
            self._raw(out, bytes(self.buf))
            self.buf.clear()
        if self.msg is not None:
            self._done(out, complete=self.state == H1_TO_CLOSE)

    def spill(self, out: ParseEvents) -> int:
        if self.msg is None or len(self.msg.body) <= self.limits.overlap_bytes:
            return 0
        before = len(self.msg.body)
        window_out(self.msg, self.limits.overlap_bytes, out)
        out.spilled += 1
        return before - len(self.msg.body)


class Http1Stream(Http1Framing):
    """HTTP/1.1 requests from one direction of one connection, fed in order.

    Bodies follow Content-Length or chunked framing (de-chunked here). After a
    gap inside a body of known length the parser stays in step; after any other
    gap it looks for the next request line (and reports the resynchronisation).
    """

    def __init__(self, limits: ParserLimits, in_sync: bool = True) -> None:
        super().__init__(limits, in_sync)
        # opaque until a request line is found (a stream joined mid-message, or not HTTP)
        self.protocol = "http/1.1" if in_sync else "opaque"

    def _raw(self, out: ParseEvents, data: bytes) -> None:
        out.raw.append(data)

    def _starts_like_head(self, buf: bytearray) -> bool:
        return looks_like_request_line(bytes(buf[:64]))

    def _head(self, out: ParseEvents) -> bool:
        head = self._head_bytes(out)
        if not isinstance(head, bytes):
            return head
        parsed = parse_request_head(head)
        if parsed is None:
            self._resync(out, self.NOT_A_HEAD)
            return True
        request, _ = parsed
        del self.buf[: len(head)]
        self.msg = Message(request)
        out.heads.append(self.msg)
        self.protocol = "http/1.1"
        length = _content_length(request)
        if length is None:
            self.state = H1_CHUNK_SIZE if _chunked(request) else H1_RESYNC
            if self.state == H1_RESYNC:  # a body of unknown length
                self._resync(out, "http1_unknown_length")
        elif length == 0:
            self._done(out)
        else:
            self.state, self.left = H1_BODY, length
        return True

    def _resync_search(self, out: ParseEvents) -> bool:
        """The next request line at a line start; bytes before it are raw."""
        buf = self.buf
        m = find_request_line(buf)
        if m is not None:
            if m.start(1):
                out.raw.append(bytes(buf[: m.start(1)]))
            del buf[: m.start(1)]
            self.state = H1_HEAD
            return True
        keep = min(len(buf), self.limits.head_max_bytes // 8)
        if len(buf) > keep:
            out.raw.append(bytes(buf[: len(buf) - keep]))
            del buf[: len(buf) - keep]
        return False


_F_HEAD, _F_PAD_LEN, _F_DATA, _F_PAD, _F_PAYLOAD, _F_SKIP, _F_BLIND = range(7)
H2_END_STREAM = 0x1


class Http2Stream:
    """HTTP/2 requests from the client side of one connection, fed in order.

    Frames are followed by their lengths; DATA payloads are joined per stream
    into the stream's message (ended by END_STREAM); header blocks are decoded
    with the connection's HPACK table while it is known. A gap inside a DATA (or
    other non-header) payload keeps the frame boundaries; a gap inside a header
    block loses the table (reported); any other gap loses the frame boundaries,
    and the connection is blind from there on (reported, scanned raw).
    """

    protocol = "h2"

    def __init__(self, limits: ParserLimits, table_known: bool, preface: bool) -> None:
        self.limits = limits
        self.buf = bytearray()
        self.preface_left = len(H2_PREFACE) if preface else 0
        decoder = hpack.Decoder()
        # the server's SETTINGS may allow a larger table than the default
        decoder.max_allowed_table_size = 1 << 16
        decoder.max_header_list_size = 1 << 18
        self.decoder = decoder
        self.table_known = table_known
        self.attached_mid_connection = not table_known
        self.state = _F_HEAD
        self.ftype = self.flags = self.stream = 0
        self.left = 0  # of the current state's bytes
        self.pad_left = 0
        self.block = bytearray()
        self.block_stream = 0
        self.messages: dict[int, Message] = {}

    @property
    def buffered(self) -> int:
        return len(self.buf) + len(self.block) + sum(len(m.body) for m in self.messages.values())

    def open_messages(self) -> list[Message]:
        return list(self.messages.values())

    def feed(self, data: bytes, out: ParseEvents) -> None:
        if self.state == _F_BLIND:
            out.raw.append(data)
            return
        self.buf += data
        if self.preface_left:
            take = min(self.preface_left, len(self.buf))
            del self.buf[:take]
            self.preface_left -= take
        while self.buf and self._step(out):
            pass

    def _lose_table(self, out: ParseEvents, why: str, nbytes: int = 0) -> None:
        if self.table_known:
            logger.debug("HTTP/2 header table lost: %s", why)
            out.blind.append(("h2_header_table_lost", nbytes))
        self.table_known = False
        self.block.clear()

    def _blind(self, out: ParseEvents, why: str, nbytes: int = 0) -> None:
        out.blind.append((why, nbytes))
        self.table_known = False
        self.state = _F_BLIND
        if self.buf:
            out.raw.append(bytes(self.buf))
            self.buf.clear()
        for sid in list(self.messages):
            self._end(sid, out, complete=False)

    def _message(self, sid: int) -> Message:
        msg = self.messages.get(sid)
        if msg is None:
            msg = Message(Request("?", "?", [], "h2", sid, complete=False))
            self._add(sid, msg, None)
        return msg

    def _add(self, sid: int, msg: Message, out: ParseEvents | None) -> None:
        if len(self.messages) >= self.limits.streams_max:
            oldest = next(iter(self.messages))
            old = self.messages.pop(oldest)
            if out is not None:
                old.complete = False
                out.done.append(old)
        self.messages[sid] = msg

    def _end(self, sid: int, out: ParseEvents, complete: bool = True) -> None:
        msg = self.messages.pop(sid, None)
        if msg is not None:
            msg.complete = complete and not msg.body_lost and msg.request.method != "?"
            out.done.append(msg)

    def _step(self, out: ParseEvents) -> bool:  # noqa: PLR0911 - one branch per state
        buf = self.buf
        if self.state == _F_HEAD:
            if len(buf) < H2_FRAME_HEADER:
                return False
            length = int.from_bytes(buf[:3], "big")
            self.ftype, self.flags = buf[3], buf[4]
            self.stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            if length >= H2_MAX_FRAME or self.ftype > 0x10:
                self._blind(out, "h2_frame_sync_lost")
                return False
            del buf[:H2_FRAME_HEADER]
            self.left = length
            if self.ftype == H2_DATA:
                self.state = _F_PAD_LEN if self.flags & H2_PADDED else _F_DATA
                if self.stream not in self.messages:
                    self._message(self.stream)
            elif self.ftype in (H2_HEADERS, H2_CONTINUATION):
                if length > self.limits.header_block_max_bytes:
                    self._lose_table(out, "header block over the bound", length)
                    out.undecodable_headers += 1
                    self.state = _F_SKIP
                else:
                    self.state = _F_PAYLOAD
            else:
                self.state = _F_SKIP
            if self.left == 0:
                self._frame_end(b"" if self.state == _F_PAYLOAD else None, out)
            return True
        if self.state == _F_PAD_LEN:
            self.pad_left = buf[0]
            del buf[:1]
            self.left -= 1
            if self.pad_left > self.left:
                self._blind(out, "h2_frame_sync_lost")
                return False
            self.left -= self.pad_left
            self.state = _F_DATA
            if self.left == 0:
                self.state = _F_PAD if self.pad_left else _F_HEAD
                if not self.pad_left:
                    self._frame_end(None, out)
            return True
        if self.state == _F_DATA:
            take = min(self.left, len(buf))
            _start_body(self._message(self.stream), buf[:take], self.limits, out)
            del buf[:take]
            self.left -= take
            if self.left == 0:
                if self.pad_left:
                    self.state, self.left = _F_PAD, self.pad_left
                else:
                    self._frame_end(None, out)
            return True
        if self.state in (_F_PAD, _F_SKIP):
            take = min(self.left, len(buf))
            del buf[:take]
            self.left -= take
            if self.left == 0:
                self._frame_end(None, out)
            return True
        if self.state == _F_PAYLOAD:
            if len(buf) < self.left:
                return False
            payload = bytes(buf[: self.left])
            del buf[: self.left]
            self.left = 0
            self._frame_end(payload, out)
            return True
        return False

    def _frame_end(self, payload: bytes | None, out: ParseEvents) -> None:
        """The current frame ended; `payload` is a header frame's whole payload."""
        ftype, flags, sid = self.ftype, self.flags, self.stream
        self.state = _F_HEAD
        if payload is not None:
            self._header_frame(ftype, flags, sid, payload, out)
        if ftype in (H2_DATA, H2_HEADERS) and flags & H2_END_STREAM:
            if ftype == H2_HEADERS and not flags & H2_END_HEADERS:
                return  # END_STREAM takes effect after the CONTINUATIONs
            self._end(sid, out)
        elif ftype == H2_CONTINUATION and flags & H2_END_HEADERS and self._ends_stream:
            self._end(sid, out)

    _ends_stream = False

    def _header_frame(self, ftype: int, flags: int, sid: int, payload: bytes,
                      out: ParseEvents) -> None:
        if ftype == H2_HEADERS:
            start, end = 0, len(payload)
            if flags & H2_PADDED:
                if not payload:
                    return
                start, end = 1, len(payload) - payload[0]
            if flags & H2_PRIORITY:
                start += 5
            if end < start:
                self._lose_table(out, "bad padding")
                return
            self.block = bytearray(payload[start:end])
            self.block_stream = sid
            self._ends_stream = bool(flags & H2_END_STREAM)
        else:
            if sid != self.block_stream:
                self._lose_table(out, "CONTINUATION of another stream")
                return
            self.block += payload
            if len(self.block) > self.limits.header_block_max_bytes:
                self._lose_table(out, "header block over the bound", len(self.block))
                return
        if not flags & H2_END_HEADERS:
            return
        block, self.block = bytes(self.block), bytearray()
        if not self.table_known:
            out.undecodable_headers += 1
            out.raw.append(block)  # literal, non-Huffman values can still be matched
            self._message(sid)
            return
        try:
            headers = self.decoder.decode(block, raw=True)
        except Exception as e:  # noqa: BLE001 - any HPACK error leaves the table unknown
            self._lose_table(out, f"HPACK: {type(e).__name__}")
            out.undecodable_headers += 1
            return
        decoded = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers]
        pseudo = dict(h for h in decoded if h[0].startswith(":"))
        if ":status" in pseudo and ":method" not in pseudo:
            self._response_head(sid, decoded, pseudo[":status"], out)
            return
        if ":method" not in pseudo:
            return  # trailers
        request = Request(
            method=pseudo[":method"], path=pseudo.get(":path", ""), headers=decoded,
            protocol="h2", stream_id=sid,
        )
        msg = self.messages.get(sid)
        if msg is not None and msg.request.method == "?":
            msg.request = request  # DATA came first (cannot happen in valid HTTP/2)
        else:
            msg = Message(request)
            self._add(sid, msg, out)
        out.heads.append(msg)

    def _response_head(self, sid: int, headers: list[tuple[str, str]], status: str,
                       out: ParseEvents) -> None:
        """A response's head (the server's side of the connection, with its own HPACK
        table); 1xx heads are interim: the final one follows on the same stream."""
        try:
            code = int(status)
        except ValueError:
            return
        if 100 <= code < 200:
            return
        msg = Message(Request("", "", headers, "h2", sid), status=code)
        self._add(sid, msg, out)
        out.heads.append(msg)

    def gap(self, n: int, out: ParseEvents) -> None:
        """`n` bytes of the stream were not seen."""
        if self.state == _F_BLIND:
            return
        if self.preface_left >= n and not self.buf:
            self.preface_left -= n
            return
        if not self.buf and self.state in (_F_DATA, _F_PAD, _F_SKIP) and n <= (
                self.left + (self.pad_left if self.state == _F_DATA else 0)):
            if self.state == _F_DATA:
                msg = self._message(self.stream)
                in_data = min(n, self.left)
                _hole(msg, in_data, out)
                self.left -= in_data
                rest = n - in_data
                if self.left == 0:
                    if self.pad_left:
                        self.state, self.left = _F_PAD, self.pad_left - rest
                        if self.left == 0:
                            self._frame_end(None, out)
                    else:
                        self._frame_end(None, out)
                return
            self.left -= n
            if self.left == 0:
                self._frame_end(None, out)
            return
        if self.state == _F_PAYLOAD and n <= self.left - len(self.buf):
            # inside a header block: the frame boundary is kept, the table is not
            self._lose_table(out, "header block in a gap", n)
            out.undecodable_headers += 1
            self.left -= len(self.buf) + n
            self.buf.clear()
            self.state = _F_SKIP
            if self.left == 0:
                self._frame_end(None, out)
            return
        self._blind(out, "h2_frame_sync_lost", n)

    def flush(self, out: ParseEvents) -> None:
        for sid in list(self.messages):
            self._end(sid, out, complete=False)

    def spill(self, out: ParseEvents) -> int:
        freed = 0
        for msg in self.messages.values():
            if len(msg.body) > self.limits.overlap_bytes:
                before = len(msg.body)
                window_out(msg, self.limits.overlap_bytes, out)
                out.spilled += 1
                freed += before - len(msg.body)
        return freed


PROTOCOL_SNIFF_BYTES = len(H2_PREFACE)


class HttpStream:
    """One direction of one connection: finds its protocol, then parses it."""

    def __init__(self, limits: ParserLimits | None = None) -> None:
        self.limits = limits or ParserLimits()
        self.parser: Http1Stream | Http2Stream | None = None
        self._head = bytearray()  # bytes before the protocol is known

    @property
    def protocol(self) -> str:
        return self.parser.protocol if self.parser is not None else "unknown"

    @property
    def buffered(self) -> int:
        return len(self._head) + (self.parser.buffered if self.parser is not None else 0)

    def feed(self, data: bytes, out: ParseEvents) -> None:
        if self.parser is None:
            self._head += data
            parser = self._sniff(out)
            if parser is None:
                return
            self.parser = parser
            data, self._head = bytes(self._head), bytearray()
        self.parser.feed(data, out)

    def _sniff(self, out: ParseEvents) -> Http1Stream | Http2Stream | None:
        head = bytes(self._head)
        if head.startswith(H2_PREFACE):
            return Http2Stream(self.limits, table_known=True, preface=True)
        if len(head) < PROTOCOL_SNIFF_BYTES and H2_PREFACE.startswith(head):
            return None
        if looks_like_request_line(head):
            return Http1Stream(self.limits)
        if len(head) < PROTOCOL_SNIFF_BYTES and b"\r\n" not in head and (
                _METHOD_PREFIX.fullmatch(head)):
            return None
        if _plausible_h2_frame(head):
            # attached mid-connection (or after a gap): frames, but no header table
            return Http2Stream(self.limits, table_known=False, preface=False)
        if len(head) < H2_FRAME_HEADER:
            return None
        # joined mid-message (an agent restart, a lost head) or not HTTP: every byte is
        # scanned raw until a request line shows where the next message starts
        return Http1Stream(self.limits, in_sync=False)

    def gap(self, n: int, out: ParseEvents) -> None:
        if self.parser is None:
            if self._head:
                out.raw.append(bytes(self._head))
                self._head.clear()
            return
        self.parser.gap(n, out)

    def flush(self, out: ParseEvents) -> None:
        if self.parser is None:
            if self._head:
                out.raw.append(bytes(self._head))
                self._head.clear()
            return
        self.parser.flush(out)

    def spill(self, out: ParseEvents) -> int:
        return self.parser.spill(out) if self.parser is not None else 0

    def open_messages(self) -> list[Message]:
        return self.parser.open_messages() if self.parser is not None else []


_METHOD_PREFIX = re.compile(rb"[A-Z]{1,10}(?: [^\s]*)?")


def _chunked(request: Request) -> bool:
    return (request.header("transfer-encoding") or "").lower().endswith("chunked")


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
