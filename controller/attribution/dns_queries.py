"""DNS queries this host sent and are not answered yet: what makes an answer trustworthy.

An answer names addresses only when it answers a query that left this host
(DESIGN, decisions for the second round): same transport, its source is the
resolver the query went to and its destination the query's source address and
port, same id, same question (names compare case-insensitively, so 0x20
randomisation is tolerated: the parser lower-cases them). A match consumes the
query, so a second answer to the same query is unsolicited. Everything that
does not match is rejected with the reason it failed, as the first of:

    no_query           no query pending from the answer's destination address and port
    wrong_resolver     a query with this id and question went to another resolver
    question_mismatch  the query to this resolver with this id asked something else
    id_mismatch        queries went to this resolver from that port, none with this id
    expired            the query was sent more than `window_s` before the answer

Pending queries are bounded (`max_entries`, the oldest evicted and counted)
and forgotten `window_s` x LATE_GRACE after they were sent (counted as
unanswered); until then a late answer is recognised as such.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from leaktap.controller.protocols.dns import DnsMessage

# a query is remembered this many windows, so that an answer arriving late is
# told apart (expired) from one with no query at all
LATE_GRACE = 3.0

REJECT_REASONS = ("no_query", "wrong_resolver", "question_mismatch", "id_mismatch", "expired")


@dataclass(frozen=True, slots=True)
class DnsEnds:
    """The transport endpoints of one DNS message, in packet direction."""

    proto: int  # 6 or 17
    src: str
    sport: int
    dst: str
    dport: int


# (proto, client, client port, resolver, resolver port, id, qname, qtype)
_QueryKey = tuple[int, str, int, str, int, int, str | None, int | None]


class QueryCounters(Protocol):
    """Where the table counts (DnsCacheStats): monotonic, exported with the cache's."""

    queries: int  # queries recorded as pending
    queries_matched: int  # answers that matched a pending query
    queries_evicted: int  # pending queries pushed out by max_entries before any answer
    queries_unanswered: int  # pending queries forgotten without an answer


class PendingQueries:
    """Queries in flight, keyed by their 5-tuple, id and question."""

    def __init__(self, stats: QueryCounters, window_s: float = 5.0,
                 max_entries: int = 4096) -> None:
        if window_s <= 0 or max_entries < 1:
            raise ValueError("window_s and max_entries must be positive")
        self.window_s = window_s
        self.max_entries = max_entries
        self.stats = stats
        # key -> time sent, in sending order (so the oldest are at the front)
        self._sent: OrderedDict[_QueryKey, float] = OrderedDict()
        # (proto, client, client port) -> keys pending from that socket, for diagnosis
        self._by_client: dict[tuple[int, str, int], set[_QueryKey]] = {}

    def __len__(self) -> int:
        return len(self._sent)

    def add(self, ends: DnsEnds, msg: DnsMessage, now: float) -> None:
        """Record a query that left this host (a repeat refreshes its time)."""
        self._forget_older_than(now - self.window_s * LATE_GRACE)
        key = (ends.proto, ends.src, ends.sport, ends.dst, ends.dport, msg.id, msg.qname,
               msg.qtype)
        self._sent.pop(key, None)
        self._sent[key] = now
        self._by_client.setdefault((ends.proto, ends.src, ends.sport), set()).add(key)
        self.stats.queries += 1
        while len(self._sent) > self.max_entries:
            self._drop(next(iter(self._sent)))
            self.stats.queries_evicted += 1

    def match(self, ends: DnsEnds, msg: DnsMessage, now: float) -> str | None:
        """Consume the query `msg` answers: None when it matched in time, else the reason."""
        self._forget_older_than(now - self.window_s * LATE_GRACE)
        key = (ends.proto, ends.dst, ends.dport, ends.src, ends.sport, msg.id, msg.qname,
               msg.qtype)
        sent = self._sent.get(key)
        if sent is not None:
            self._drop(key)
            if now - sent > self.window_s:
                return "expired"
            self.stats.queries_matched += 1
            return None
        return self._why_not(ends, msg)

    def _why_not(self, ends: DnsEnds, msg: DnsMessage) -> str:
        pending = self._by_client.get((ends.proto, ends.dst, ends.dport))
        if not pending:
            return "no_query"
        resolver = (ends.src, ends.sport)
        to_resolver = [k for k in pending if (k[3], k[4]) == resolver]
        question = (msg.id, msg.qname, msg.qtype)
        if any(k[5:] == question for k in pending if (k[3], k[4]) != resolver):
            return "wrong_resolver"
        if any(k[5] == msg.id for k in to_resolver):
            return "question_mismatch"
        if to_resolver:
            return "id_mismatch"
        return "wrong_resolver"

    def _forget_older_than(self, cutoff: float) -> None:
        while self._sent:
            key, sent = next(iter(self._sent.items()))
            if sent >= cutoff:
                return
            self._drop(key)
            self.stats.queries_unanswered += 1

    def _drop(self, key: _QueryKey) -> None:
        del self._sent[key]
        client = (key[0], key[1], key[2])
        keys = self._by_client.get(client)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_client[client]
