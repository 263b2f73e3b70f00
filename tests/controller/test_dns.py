"""DNS answer parser and IP -> names cache: crafted and hostile messages, the corpus."""

from __future__ import annotations

import ipaddress
import struct
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR, dns_compress

from leaktap.controller.attribution.dns_cache import DnsCache
from leaktap.controller.protocols.dns import (
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    DnsAnswer,
    DnsMessage,
    parse_dns_message,
)
from tests.corpus import load_tsv, read_segments


def response(qname: str, answers: list[DNSRR], qtype: str = "A") -> bytes:
    """A compressed response, as resolvers send them."""
    pkt = DNS(id=7, qr=1, rd=1, ra=1, qd=DNSQR(qname=qname, qtype=qtype), an=answers)
    return bytes(dns_compress(pkt))


SF = response(
    "Acme.My.Salesforce.com.",
    [
        DNSRR(rrname="acme.my.salesforce.com.", type="CNAME", ttl=300, rdata="na1.force.com."),
        DNSRR(rrname="na1.force.com.", type="A", ttl=60, rdata="198.18.5.5"),
        DNSRR(rrname="na1.force.com.", type="AAAA", ttl=60, rdata="2001:db8::5"),
        DNSRR(rrname="na1.force.com.", type="TXT", ttl=60, rdata=b"skip me"),
    ],
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_parse_cname_chain() -> None:
    msg = parse_dns_message(SF)
    assert msg is not None and msg.is_response and msg.rcode == 0 and not msg.truncated
    assert msg.qname == "acme.my.salesforce.com" and msg.qtype == TYPE_A
    assert msg.answers == (
        DnsAnswer("acme.my.salesforce.com", TYPE_CNAME, 300, "na1.force.com"),
        DnsAnswer("na1.force.com", TYPE_A, 60, "198.18.5.5"),
        DnsAnswer("na1.force.com", TYPE_AAAA, 60, "2001:db8::5"),
    )
    assert msg.skipped == 1


def test_scapy_compresses_names() -> None:
    assert SF.count(b"\x03na1\x05force") == 1  # later owner names are compression pointers


def test_over_tcp_length_prefix() -> None:
    msg = parse_dns_message(struct.pack("!H", len(SF)) + SF, over_tcp=True)
    assert msg is not None and msg.answers == parse_dns_message(SF).answers  # type: ignore[union-attr]
    assert parse_dns_message(b"\x00", over_tcp=True) is None


def test_truncated_capture_keeps_complete_answers() -> None:
    msg = parse_dns_message(SF[:-20])  # the 512-byte capture cuts the last record
    assert msg is not None and msg.truncated
    assert [a.rtype for a in msg.answers] == [TYPE_CNAME, TYPE_A, TYPE_AAAA]
    cut = parse_dns_message(SF[: SF.index(b"\xc6\x12\x05\x05")])  # inside the A rdata
    assert cut is not None and cut.truncated and len(cut.answers) == 1


def _header(qd: int = 1, an: int = 1) -> bytes:
    return struct.pack("!HHHHHH", 1, 0x8180, qd, an, 0, 0)


def test_compression_loops_and_forward_pointers_rejected() -> None:
    # question name is a pointer to itself
    assert parse_dns_message(_header() + b"\xc0\x0c\x00\x01\x00\x01") is None
    # two pointers pointing at each other
    loop = _header() + b"\x01a\xc0\x0e" + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    assert parse_dns_message(loop) is None
    # forward pointer
    assert parse_dns_message(_header() + b"\xc0\x20\x00\x01\x00\x01" + bytes(40)) is None


def test_answer_with_looping_name_stops_parsing() -> None:
    q = b"\x01a\x00\x00\x01\x00\x01"
    rr = b"\xc0\x13" + b"\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc6\x12\x05\x05"
    msg = parse_dns_message(_header() + q + rr)
    assert msg is not None and msg.answers == () and msg.truncated


def test_overlong_name_rejected() -> None:
    name = (b"\x3f" + b"a" * 63) * 5 + b"\x00"  # 320 bytes > 255
    assert parse_dns_message(_header(an=0) + name + b"\x00\x01\x00\x01") is None


def test_odd_labels_escaped() -> None:
    q = b"\x03a.b\x04ex\x00m\x03com\x00\x00\x01\x00\x01"
    msg = parse_dns_message(_header(an=0) + q)
    assert msg is not None and msg.qname == "a\\046b.ex\\000m.com"


def test_bad_rdata_lengths_skipped() -> None:
    q = b"\x01a\x00\x00\x01\x00\x01"
    rr = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x05" + bytes(5)  # A with 5 bytes
    msg = parse_dns_message(_header() + q + rr)
    assert msg is not None and msg.answers == () and msg.skipped == 1


@pytest.mark.parametrize("data", [b"", bytes(11), b"GET / HTTP/1.1\r\n\r\n", _header(qd=1)])
def test_garbage_is_none(data: bytes) -> None:
    assert parse_dns_message(data) is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes_never_raise(data: bytes, over_tcp: bool) -> None:
    msg = parse_dns_message(data, over_tcp)
    assert msg is None or isinstance(msg, DnsMessage)
    DnsCache(max_entries=4).learn_bytes(data, over_tcp)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(SF) - 1), st.integers(0, 255)), max_size=6))
def test_mutated_response_never_raises(edits: list[tuple[int, int]]) -> None:
    data = bytearray(SF)
    for pos, val in edits:
        data[pos] = val
    cache = DnsCache(max_entries=4)
    cache.learn_bytes(bytes(data))
    cache.names_for("198.18.5.5")


# --- cache -------------------------------------------------------------------------


def test_cache_follows_cname_back_to_the_question() -> None:
    cache = DnsCache(clock=Clock())
    assert cache.learn_bytes(SF) == 2
    assert cache.names_for("198.18.5.5") == ["acme.my.salesforce.com", "na1.force.com"]
    assert cache.names_for("2001:0db8:0000::5") == ["acme.my.salesforce.com", "na1.force.com"]
    assert cache.names_for("198.18.5.6") == [] and cache.names_for("not-an-ip") == []


def test_cache_ttl_is_min_over_chain_and_expires() -> None:
    clock = Clock()
    cache = DnsCache(clock=clock, min_ttl=1.0)
    cache.learn_bytes(SF)
    clock.now += 59
    assert cache.names_for("198.18.5.5")
    clock.now += 2  # the A record's 60 s TTL is the chain's shortest
    assert cache.names_for("198.18.5.5") == []
    assert cache.stats.expired == 1 and len(cache) == 1  # the AAAA binding remains until asked
    assert cache.purge() == 1 and len(cache) == 0


def test_cache_min_ttl_floor() -> None:
    clock = Clock()
    cache = DnsCache(clock=clock, min_ttl=30.0)
    cache.learn_bytes(response("a.example", [DNSRR(rrname="a.example", ttl=0, rdata="198.18.0.1")]))
    clock.now += 29
    assert cache.names_for("198.18.0.1") == ["a.example"]
    clock.now += 2
    assert cache.names_for("198.18.0.1") == []


def test_cache_most_recent_name_first_and_dedup() -> None:
    clock = Clock()
    cache = DnsCache(clock=clock)
    cache.learn_bytes(response("a.example", [DNSRR(rrname="a.example", rdata="198.18.0.1")]))
    clock.now += 1
    cache.learn_bytes(response("b.example", [DNSRR(rrname="b.example", rdata="198.18.0.1")]))
    cache.learn_bytes(response("b.example", [DNSRR(rrname="b.example", rdata="198.18.0.1")]))
    assert cache.names_for("198.18.0.1") == ["b.example", "a.example"]


def test_cache_ignores_records_unrelated_to_the_question() -> None:
    cache = DnsCache(clock=Clock())
    msg = response("acme.my.salesforce.com", [
        DNSRR(rrname="acme.my.salesforce.com", rdata="198.18.5.5"),
        DNSRR(rrname="evil.example", rdata="198.18.9.9"),  # injected, not asked for
    ])
    assert cache.learn_bytes(msg) == 1
    assert cache.names_for("198.18.9.9") == [] and cache.stats.unrelated == 1


def test_cache_ignores_queries_and_errors() -> None:
    cache = DnsCache(clock=Clock())
    query = bytes(DNS(id=1, qd=DNSQR(qname="a.example")))
    nx = bytes(DNS(id=1, qr=1, rcode=3, qd=DNSQR(qname="a.example"),
                   an=[DNSRR(rrname="a.example", rdata="198.18.0.1")]))
    assert cache.learn_bytes(query) == 0 and cache.learn_bytes(nx) == 0
    assert cache.learn_bytes(b"junk") == 0
    assert cache.stats.ignored_messages == 3


def test_cache_cname_loop_is_bounded() -> None:
    cache = DnsCache(clock=Clock())
    msg = response("a.example", [
        DNSRR(rrname="a.example", type="CNAME", rdata="b.example"),
        DNSRR(rrname="b.example", type="CNAME", rdata="a.example"),
        DNSRR(rrname="b.example", rdata="198.18.0.2"),
    ])
    cache.learn_bytes(msg)
    assert cache.names_for("198.18.0.2") == ["a.example", "b.example"]


def test_cache_bounded_with_evictions_counted() -> None:
    cache = DnsCache(max_entries=3, clock=Clock())
    for i in range(5):
        name = f"h{i}.example"
        cache.learn_bytes(response(name, [DNSRR(rrname=name, rdata=f"198.18.0.{i}")]))
    assert len(cache) == 3 and cache.stats.evictions == 2
    assert cache.names_for("198.18.0.0") == [] and cache.names_for("198.18.0.4") == ["h4.example"]


# --- corpus: Zeek dns.log / Suricata eve answers ------------------------------------

DNS_PORTS = {53, 5353, 5355}
# Zeek rows whose answers are of types this parser skips by design.
OTHER_TYPES = {
    ("gemini._sftp-ssh._tcp.local", "gemini.local"): "mDNS SRV/PTR target, not A/AAAA/CNAME",
}


def _responses(path: str) -> list[DnsMessage]:
    out = []
    for seg in read_segments(path, tunnels=True):
        if seg.sport not in DNS_PORTS or not seg.payload:
            continue
        msg = parse_dns_message(seg.payload, over_tcp=seg.proto == "tcp")
        if msg is not None and msg.is_response:
            out.append(msg)
    return out


def _norm(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value.lower().rstrip(".")


def _expected_answers(row: dict[str, str]) -> list[str]:
    """A/AAAA/CNAME answers of a row: Zeek writes other types as 'TYPE ...' descriptors."""
    if row["answers"] == "-":
        return []
    return [_norm(a) for a in row["answers"].split(",") if " " not in a]


def _grouped() -> dict[str, list[dict[str, str]]]:
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in load_tsv("dns/expected.tsv"):
        groups[row["pcap_path"]].append(row)
    return dict(groups)


@pytest.mark.parametrize(
    ("pcap", "rows"),
    sorted(_grouped().items()),
    ids=lambda v: v.rsplit("/", 1)[-1] if isinstance(v, str) else "",
)
def test_corpus_dns_answers(pcap: str, rows: list[dict[str, str]]) -> None:
    msgs = _responses(pcap)
    ours = []
    for m in msgs:
        key = m.qname if m.qname is not None else (m.answers[0].name if m.answers else None)
        ours.append((key, [_norm(a.value) for a in m.answers], m))
    for row in rows:
        want = _expected_answers(row)
        if not want:
            continue  # nothing to learn: no response, NXDOMAIN, or only other types
        query = row["query"].lower()
        if (query, ",".join(want)) in OTHER_TYPES:
            assert any(m.qname is None and m.skipped and not m.answers for _, _, m in ours)
            continue
        assert (query, want) in [(k, a) for k, a, _ in ours], row
    # and the cache learns every address under the name that was asked
    cache = DnsCache()
    for m in msgs:
        cache.learn(m)
    for key, _answers, m in ours:
        for a in m.answers:
            if a.rtype in (TYPE_A, TYPE_AAAA) and key is not None:
                assert key in cache.names_for(a.value)
