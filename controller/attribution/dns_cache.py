"""The IP -> names cache learned from DNS answers; it attributes SNI-less flows."""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from leaktap.controller.attribution.dns_queries import DnsEnds, PendingQueries
from leaktap.controller.protocols.dns import (
    MAX_CHAIN,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    DnsMessage,
    parse_dns_message,
)

logger = logging.getLogger(__name__)

IPPROTO_TCP = 6


@dataclass(slots=True)
class DnsCacheStats:
    """Monotonic counters; the controller exports them and logs deltas."""

    learned: int = 0  # address records stored
    evictions: int = 0  # entries pushed out by max_entries
    expired: int = 0
    unrelated: int = 0  # records not chained to the question, ignored
    ignored_messages: int = 0  # queries, errors, unparsable
    # the pending-query table (dns_queries.PendingQueries)
    queries: int = 0  # queries this host sent, recorded as pending
    queries_matched: int = 0  # answers that matched one (and were learned)
    queries_evicted: int = 0  # pending queries pushed out by dns.pending_max
    queries_unanswered: int = 0  # pending queries forgotten without an answer
    queries_inbound: int = 0  # queries arriving at this host (a local server's): not pending
    queries_not_inside: int = 0  # gateway: a query from outside the `inside` networks
    queries_other_resolver: int = 0  # sent to a resolver not in dns.resolvers: not pending
    # answers not learned, by reason (see dns_queries for the rules)
    rejected_no_query: int = 0
    rejected_wrong_resolver: int = 0
    rejected_question_mismatch: int = 0
    rejected_id_mismatch: int = 0
    rejected_expired: int = 0
    rejected_outbound_answer: int = 0  # an answer leaving this host (a local process)
    trusted_unmatched: int = 0  # replay --trust-unmatched-dns: answers without a query learned
    # a ClientHello named a flow other than the CRM its address's DNS names gave (a finding)
    dns_sni_mismatch: int = 0


@dataclass(slots=True)
class _Binding:
    names: tuple[str, ...]  # queried name first, the address owner last
    expires: float


class DnsCache:
    """IP address -> host names learned from answers, with TTL expiry and a size bound.

    A CNAME chain inside one answer is followed back to the name that was asked:
    for ``acme.my.salesforce.com CNAME na1.force.com`` and ``na1.force.com A
    198.18.5.5``, ``names_for("198.18.5.5")`` gives ``["acme.my.salesforce.com",
    "na1.force.com"]``. An address record that does not chain to the question is
    ignored (it cannot be what the client is about to connect to); responses
    without a question (mDNS announcements) are learned as they are.

    TTLs are clamped to [min_ttl, max_ttl]: clients connect right after a TTL-0
    answer and keep using addresses a little past expiry.

    What the kernel samples goes through `observe`, which learns an answer only
    when it answers a query this host sent (`PendingQueries`); `learn` and
    `learn_bytes` store a message unconditionally (tests, trusted sources).
    `clients` (gateway mode: the inside networks) limits whose queries count,
    `resolvers` (when set) which resolvers' answers may be learned;
    `trust_unmatched` learns an answer with no query at all (`leaktap replay
    --trust-unmatched-dns`, for captures that start after the query).
    """

    def __init__(
        self,
        max_entries: int = 65536,
        clock: Callable[[], float] = time.monotonic,
        min_ttl: float = 30.0,
        max_ttl: float = 86400.0,
        *,
        query_window_s: float = 5.0,
        pending_max: int = 4096,
        clients: Sequence[str] = (),
        resolvers: Sequence[str] = (),
        trust_unmatched: bool = False,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self._clock = clock
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        # ip -> bindings (most recent last); the OrderedDict is in least-recently-learned order
        self._map: OrderedDict[str, list[_Binding]] = OrderedDict()
        self.stats = DnsCacheStats()
        self.pending = PendingQueries(self.stats, query_window_s, pending_max)
        self._clients = [ipaddress.ip_network(n, strict=False) for n in clients]
        self._resolvers = [ipaddress.ip_network(n, strict=False) for n in resolvers]
        self.trust_unmatched = trust_unmatched
        # called with (ip, names) for every address learned (enforcement: refused addresses)
        self.on_learn: Callable[[str, tuple[str, ...]], None] | None = None

    def __len__(self) -> int:
        return len(self._map)

    def learn(self, msg: DnsMessage) -> int:
        """Store the address answers of a response; returns how many were stored."""
        if not msg.is_response or msg.rcode != 0 or not msg.answers:
            self.stats.ignored_messages += 1
            return 0
        now = self._clock()
        alias_of: dict[str, tuple[str, int]] = {}  # CNAME target -> (owner, ttl)
        for a in msg.answers:
            if a.rtype == TYPE_CNAME and a.value not in alias_of and a.value != a.name:
                alias_of[a.value] = (a.name, a.ttl)
        stored = 0
        for a in msg.answers:
            if a.rtype not in (TYPE_A, TYPE_AAAA):
                continue
            chain = [a.name]
            ttl = a.ttl
            while chain[-1] in alias_of and len(chain) <= MAX_CHAIN:
                owner, cttl = alias_of[chain[-1]]
                if owner in chain:
                    break
                chain.append(owner)
                ttl = min(ttl, cttl)
            chain.reverse()
            if msg.qname is not None and chain[0] != msg.qname:
                self.stats.unrelated += 1
                continue
            self._store(a.value, tuple(chain), now + min(max(ttl, self.min_ttl), self.max_ttl))
            stored += 1
        return stored

    def learn_bytes(self, data: bytes, over_tcp: bool = False) -> int:
        """Parse and learn a captured DNS message; unparsable data is counted and ignored."""
        msg = parse_dns_message(data, over_tcp)
        if msg is None:
            self.stats.ignored_messages += 1
            return 0
        return self.learn(msg)

    def observe(self, data: bytes, ends: DnsEnds, direction: str | None, now: float) -> int:
        """A DNS message the kernel sampled; returns the address records learned.

        direction: "out" (it left this host), "in" (it arrived), None (a hook that
        sees both directions: gateway, mirror port, replay). `now` is the packet's
        time in seconds, on any clock that is the same for queries and answers.
        """
        msg = parse_dns_message(data, ends.proto == IPPROTO_TCP)
        if msg is None:
            self.stats.ignored_messages += 1
            return 0
        if not msg.is_response:
            self._on_query(msg, ends, direction, now)
            return 0
        if direction == "out":
            # a local process (or server) answering: never an answer to this host
            self.stats.rejected_outbound_answer += 1
            return 0
        reason = self.pending.match(ends, msg, now)
        if reason is None:
            return self.learn(msg)
        if reason == "no_query" and self.trust_unmatched:
            self.stats.trusted_unmatched += 1
            return self.learn(msg)
        field = f"rejected_{reason}"
        setattr(self.stats, field, getattr(self.stats, field) + 1)
        logger.debug("DNS answer for %s from %s:%d to %s:%d not learned: %s",
                     msg.qname, ends.src, ends.sport, ends.dst, ends.dport, reason)
        return 0

    def _on_query(self, msg: DnsMessage, ends: DnsEnds, direction: str | None,
                  now: float) -> None:
        if direction == "in":
            self.stats.queries_inbound += 1
        elif self._clients and not _in_any(ends.src, self._clients):
            self.stats.queries_not_inside += 1
        elif self._resolvers and not _in_any(ends.dst, self._resolvers):
            self.stats.queries_other_resolver += 1
        else:
            self.pending.add(ends, msg, now)

    def _store(self, ip: str, names: tuple[str, ...], expires: float) -> None:
        key = _canonical_ip(ip)
        if key is None:
            return
        bindings = self._map.pop(key, None) or []
        bindings = [b for b in bindings if b.names != names] + [_Binding(names, expires)]
        self._map[key] = bindings[-8:]
        self.stats.learned += 1
        while len(self._map) > self.max_entries:
            self._map.popitem(last=False)
            self.stats.evictions += 1
        if self.on_learn is not None:
            self.on_learn(key, names)

    def bindings_of(self, ip: str) -> list[tuple[str, ...]]:
        """The name chains (queried name first) still valid for one address."""
        now = self._clock()
        key = _canonical_ip(ip)
        return [b.names for b in self._map.get(key or "", []) if b.expires > now]

    def live_bindings(self) -> dict[str, list[tuple[str, ...]]]:
        """Every address with the name chains (queried name first) still valid for it."""
        now = self._clock()
        return {ip: [b.names for b in bindings if b.expires > now]
                for ip, bindings in list(self._map.items())
                if any(b.expires > now for b in bindings)}

    def names_for(self, ip: str) -> list[str]:
        """Names that resolved to `ip` and are still valid, most recent answer first."""
        key = _canonical_ip(ip)
        if key is None:
            return []
        bindings = self._map.get(key)
        if not bindings:
            return []
        now = self._clock()
        live = [b for b in bindings if b.expires > now]
        if len(live) != len(bindings):
            self.stats.expired += len(bindings) - len(live)
            if live:
                self._map[key] = live
            else:
                del self._map[key]
        out: list[str] = []
        for b in reversed(live):
            for name in b.names:
                if name not in out:
                    out.append(name)
        return out

    def purge(self) -> int:
        """Drop expired bindings everywhere (call now and then); returns how many."""
        now = self._clock()
        dropped = 0
        for key in list(self._map):
            bindings = self._map[key]
            live = [b for b in bindings if b.expires > now]
            dropped += len(bindings) - len(live)
            if live:
                self._map[key] = live
            else:
                del self._map[key]
        self.stats.expired += dropped
        return dropped


def _in_any(ip: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr.version == n.version and addr in n for n in networks)


@functools.lru_cache(maxsize=4096)  # every drained flow asks twice: parse each address once
def _canonical_ip(ip: str) -> str | None:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return None
