"""Requests paired with their responses, per connection (issue 14.1).

`ExchangeBook` keeps each connection's requests until their answers come:
HTTP/1.1 answers in order (a FIFO per connection), HTTP/2 by stream id. A
request left unanswered for `timeout_s`, or whose connection is closed or
evicted, comes out with no response (status None). An HTTP/1.1 request that
timed out keeps its place in the FIFO as a placeholder, so a late answer
still lines up with the request it answers (and is dropped, counted) rather
than with the next one.

`BodyCollector` turns a message body as the parser hands it out (windows that
overlap, holes of known size) into the content-decoded bytes, bounded: past
`cap` decoded bytes, or after a hole, a decoding error or a decompression
bomb, the rest is not kept and the body is marked cut.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from leaktap.analytics.plaintext.decode import Bomb, DecodeLimits, StreamDecoder, content_codings
from leaktap.analytics.plaintext.http import Request


class BodyCollector:
    """One body, content-decoded and bounded (see the module docstring)."""

    def __init__(self, headers: list[tuple[str, str]], cap: int, limits: DecodeLimits) -> None:
        self.cap = cap
        self.out = bytearray()
        self._whole: bytes | None = None  # a body taken whole, undecoded: kept, not copied
        self.upto = 0  # body offset up to which raw bytes were taken
        self.truncated = False
        self.stopped: str | None = None  # why the rest is not kept
        self.decoders: list[StreamDecoder] = []
        try:
            self.decoders = [StreamDecoder(c, limits) for c in content_codings(headers)]
        except ValueError:
            self._stop("unsupported_encoding")

    def _stop(self, why: str) -> None:
        if self.stopped is None:
            self.stopped = why
            self.truncated = True

    @property
    def data(self) -> bytes:
        return self._whole if self._whole is not None else bytes(self.out)

    @property
    def held(self) -> int:
        return len(self._whole) if self._whole is not None else len(self.out)

    def drop(self) -> None:
        """Forget the body (memory bound): it is cut."""
        self._whole, self.out = None, bytearray()
        self._stop("dropped")

    def feed(self, data: bytes | bytearray, start: int) -> None:
        """Body bytes [start, start + len(data)): a window (overlapping the last) or the rest."""
        if (start == self.upto == 0 and isinstance(data, bytes) and not self.decoders
                and self.stopped is None and len(data) <= self.cap):
            self._whole, self.upto = data, len(data)  # the usual case: one piece, identity
            return
        if self._whole is not None:
            self.out, self._whole = bytearray(self._whole), None
        if start > self.upto:
            self._stop("gap")
        skip = max(0, self.upto - start)
        self.upto = max(self.upto, start + len(data))
        if self.stopped is not None or skip >= len(data):
            return
        if self.cap <= len(self.out):
            self._stop("cap")
            return
        fresh = bytes(data[skip:])
        try:
            for d in self.decoders:
                fresh = d.feed(fresh)
        except Bomb:
            self._stop("decompression_bomb")
            return
        except ValueError:
            self._stop("decode_error")
            return
        room = self.cap - len(self.out)
        if len(fresh) > room:
            self.out += fresh[:room]
            self._stop("cap")
            return
        self.out += fresh


@dataclass(slots=True)
class PendingRequest:
    """A request waiting for its answer, with what the exchange will carry."""

    ts: float
    started: float  # monotonic, for the timeout
    tenant: str
    pid: int
    exe: str
    vendor: str | None  # None: not a CRM (paired only to keep the order)
    instance: str | None
    host: str | None
    request: Request
    body: BodyCollector
    body_len: int = 0  # request body bytes written (set when it ends)
    expired: bool = False  # emitted without an answer; a placeholder now
    response: BodyCollector | None = None
    status: int | None = None
    handed_over: bool = False  # emitted: its bodies are gone
    # classes of data the inspector named in the request, e.g. "fingerprint:acme/contacts"
    data_classes: set[str] = field(default_factory=set)


Emit = Callable[[PendingRequest], None]


@dataclass(slots=True)
class _Connection:
    in_order: deque[PendingRequest] = field(default_factory=deque)  # HTTP/1.1
    by_stream: dict[int, PendingRequest] = field(default_factory=dict)  # HTTP/2


class ExchangeBook:
    """Unanswered requests per connection, bounded per connection and in number of
    connections (the oldest is given up: emitted unanswered, counted)."""

    def __init__(self, timeout_s: float, pending_max: int = 256,
                 connections_max: int = 8192, stats: Counter[str] | None = None,
                 body_bytes_max: int = 16 << 20) -> None:
        self.timeout_s = timeout_s
        self.body_bytes_max = body_bytes_max  # request bodies held while their answers come
        self.held_bytes = 0
        self.pending_max = pending_max
        self.connections_max = connections_max
        self._conns: OrderedDict[Hashable, _Connection] = OrderedDict()
        self.stats: Counter[str] = Counter() if stats is None else stats  # give-ups by reason

    def __len__(self) -> int:
        return sum(len(c.by_stream) + sum(not p.expired for p in c.in_order)
                   for c in self._conns.values())

    def add(self, conn: Hashable, pending: PendingRequest, emit: Emit) -> None:
        c = self._conns.get(conn)
        if c is None:
            c = self._conns[conn] = _Connection()
            if len(self._conns) > self.connections_max:
                _, old = self._conns.popitem(last=False)
                self.stats["exchange_connections_evicted"] += 1
                self._give_up(old, emit)
        else:
            self._conns.move_to_end(conn)
        request = pending.request
        if request.protocol == "h2":
            old_p = c.by_stream.pop(request.stream_id, None)
            if old_p is not None:  # a stream id reused: the old one was never answered
                emit(old_p)
            c.by_stream[request.stream_id] = pending
            if len(c.by_stream) > self.pending_max:
                self.stats["exchange_pending_over_bound"] += 1
                emit(c.by_stream.pop(next(iter(c.by_stream))))
            return
        c.in_order.append(pending)
        if len(c.in_order) > self.pending_max:
            self.stats["exchange_pending_over_bound"] += 1
            first = c.in_order.popleft()
            if not first.expired:
                emit(first)

    def hold(self, pending: PendingRequest) -> None:
        """`pending`'s request body ended: its bytes count against body_bytes_max, and the
        oldest bodies are dropped (the exchange goes without) past it."""
        if pending.handed_over:
            return
        self.held_bytes += pending.body.held
        if self.held_bytes <= self.body_bytes_max:
            return
        for c in self._conns.values():
            for p in [*c.in_order, *c.by_stream.values()]:
                if p.body.held:
                    self.held_bytes -= p.body.held
                    p.body.drop()
                    self.stats["exchange_bodies_dropped"] += 1
                if self.held_bytes <= self.body_bytes_max * 3 // 4:
                    return

    def release(self, pending: PendingRequest) -> None:
        """`pending` was emitted: its bodies are dropped and no longer count."""
        self.held_bytes = max(0, self.held_bytes - pending.body.held)
        pending.handed_over = True
        pending.body.drop()
        pending.response = None

    def claim_next(self, conn: Hashable) -> PendingRequest | None:
        """The oldest HTTP/1.1 request of `conn` still owed an answer (it is taken)."""
        c = self._conns.get(conn)
        if c is None or not c.in_order:
            self.stats["exchange_unpaired_responses"] += 1
            return None
        pending = c.in_order.popleft()
        if pending.expired:
            self.stats["exchange_late_responses"] += 1
        return pending

    def claim_stream(self, conn: Hashable, stream_id: int) -> PendingRequest | None:
        c = self._conns.get(conn)
        pending = c.by_stream.pop(stream_id, None) if c is not None else None
        if pending is None:
            self.stats["exchange_unpaired_responses"] += 1
        return pending

    def expire(self, emit: Emit, now: float | None = None) -> int:
        """Emit every request unanswered for timeout_s; returns how many."""
        now = time.monotonic() if now is None else now
        limit = now - self.timeout_s
        n = 0
        for conn, c in list(self._conns.items()):
            for pending in c.in_order:  # in request order: stop at the first young one
                if pending.started > limit:
                    break
                if not pending.expired:
                    pending.expired = True
                    emit(pending)
                    n += 1
            for sid in [s for s, p in c.by_stream.items() if p.started <= limit]:
                emit(c.by_stream.pop(sid))
                n += 1
            if not c.by_stream and all(p.expired for p in c.in_order) and (
                    len(c.in_order) == 0 or c.in_order[-1].started <= limit - self.timeout_s):
                del self._conns[conn]  # nothing owed for two timeouts: the placeholders go
        self.stats["exchange_timeouts"] += n
        return n

    def close(self, conn: Hashable, emit: Emit) -> int:
        """`conn` ended: what it still owes is emitted unanswered."""
        c = self._conns.pop(conn, None)
        return self._give_up(c, emit) if c is not None else 0

    def connections(self) -> list[Hashable]:
        return list(self._conns)

    def _give_up(self, c: _Connection, emit: Emit) -> int:
        owed = [p for p in c.in_order if not p.expired] + list(c.by_stream.values())
        for pending in owed:
            emit(pending)
        self.stats["exchange_closed_unanswered"] += len(owed)
        return len(owed)
