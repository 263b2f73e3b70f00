"""DNS messages as the kernel samples them: bounded parsing of questions and answers.

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
