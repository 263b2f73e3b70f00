"""Captured TLS writes in, findings and audit records out, inspected as streams.

The monitor hands over each application write in chunks, with loss reports:

- `inspect(ctx, data, total_len, offset=0)`: `data` is bytes
  [offset, offset + len(data)) of one write of `total_len` bytes on the
  connection `ctx.conn` in direction `ctx.direction`. Chunks of one write come
  in increasing offset order; a new write starts at offset 0. A jump in
  offsets, a write whose chunks end before `total_len`, or a write whose first
  chunk has offset > 0 is a gap of known size in the stream.
- `lost(ctx, nbytes, reason)`: bytes the kernel dropped (rate limit, ring
  full) for that process (and connection, when `ctx.conn` is not None); they
  are placed in the stream as a gap where the offsets do not already show it,
  and kept per process in `process_loss`.

Each (connection, direction) is one byte stream (`streams`), parsed
incrementally as HTTP/1.1 (de-chunked) or HTTP/2 (DATA joined per stream,
HPACK table kept); detectors run on whole messages: the head as soon as it is
complete (credentials, canaries), the body at its end or in bounded windows
that overlap (canaries on every decoded view, bulk, unencrypted_field,
model_artifact). Bytes no message holds (opaque streams, resynchronisation)
are scanned raw with the same overlap. Blinding while talking to a CRM (HPACK
table or frame boundaries lost, a stream evicted, a decompression bomb, a
connection mostly unseen) is an `inspection_evaded` finding, once per
connection and reason; every give-up is counted in `stats`. The plaintext is
only read here: results carry finding types, offsets, keyed hashes and
masked excerpts.

What a process reads (direction `from_crm`) is parsed as responses
(responses.py), never run through the detectors: each response is paired
with its request (exchanges.py: HTTP/1.1 in order, HTTP/2 by stream id; a
request unanswered for `exchange_timeout_s` or whose connection goes comes
out with status None) and the pair, bodies content-decoded and bounded by
`exchange_body_bytes`, is handed to every sink in `exchange_sinks`
(crm_calls.CrmExchange, for CRM destinations) and dropped.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from leaktap.analytics.alerts import Finding
from leaktap.analytics.plaintext import artifacts, bulk, credentials
from leaktap.analytics.plaintext.canary import CanaryHit, CanaryMatcher
from leaktap.analytics.plaintext.crm_calls import CrmExchange, ExchangeSink
from leaktap.analytics.plaintext.decode import (
    Bomb,
    DecodeLimits,
    StreamDecoder,
    Views,
    content_codings,
    decoded_views,
)
from leaktap.analytics.plaintext.exchanges import BodyCollector, ExchangeBook, PendingRequest
from leaktap.analytics.plaintext.fields import FieldPolicy
from leaktap.analytics.plaintext.fingerprints import FingerprintMatcher, fingerprint_key
from leaktap.analytics.plaintext.http import (
    HttpStream,
    Message,
    ParseEvents,
    ParserLimits,
    Request,
)
from leaktap.analytics.plaintext.instance import instance_from_request
from leaktap.analytics.plaintext.redact import KeyedHasher, dedup_key, mask_token
from leaktap.analytics.plaintext.responses import ResponseStream
from leaktap.analytics.plaintext.streams import StreamLoss, StreamTable, WriteCursor

logger = logging.getLogger(__name__)

CONNECTIONS_MAX = 8192
# the two directions of a connection's plaintext (WriteContext.direction)
TO_CRM = "to_crm"  # written by the process (SSL_write): requests
FROM_CRM = "from_crm"  # read by the process (SSL_read): responses
# model weights are only looked for in bodies this large (a float run needs volume)
ARTIFACT_MIN_BYTES = 512
PROCESSES_MAX = 4096

HostResolver = Callable[[str], tuple[str, str | None] | None]

# what each stream-side blinding means, for the finding's summary
EVASIONS = {
    "h2_header_table_lost": "HTTP/2 header table lost (later headers unreadable)",
    "h2_frame_sync_lost": "HTTP/2 frame boundaries lost (the rest of the connection unread)",
    "http1_head_over_bound": "an HTTP/1.1 request head over the reassembly bound",
    "stream_evicted": "the connection's stream state evicted (reassembly bound)",
    "decompression_bomb": "a body that decompresses past the limits",
    "connection_mostly_unseen": "most of the connection's bytes not seen",
    "compressed_body_over_bound": "a compressed body larger than the body window bound",
}


@dataclass(frozen=True, slots=True)
class WriteContext:
    """Who wrote and where to, as the controller attributed the write."""

    conn: Hashable  # one TLS connection, e.g. (tgid, ssl pointer); None: process only
    tenant: str
    environment: str | None = None
    crm_vendor: str | None = None  # from the joined flow (SNI/DNS), if any
    crm_instance: str | None = None
    destination: str | None = None  # server name, else address:port
    pid: int = 0
    comm: str = ""
    ts: float = field(default_factory=time.time)
    direction: str = TO_CRM  # TO_CRM (a write) | FROM_CRM (a read)
    exe: str = ""  # the process's executable path, when known


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Bounds of stream inspection (plaintext.streams in the config)."""

    streams_max: int = CONNECTIONS_MAX  # streams followed at once (LRU evicted)
    total_bytes_max: int = 64 << 20  # bytes all parsers hold together
    body_window_bytes: int = 1 << 20  # body bytes held per message before a window
    overlap_bytes: int = 512  # carried across windows and raw scans
    decode: DecodeLimits = field(default_factory=DecodeLimits)
    unseen_alert_share: float = 0.5  # a CRM connection with more unseen than this alerts
    unseen_alert_min_bytes: int = 64 << 10  # ... once it has written this much
    exchange_body_bytes: int = 1 << 20  # decoded request/response body an exchange carries
    exchange_timeout_s: float = 30.0  # a request unanswered this long: status None

    @classmethod
    def from_settings(cls, s: Any) -> StreamLimits:
        """From the plaintext.streams config section (read by name: analytics never
        imports the controller)."""
        return cls(streams_max=s.max, total_bytes_max=s.total_bytes,
                   body_window_bytes=s.body_window_bytes, overlap_bytes=s.overlap_bytes,
                   decode=DecodeLimits(max_output_bytes=s.decode_max_bytes,
                                       max_ratio=s.decode_max_ratio),
                   unseen_alert_share=s.unseen_alert_share,
                   unseen_alert_min_bytes=s.unseen_alert_min_bytes,
                   exchange_body_bytes=s.exchange_body_bytes,
                   exchange_timeout_s=s.exchange_timeout_s)


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    fields: FieldPolicy = field(default_factory=lambda: FieldPolicy(()))
    allowed_bulk: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BulkAudit:
    """One bulk-export or mass-operation call, for the audit log."""

    ts: float
    tenant: str
    crm_vendor: str | None
    crm_instance: str | None
    destination: str | None
    operation: str
    action: str
    method: str
    path: str  # without the query string (it may carry tokens)
    request_bytes: int  # Content-Length, else the body bytes seen
    allowed: bool
    protocol: str
    pid: int
    comm: str

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class Inspection:
    findings: list[Finding] = field(default_factory=list)
    audits: list[BulkAudit] = field(default_factory=list)
    protocol: str = "unknown"
    requests: int = 0  # request heads completed by this call
    undecodable_headers: int = 0
    lost_bytes: int = 0  # stream bytes this call found unseen (gaps)
    blind: list[str] = field(default_factory=list)  # reasons the stream lost sync
    # (vendor, instance) a request of this call newly named (shared vendor hosts)
    named_instance: tuple[str, str] | None = None


@dataclass(slots=True)
class _Stream:
    http: HttpStream | ResponseStream
    cursor: WriteCursor = field(default_factory=WriteCursor)
    loss: StreamLoss = field(default_factory=StreamLoss)
    host: str | None = None
    instance: tuple[str, str] | None = None  # named by a request (instance.py)
    raw_tail: bytes = b""
    reported: set[str] = field(default_factory=set)  # evasion reasons already reported
    ctx: WriteContext | None = None  # the latest write's context


@dataclass(frozen=True, slots=True)
class _Where:
    crm_vendor: str | None
    crm_instance: str | None
    destination: str | None
    attribution: str  # flow | host | none


class ContentInspector:
    """Runs the detectors over streams; not thread-safe (one drain thread feeds it)."""

    def __init__(
        self,
        hasher: KeyedHasher,
        canaries: CanaryMatcher | None = None,
        policies: Mapping[str, TenantPolicy] | None = None,
        resolve_host: HostResolver | None = None,
        connections_max: int = CONNECTIONS_MAX,
        limits: StreamLimits | None = None,
    ) -> None:
        self.hasher = hasher
        self.canaries = canaries or CanaryMatcher()
        self.policies = dict(policies or {})
        self.resolve_host = resolve_host
        self.tokens = credentials.TokenReuseTracker()
        # exact data match: tenants' records as keyed hashes (sets swapped in at run time)
        self.fingerprints = FingerprintMatcher(fingerprint_key(hasher))
        if limits is None:
            limits = StreamLimits(streams_max=connections_max)
        self.limits = limits
        self._parser_limits = ParserLimits(body_window_bytes=limits.body_window_bytes,
                                           overlap_bytes=limits.overlap_bytes)
        self.streams: StreamTable[_Stream] = StreamTable(
            lambda: _Stream(HttpStream(self._parser_limits)), limits.streams_max,
            limits.total_bytes_max)
        self.stats: Counter[str] = Counter()  # give-ups and losses, by reason
        # per process (pid): bytes lost by reason, as reported and as found in streams
        self.process_loss: OrderedDict[int, Counter[str]] = OrderedDict()
        # requests waiting for their responses; the pairs go to exchange_sinks
        self.book = ExchangeBook(limits.exchange_timeout_s, connections_max=limits.streams_max,
                                 stats=self.stats)
        self.exchange_sinks: list[ExchangeSink] = []

    # -- the stream table ----------------------------------------------------------

    def connection_host(self, conn: Hashable, direction: str = TO_CRM) -> str | None:
        """The host the connection's requests named (Host or :authority), if any."""
        stream = self.streams.peek((conn, direction))
        return stream.host if stream is not None else None

    def forget(self, conn: Hashable) -> Inspection:
        """The connection ended: what its streams still hold is inspected, then dropped."""
        return self.forget_where(lambda c: c == conn)

    def forget_where(self, predicate: Callable[[Hashable], bool]) -> Inspection:
        out = Inspection()
        closing = [(key, stream) for key, stream in self.streams
                   if isinstance(key, tuple) and predicate(key[0])]
        # requests end before their responses are paired; what is still owed goes after
        closing.sort(key=lambda item: item[0][1] == FROM_CRM)
        for key, stream in closing:
            self.streams.pop(key)
            self._close(stream, out)
        for conn in [c for c in self.book.connections() if predicate(c)]:
            self.book.close(conn, self._emit_unanswered)
        return out

    def expire_exchanges(self, now: float | None = None) -> int:
        """Requests unanswered for exchange_timeout_s go out with status None (the
        monitor calls this every second)."""
        return self.book.expire(self._emit_unanswered, now)

    def _close(self, stream: _Stream, out: Inspection) -> None:
        if stream.ctx is None:
            return
        gap = stream.cursor.close(stream.loss)
        self._count_loss(stream.ctx, gap, "not_captured")
        events = ParseEvents()
        stream.http.flush(events)
        self._dispatch(stream.ctx, stream, events, out)
        if stream.ctx.direction != FROM_CRM:
            self._check_unseen(stream.ctx, stream, out)

    def _bound_memory(self, out: Inspection) -> None:
        table = self.streams
        if table.over_total():
            # down to 3/4 of the bound at once: the sort is not paid on every write
            target = table.total_bytes_max * 3 // 4
            for key in table.largest():
                stream = table.peek(key)
                if stream is None:
                    continue
                events = ParseEvents()
                stream.http.spill(events)
                self.stats["spilled_windows"] += events.spilled
                if stream.ctx is not None:
                    self._dispatch(stream.ctx, stream, events, out)
                table.hold(key, stream.http.buffered)
                if table.held_bytes <= target:
                    break
        while table.over_count() or table.over_total():
            evicted = table.evict_oldest("streams_max" if table.over_count() else "total_bytes")
            if evicted is None:
                break
            self.stats["streams_evicted"] += 1
            self._close(evicted[1], out)

    # -- input ---------------------------------------------------------------------

    def inspect(self, ctx: WriteContext, data: bytes, total_len: int,
                offset: int = 0) -> Inspection:
        """Inspect bytes [offset, offset + len(data)) of a write of `total_len` bytes."""
        if ctx.direction == FROM_CRM and not self.exchange_sinks:
            self.stats["from_crm_bytes_not_paired"] += len(data)  # nobody wants the answers
            return Inspection()
        key = (ctx.conn, ctx.direction)
        stream, evicted = self._stream(ctx)
        events = ParseEvents()
        out = Inspection()
        if evicted is not None:
            stream.http.gap(0, events)  # its state is gone: resume as after a gap
            events.blind.append(("stream_evicted", 0))
        for is_data, piece in stream.cursor.pieces(data, total_len, offset, stream.loss):
            if is_data:
                assert isinstance(piece, bytes)
                stream.http.feed(piece, events)
            else:
                assert isinstance(piece, int)
                out.lost_bytes += piece
                self._count_loss(ctx, piece, "stream_gap")
                stream.http.gap(piece, events)
        self._dispatch(ctx, stream, events, out)
        self.streams.hold(key, stream.http.buffered)
        if ctx.direction != FROM_CRM:
            self._check_unseen(ctx, stream, out)
        self._bound_memory(out)
        out.protocol = stream.http.protocol
        return out

    def lost(self, ctx: WriteContext, nbytes: int, reason: str) -> Inspection:
        """`nbytes` the kernel dropped for ctx's process (and connection, if known)."""
        out = Inspection()
        if nbytes <= 0:
            return out
        self._count_loss(ctx, nbytes, reason)
        if ctx.conn is None:
            return out
        stream, _ = self._stream(ctx)
        cursor = stream.cursor
        cursor.announce_loss(nbytes, reason)
        if cursor.write_pos >= cursor.write_total:
            # between writes: whole writes were lost, the stream has a gap now
            events = ParseEvents()
            stream.loss.lost[reason] += cursor.announced
            stream.loss.written += cursor.announced
            out.lost_bytes += cursor.announced
            stream.http.gap(cursor.announced, events)
            cursor.announced = 0
            self._dispatch(ctx, stream, events, out)
        if ctx.direction != FROM_CRM:
            self._check_unseen(ctx, stream, out)
        out.protocol = stream.http.protocol
        return out

    def _stream(self, ctx: WriteContext) -> tuple[_Stream, str | None]:
        """The stream of ctx's connection and direction (a response parser for reads)
        and why an earlier one was evicted, if so."""
        stream, evicted = self.streams.get((ctx.conn, ctx.direction))
        if stream.ctx is None and ctx.direction == FROM_CRM:
            conn = ctx.conn
            stream.http = ResponseStream(self._parser_limits, lambda: self._claim(conn))
        stream.ctx = ctx
        return stream, evicted

    def _count_loss(self, ctx: WriteContext, nbytes: int, reason: str) -> None:
        if nbytes <= 0:
            return
        if ctx.direction == FROM_CRM:
            # an answer's bytes: the exchange is cut, nothing was sent unseen
            self.stats[f"lost_bytes_from_crm_{reason}"] += nbytes
            return
        self.stats[f"lost_bytes_{reason}"] += nbytes
        ledger = self.process_loss.get(ctx.pid)
        if ledger is None:
            ledger = self.process_loss[ctx.pid] = Counter()
            if len(self.process_loss) > PROCESSES_MAX:
                self.process_loss.popitem(last=False)
        else:
            self.process_loss.move_to_end(ctx.pid)
        ledger[reason] += nbytes

    def _where(self, ctx: WriteContext, host: str | None,
               named: tuple[str, str] | None = None) -> _Where:
        if ctx.crm_vendor:
            instance = ctx.crm_instance
            if instance is None and named is not None and named[0] == ctx.crm_vendor:
                instance = named[1]
            return _Where(ctx.crm_vendor, instance, ctx.destination, "flow")
        if host and self.resolve_host is not None:
            crm = self.resolve_host(host)
            if crm is not None:
                return _Where(crm[0], crm[1], host, "host")
        return _Where(None, None, ctx.destination or host, "host" if host else "none")

    # -- what the parser produced ----------------------------------------------------

    def _dispatch(self, ctx: WriteContext, stream: _Stream, events: ParseEvents,
                  out: Inspection) -> None:
        if ctx.direction == FROM_CRM:
            self._handle_responses(ctx, events)
        else:
            self._handle(ctx, stream, events, out)

    def _handle(self, ctx: WriteContext, stream: _Stream, events: ParseEvents,
                out: Inspection) -> None:
        for msg in events.heads:
            if msg.request.host:
                stream.host = msg.request.host
            request = msg.request
            named = instance_from_request(request.method, request.path, request.headers,
                                          stream.host)
            if named is not None and named != stream.instance:
                stream.instance = out.named_instance = named
        where = self._where(ctx, stream.host, stream.instance)
        policy = self.policies.get(ctx.tenant)
        out.undecodable_headers += events.undecodable_headers
        out.requests += len(events.heads)
        for msg in events.heads:
            self._credentials(ctx, where, msg.request, out)
            self._head_canaries(ctx, where, msg, out)
            self._await_response(ctx, where, stream, msg)
        for raw in events.raw:
            self._raw(ctx, where, stream, raw, out)
        for msg, window, start in events.windows:
            if msg.exchange is not None:
                msg.exchange.body.feed(window, start)
            self._body(ctx, where, stream, msg, window, start, policy, out)
        for msg in events.done:
            body = bytes(msg.body)
            pending = msg.exchange
            if pending is not None:
                pending.body.feed(body, msg.body_base)
                pending.body_len = msg.body_len
            # the detectors may name classes of data in the exchange (records going home)
            self._body(ctx, where, stream, msg, body, msg.body_base, policy, out)
            if pending is not None:
                msg.exchange = None  # the book holds it from here on
                self.book.hold(pending)
            msg.body = bytearray()
        for reason, nbytes in events.blind:
            self.stats[f"blind_{reason}"] += 1
            out.blind.append(reason)
            if reason in EVASIONS:
                self._evaded(ctx, where, stream, reason, nbytes, out)

    # -- requests paired with their responses (issue 14.1) ---------------------------

    def _await_response(self, ctx: WriteContext, where: _Where, stream: _Stream,
                        msg: Message) -> None:
        """A request head: it waits in the book for its answer. A request to no CRM is
        booked too (an HTTP/1.1 answer is matched by its place in line), bodiless."""
        request = msg.request
        if request.method in ("?", "") or not self.exchange_sinks:
            return  # nobody to hand the pairs to: no pairing at all
        cap = self.limits.exchange_body_bytes if where.crm_vendor else 0
        msg.exchange = PendingRequest(
            ts=ctx.ts, started=time.monotonic(), tenant=ctx.tenant, pid=ctx.pid, exe=ctx.exe,
            vendor=where.crm_vendor, instance=where.crm_instance,
            host=stream.host or where.destination, request=request,
            body=BodyCollector(request.headers, cap, self.limits.decode))
        self.book.add(ctx.conn, msg.exchange, self._emit_unanswered)

    def _claim(self, conn: Hashable) -> tuple[str, PendingRequest] | None:
        """For an HTTP/1.1 response head: the request it answers (its method decides
        whether a body follows)."""
        pending = self.book.claim_next(conn)
        return (pending.request.method, pending) if pending is not None else None

    def _handle_responses(self, ctx: WriteContext, events: ParseEvents) -> None:
        for msg in events.heads:
            if msg.exchange is None and msg.request.protocol == "h2":
                msg.exchange = self.book.claim_stream(ctx.conn, msg.request.stream_id)
            pending = msg.exchange
            if pending is not None:
                pending.status = msg.status
                pending.response = BodyCollector(
                    msg.request.headers,
                    self.limits.exchange_body_bytes if pending.vendor else 0,
                    self.limits.decode)
        for msg, window, start in events.windows:
            if msg.exchange is not None and msg.exchange.response is not None:
                msg.exchange.response.feed(window, start)
        for msg in events.done:
            pending = msg.exchange
            if pending is not None and pending.response is not None:
                pending.response.feed(bytes(msg.body), msg.body_base)
                if not msg.complete:
                    pending.response.truncated = True
                if pending.expired:
                    self.stats["exchange_late_responses_dropped"] += 1
                else:
                    self._emit_exchange(pending, msg.body_len)
            msg.body = bytearray()
        for reason, _ in events.blind:
            self.stats[f"blind_from_crm_{reason}"] += 1

    def _emit_unanswered(self, pending: PendingRequest) -> None:
        pending.status, pending.response = None, None
        self._emit_exchange(pending, 0)

    def _emit_exchange(self, pending: PendingRequest, response_bytes: int) -> None:
        """Hand a CRM request and its answer (or none) to the sinks; bodies are
        dropped when this returns."""
        if pending.vendor is None:
            self.book.release(pending)
            self.stats["exchanges_not_crm"] += 1
            return
        request = pending.request
        try:
            request_bytes = int(request.header("content-length") or pending.body_len)
        except ValueError:
            request_bytes = pending.body_len
        response = pending.response
        exchange = CrmExchange(
            ts=pending.ts, tenant=pending.tenant, pid=pending.pid, exe=pending.exe,
            vendor=pending.vendor, instance=pending.instance, host=pending.host,
            method=request.method, target=request.path,
            request_body=pending.body.data, request_bytes=request_bytes,
            status=pending.status if response is not None else None,
            response_body=response.data if response is not None else b"",
            response_bytes=response_bytes,
            response_truncated=response.truncated if response is not None else False,
            data_classes=frozenset(pending.data_classes),
        )
        self.book.release(pending)
        self.stats["exchanges" if exchange.status is not None else "exchanges_unanswered"] += 1
        for sink in self.exchange_sinks:
            try:
                sink.on_exchange(exchange)
            except Exception:  # noqa: BLE001 - one failing sink must not stop inspection
                self.stats["exchange_sink_errors"] += 1
                logger.exception("delivering a CRM exchange to %s", type(sink).__name__)

    def _head_canaries(self, ctx: WriteContext, where: _Where, msg: Message,
                       out: Inspection) -> None:
        request = msg.request
        head = (f"{request.method} {request.path}\n"
                + "\n".join(map(": ".join, request.headers))).encode("latin-1", "replace")
        self._report_canaries(ctx, where, self.canaries.scan(head), msg.reported, "head", out)
        if b"%" in head or b"\\" in head:  # nested encodings in a path or a header value
            for view in decoded_views(head, (), self.limits.decode).views[1:]:
                self._report_canaries(ctx, where, self.canaries.scan(view.data), msg.reported,
                                      view.name.replace("body", "head", 1), out)

    def _raw(self, ctx: WriteContext, where: _Where, stream: _Stream, data: bytes,
             out: Inspection) -> None:
        """Bytes no message holds: scanned with the tail of the last raw bytes in front."""
        tail = stream.raw_tail
        window = tail + data
        fresh = [h for h in self.canaries.scan(window) if h.offset + h.length > len(tail)]
        self._report_canaries(ctx, where, fresh, set(), "raw", out)
        keep = max(self.limits.overlap_bytes, self.canaries.longest_form)
        stream.raw_tail = window[-keep:]

    def _body(self, ctx: WriteContext, where: _Where, stream: _Stream, msg: Message,
              data: bytes, start: int, policy: TenantPolicy | None, out: Inspection) -> None:
        """Detectors over body bytes [start, start + len(data)) of msg (all of it, or a
        window of a body past the bound)."""
        request = msg.request
        if not msg.bulk_done and request.method != "?":
            msg.bulk_done = True
            self._bulk(ctx, where, request, msg, data, policy, out)
        if not data:
            return
        codings = content_codings(request.headers)
        if msg.windows and codings:
            # a compressed body past the bound: decoded as a stream, window by window
            self._report_canaries(ctx, where, self.canaries.scan(data), msg.reported, "body",
                                  out)
            decoded = self._stream_decode(ctx, where, stream, msg, data, start, codings, out)
            if decoded is None:
                return
            plain_headers = [h for h in request.headers if h[0] != "content-encoding"]
            views = decoded_views(decoded, plain_headers, self.limits.decode)
        else:
            views = decoded_views(data, request.headers, self.limits.decode)
        for view in views:
            self._report_canaries(ctx, where, self.canaries.scan(view.data), msg.reported,
                                  view.name, out)
        if views.bombs:
            self.stats["decompression_bombs"] += 1
            self._evaded(ctx, where, stream, "decompression_bomb", len(data), out,
                         {"encoding": ",".join(views.bombs)})
        if views.errors:
            self.stats["decode_errors"] += len(views.errors)
        if self.fingerprints.active:
            self._proprietary(ctx, where, msg, views, out)
        content = views.content if views.content is not None else data
        if policy is not None and policy.fields:
            self._fields(ctx, where, msg, content, policy.fields, out)
        if len(content) >= ARTIFACT_MIN_BYTES:
            self._artifact(ctx, where, content, msg.body_base, out)

    def _stream_decode(self, ctx: WriteContext, where: _Where, stream: _Stream, msg: Message,
                       data: bytes, start: int, codings: list[str],
                       out: Inspection) -> bytes | None:
        """The decoded bytes a window adds (with the decoded overlap in front), or None
        once the body cannot be decoded further (counted, and reported when blinding)."""
        if msg.decoder is False:
            return None
        if msg.decoder is None:
            try:
                if len(codings) != 1:
                    raise ValueError("stacked codings")
                msg.decoder = StreamDecoder(codings[0], self.limits.decode)
            except ValueError:
                msg.decoder = False
                self._evaded(ctx, where, stream, "compressed_body_over_bound", len(data), out,
                             {"encoding": ",".join(codings),
                              "body_window_bytes": self.limits.body_window_bytes})
                return None
        if start > msg.decoded_upto:
            msg.decoder = False  # a hole in the compressed stream: the rest is undecodable
            self.stats["decode_stopped_after_gap"] += 1
            return None
        fresh = data[msg.decoded_upto - start :]
        msg.decoded_upto = start + len(data)
        try:
            chunk: bytes = msg.decoder.feed(fresh)
        except Bomb:
            msg.decoder = False
            self.stats["decompression_bombs"] += 1
            self._evaded(ctx, where, stream, "decompression_bomb", msg.decoded_upto, out,
                         {"encoding": codings[0]})
            return None
        except ValueError:
            msg.decoder = False
            self.stats["decode_errors"] += 1
            return None
        joined: bytes = msg.decoded_tail + chunk
        msg.decoded_tail = joined[-self.limits.overlap_bytes :]
        return joined

    def _check_unseen(self, ctx: WriteContext, stream: _Stream, out: Inspection) -> None:
        loss = stream.loss
        if (loss.written >= self.limits.unseen_alert_min_bytes
                and loss.unseen_share() > self.limits.unseen_alert_share):
            where = self._where(ctx, stream.host)
            self._evaded(ctx, where, stream, "connection_mostly_unseen", loss.lost_bytes, out)

    def _evaded(self, ctx: WriteContext, where: _Where, stream: _Stream, reason: str,
                nbytes: int, out: Inspection, extra: dict[str, Any] | None = None) -> None:
        if reason in stream.reported:
            return
        if where.crm_vendor is None:
            self.stats[f"evaded_not_crm_{reason}"] += 1
            return
        stream.reported.add(reason)
        loss = stream.loss
        out.findings.append(self._finding(
            "inspection_evaded", ctx, where, "high",
            f"{ctx.comm or 'pid ' + str(ctx.pid)} of {ctx.tenant}: {EVASIONS[reason]} "
            f"talking to {where.destination or where.crm_vendor}",
            dedup_key("inspection_evaded", ctx.tenant, ctx.comm, reason,
                      where.destination or ""),
            {"lost": reason, "lost_bytes": nbytes, "source": "stream",
             "protocol": stream.http.protocol, "stream_bytes_written": loss.written,
             "stream_bytes_seen": loss.seen, "stream_bytes_lost": loss.lost_bytes,
             "stream_lost_by_reason": dict(loss.lost), **(extra or {})},
        ))

    # -- detectors ---------------------------------------------------------------

    def _finding(self, kind: str, ctx: WriteContext, where: _Where, severity: str, summary: str,
                 key: str, evidence: dict[str, Any]) -> Finding:
        evidence = {"finding": kind, "pid": ctx.pid, "comm": ctx.comm,
                    "attribution": where.attribution, **evidence}
        return Finding(
            kind=kind, tenant=ctx.tenant, severity=severity, summary=summary,
            crm_vendor=where.crm_vendor, crm_instance=where.crm_instance,
            destination=where.destination, ts=ctx.ts, evidence=evidence, dedup_key=key,
        )

    def _report_canaries(self, ctx: WriteContext, where: _Where, hits: list[CanaryHit],
                         reported: set[str], view: str, out: Inspection) -> None:
        """One finding per canary per message (`reported` holds the message's hashes)."""
        for hit in hits:
            c = hit.canary
            token_hash = self.hasher.hash(c.token)
            if token_hash in reported:
                continue
            reported.add(token_hash)
            out.findings.append(self._finding(
                "canary_token", ctx, where, "critical",
                f"canary {c.label} ({hit.form}) left for {where.destination or 'an unknown host'}",
                dedup_key("canary_token", token_hash, ctx.tenant, where.destination or ""),
                {"canary_tenant": c.tenant, "canary_record": c.record,
                 "canary_environment": c.environment, "form": hit.form, "view": view,
                 "offset": hit.offset, "canary_hash": token_hash,
                 "excerpt": f"{hit.form} canary {mask_token(c.token)}"},
            ))

    def _credentials(self, ctx: WriteContext, where: _Where, request: Request,
                     out: Inspection) -> None:
        for cred in credentials.extract_credentials(request, self.hasher):
            reuse = self.tokens.observe(cred.token_hash, ctx.tenant, ctx.environment, ctx.ts)
            if reuse is None:
                continue
            scope = ("tenants" if reuse.first_tenant != reuse.tenant else "environments")
            out.findings.append(self._finding(
                "oauth_token_reuse", ctx, where, "critical",
                f"{cred.kind} token of {reuse.first_tenant}"
                f"{'/' + reuse.first_environment if reuse.first_environment else ''} used by "
                f"{reuse.tenant}{'/' + reuse.environment if reuse.environment else ''} "
                f"(two {scope})",
                dedup_key("oauth_token_reuse", cred.token_hash),
                {"token_hash": cred.token_hash, "token_kind": cred.kind, "source": cred.source,
                 "excerpt": f"{cred.source}: {cred.masked}", "offset": request.offset,
                 "first_tenant": reuse.first_tenant,
                 "first_environment": reuse.first_environment, "first_seen": reuse.first_seen,
                 "environment": reuse.environment, "scope": scope},
            ))

    def _bulk(self, ctx: WriteContext, where: _Where, request: Request, msg: Message,
              body: bytes, policy: TenantPolicy | None, out: Inspection) -> None:
        call = bulk.classify(request, body)
        if call is None:
            return
        allowed_ops = policy.allowed_bulk if policy is not None else ()
        ok = bulk.allowed(call.operation, allowed_ops)
        try:
            size = int(request.header("content-length") or msg.body_len)
        except ValueError:
            size = msg.body_len
        path = request.path.split("?", 1)[0][:512]
        vendor = where.crm_vendor or call.vendor
        out.audits.append(BulkAudit(
            ts=ctx.ts, tenant=ctx.tenant, crm_vendor=vendor, crm_instance=where.crm_instance,
            destination=where.destination, operation=call.operation, action=call.action,
            method=request.method, path=path, request_bytes=size, allowed=ok,
            protocol=request.protocol, pid=ctx.pid, comm=ctx.comm,
        ))
        if ok:
            return
        finding = self._finding(
            "bulk_export", ctx, where, "high",
            f"{call.operation} ({call.action}) by {ctx.tenant} is not an allowed bulk operation",
            dedup_key("bulk_export", ctx.tenant, call.operation, where.destination or ""),
            {"operation": call.operation, "action": call.action, "method": request.method,
             "path": path, "request_bytes": size,
             "allowed_operations": list(allowed_ops)},
        )
        if finding.crm_vendor is None:
            finding.crm_vendor = call.vendor
        out.findings.append(finding)

    def _fields(self, ctx: WriteContext, where: _Where, msg: Message, body: bytes,
                policy: FieldPolicy, out: Inspection) -> None:
        request = msg.request
        hits = policy.scan(body, request.content_type, self.hasher,
                           request.header("content-type") or "")
        reported: set[tuple[str, str]] = set()
        for hit in hits:
            if (hit.field, hit.kind) in reported:
                continue
            reported.add((hit.field, hit.kind))
            offset = msg.body_base + hit.offset if hit.offset >= 0 else msg.body_base
            out.findings.append(self._finding(
                "unencrypted_field", ctx, where, "high",
                f"{hit.field} sent in clear ({hit.kind}) by {ctx.tenant}",
                dedup_key("unencrypted_field", ctx.tenant, hit.field.lower(),
                          where.destination or ""),
                {"field": hit.field, "value_kind": hit.kind, "offset": offset,
                 "value_hash": hit.value_hash, "excerpt": f'"{hit.field}": "{hit.masked}"',
                 "method": request.method, "path": request.path.split("?", 1)[0]},
            ))

    def _proprietary(self, ctx: WriteContext, where: _Where, msg: Message, views: Views,
                     out: Inspection) -> None:
        """Another tenant's records (or the owner's, leaving for somewhere else)."""
        # the line-joined view only serves base64 detection: its words run together
        matches = self.fingerprints.scan(v.data for v in views
                                         if not v.name.endswith(">lines"))
        for m in matches:
            if not m.alerting:
                continue
            owner, name = m.info.tenant, m.info.name
            if f"fp:{owner}/{name}" in msg.reported:
                continue
            msg.reported.add(f"fp:{owner}/{name}")
            if self.fingerprints.sanctioned(owner, where.crm_vendor, where.crm_instance):
                self.stats["fingerprint_home_writes"] += 1  # the owner's own instance
                if msg.exchange is not None:  # the data-flow map records it, by name
                    msg.exchange.data_classes.add(f"fingerprint:{owner}/{name}")
                continue
            dest = where.destination or "an unknown host"
            out.findings.append(self._finding(
                "proprietary_data", ctx, where, "critical",
                f"{m.values} value(s) from {m.rows} row(s) of {owner}'s {name} written by "
                f"{ctx.comm or 'pid ' + str(ctx.pid)} of {ctx.tenant} to {dest}",
                dedup_key("proprietary_data", ctx.tenant, owner, name, where.destination or ""),
                {"owner_tenant": owner, "set": name, "values_matched": m.values,
                 "rows_matched": m.rows, "rows_with_several_columns": m.rows_several,
                 "columns_matched": m.columns, "min_matches": m.info.min_matches,
                 "destination": where.destination, "process": ctx.comm,
                 "method": msg.request.method, "path": msg.request.path.split("?", 1)[0]},
            ))

    def _artifact(self, ctx: WriteContext, where: _Where, data: bytes, base: int,
                  out: Inspection) -> None:
        hit = artifacts.detect(data)
        if hit is None:
            return
        severity = "high" if where.crm_vendor else "medium"
        out.findings.append(self._finding(
            "model_artifact", ctx, where, severity,
            f"{hit.format} model data leaving for {where.destination or 'an unknown host'}",
            dedup_key("model_artifact", ctx.tenant, hit.format, where.destination or ""),
            {"format": hit.format, "detail": hit.detail, "offset": base + hit.offset},
        ))
