"""DNS answers seen on ingress, and the IP -> names cache that attributes SNI-less flows.

The kernel sends the first 512 bytes of each DNS response (UDP or TCP source
port 53), so a message may be cut short: the parser keeps every answer that is
complete and reports the rest as truncated. Names are lower case without the
trailing dot; bytes that are not printable (or a '.' inside a label) are
escaped as \\DDD, as in zone files.

Message layout (RFC 1035 §4.1)::

    header(12): id | flags | qdcount | ancount | nscount | arcount
    question:   qname qtype(2) qclass(2)
    answer RR:  name type(2) class(2) ttl(4) rdlength(2) rdata
    (over TCP the message is preceded by a 2-byte length, RFC 1035 §4.2.2)
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
HEADER_LEN = 12
MAX_NAME_LEN = 255  # wire length, RFC 1035 §2.3.4
MAX_POINTER_JUMPS = 32
MAX_RECORDS = 256  # per section parsed; a 512-byte capture holds far fewer
MAX_CHAIN = 16  # CNAME hops followed


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """An A, AAAA or CNAME record: `value` is the address text or the CNAME target."""

    name: str
    rtype: int
    ttl: int
    value: str


@dataclass(frozen=True, slots=True)
class DnsMessage:
    """What the cache needs from a DNS message.

    truncated: the bytes ended before all announced answers were read (capture
        limit) or the TC flag was set.
    skipped: answer records of other types (and classes) that were skipped.
    """

    id: int
    is_response: bool
    rcode: int
    qname: str | None
    qtype: int | None
    answers: tuple[DnsAnswer, ...]
    truncated: bool
    skipped: int = 0


def _read_name(buf: bytes, p: int, end: int) -> tuple[str, int] | None:
    """Decode a possibly compressed name at p -> (name, offset after it in place).

    Compression pointers must point strictly backwards from the label that
    holds them and at most MAX_POINTER_JUMPS are followed: no loops.
    """
    labels: list[str] = []
    wire_len = 0
    after: int | None = None
    jumps = 0
    while True:
        if p >= end:
            return None
        ln = buf[p]
        if ln == 0:
            p += 1
            break
        kind = ln & 0xC0
        if kind == 0xC0:
            if p + 1 >= end:
                return None
            target = ((ln & 0x3F) << 8) | buf[p + 1]
            if after is None:
                after = p + 2
            if target >= p or jumps >= MAX_POINTER_JUMPS:
                return None
            jumps += 1
            p = target
            continue
        if kind != 0:
            return None  # extended label types (RFC 6891 obsoleted 0x40)
        if p + 1 + ln > end:
            return None
        wire_len += ln + 1
        if wire_len + 1 > MAX_NAME_LEN:
            return None
        labels.append(_label_text(buf[p + 1 : p + 1 + ln]))
        p += 1 + ln
    return ".".join(labels), (after if after is not None else p)


def _label_text(raw: bytes) -> str:
    if all(0x21 <= c <= 0x7E and c not in (0x2E, 0x5C) for c in raw):
        return raw.decode("ascii").lower()
    return "".join(
        chr(c).lower() if 0x21 <= c <= 0x7E and c not in (0x2E, 0x5C) else f"\\{c:03d}"
        for c in raw
    )


def parse_dns_message(data: bytes, over_tcp: bool = False) -> DnsMessage | None:
    """Parse the question and the A/AAAA/CNAME answers of a DNS message.

    Returns None when the header or question cannot be read; answers cut off by
    the end of the data are dropped and `truncated` is set.
    """
    buf = bytes(data)
    if over_tcp:
        if len(buf) < 2:
            return None
        declared = int.from_bytes(buf[:2], "big")
        buf = buf[2 : 2 + declared]
    n = len(buf)
    if n < HEADER_LEN:
        return None
    ident = int.from_bytes(buf[0:2], "big")
    flags = int.from_bytes(buf[2:4], "big")
    qd = int.from_bytes(buf[4:6], "big")
    an = int.from_bytes(buf[6:8], "big")
    is_response = bool(flags & 0x8000)
    truncated = bool(flags & 0x0200)
    rcode = flags & 0x000F
    if (flags >> 11) & 0x0F not in (0, 2, 4, 5):  # opcode: query, status, notify, update
        return None
    p = HEADER_LEN
    qname: str | None = None
    qtype: int | None = None
    for i in range(min(qd, MAX_RECORDS)):
        r = _read_name(buf, p, n)
        if r is None or r[1] + 4 > n:
            if i == 0:
                return None
            truncated = True
            return DnsMessage(ident, is_response, rcode, qname, qtype, (), truncated)
        if i == 0:
            qname, qtype = r[0], int.from_bytes(buf[r[1] : r[1] + 2], "big")
        p = r[1] + 4
    answers: list[DnsAnswer] = []
    skipped = 0
    for _ in range(min(an, MAX_RECORDS)):
        rec = _read_record(buf, p, n)
        if rec is None:
            truncated = True
            break
        answer, p = rec
        if answer is None:
            skipped += 1
        else:
            answers.append(answer)
    return DnsMessage(ident, is_response, rcode, qname, qtype, tuple(answers), truncated, skipped)


def _read_record(buf: bytes, p: int, n: int) -> tuple[DnsAnswer | None, int] | None:
    r = _read_name(buf, p, n)
    if r is None:
        return None
    name, p = r
    if p + 10 > n:
        return None
    rtype = int.from_bytes(buf[p : p + 2], "big")
    rclass = int.from_bytes(buf[p + 2 : p + 4], "big") & 0x7FFF  # mDNS cache-flush bit
    ttl = int.from_bytes(buf[p + 4 : p + 8], "big")
    if ttl >= 0x80000000:  # RFC 2181 §8: treat as zero
        ttl = 0
    rdlen = int.from_bytes(buf[p + 8 : p + 10], "big")
    rd = p + 10
    end = rd + rdlen
    if end > n:
        return None
    if rclass != 1:
        return None, end
    if rtype == TYPE_A and rdlen == 4:
        return DnsAnswer(name, rtype, ttl, str(ipaddress.IPv4Address(buf[rd:end]))), end
    if rtype == TYPE_AAAA and rdlen == 16:
        return DnsAnswer(name, rtype, ttl, str(ipaddress.IPv6Address(buf[rd:end]))), end
    if rtype == TYPE_CNAME:
        target = _read_name(buf, rd, end)
        if target is None or target[1] != end:
            return None, end
        return DnsAnswer(name, rtype, ttl, target[0]), end
    return None, end


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
