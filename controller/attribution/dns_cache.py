"""The IP -> names cache learned from DNS answers; it attributes SNI-less flows."""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from leaktap.controller.protocols.dns import (
    MAX_CHAIN,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    DnsMessage,
    parse_dns_message,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class DnsCacheStats:
    """Monotonic counters; the controller exports them and logs deltas."""

    learned: int = 0  # address records stored
    evictions: int = 0  # entries pushed out by max_entries
    expired: int = 0
    unrelated: int = 0  # records not chained to the question, ignored
    ignored_messages: int = 0  # queries, errors, unparsable


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
    """

    def __init__(
        self,
        max_entries: int = 65536,
        clock: Callable[[], float] = time.monotonic,
        min_ttl: float = 30.0,
        max_ttl: float = 86400.0,
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


def _canonical_ip(ip: str) -> str | None:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return None
