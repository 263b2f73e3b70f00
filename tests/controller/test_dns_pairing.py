"""The pending-query table and DnsCache.observe without a kernel (issue 17.1): the rules
for which answers name addresses; tests/bpf/test_tc_dns_pairing.py runs them on real samples."""

from __future__ import annotations

from scapy.layers.dns import DNS, DNSQR, DNSRR

from leaktap.controller.attribution.dns_cache import DnsCache
from leaktap.controller.attribution.dns_queries import LATE_GRACE, DnsEnds

CLIENT, RESOLVER = "198.18.0.10", "198.18.0.53"
NAME, IP = "acme.my.salesforce.com", "198.19.7.7"
OUT = DnsEnds(17, CLIENT, 40000, RESOLVER, 53)
BACK = DnsEnds(17, RESOLVER, 53, CLIENT, 40000)


def query(ident: int = 1, name: str = NAME, qtype: str = "A") -> bytes:
    return bytes(DNS(id=ident, rd=1, qd=DNSQR(qname=name, qtype=qtype)))


def answer(ident: int = 1, name: str = NAME, ip: str = IP) -> bytes:
    return bytes(DNS(id=ident, qr=1, qd=DNSQR(qname=name),
                     an=DNSRR(rrname=name, type="A", ttl=300, rdata=ip)))


def test_answer_in_the_window_is_learned_and_consumes_the_query() -> None:
    cache = DnsCache()
    cache.observe(query(), OUT, "out", 100.0)
    assert cache.observe(answer(), BACK, "in", 104.9) == 1
    assert cache.names_for(IP) == [NAME] and len(cache.pending) == 0


def test_question_type_must_match() -> None:
    cache = DnsCache()
    cache.observe(query(qtype="AAAA"), OUT, "out", 100.0)
    assert cache.observe(answer(), BACK, "in", 100.1) == 0
    assert cache.stats.rejected_question_mismatch == 1


def test_late_answers_are_expired_then_unknown_once_the_query_is_forgotten() -> None:
    cache = DnsCache(query_window_s=2.0)
    cache.observe(query(ident=1), OUT, "out", 100.0)
    cache.observe(query(ident=2), OUT, "out", 100.0)
    cache.observe(answer(ident=1), BACK, "in", 102.5)
    cache.observe(answer(ident=2), BACK, "in", 100.0 + 2.0 * LATE_GRACE + 0.1)
    assert cache.names_for(IP) == []
    assert (cache.stats.rejected_expired, cache.stats.rejected_no_query) == (1, 1)
    assert cache.stats.queries_unanswered == 1


def test_repeated_query_refreshes_its_time() -> None:
    cache = DnsCache(query_window_s=2.0)
    cache.observe(query(), OUT, "out", 100.0)
    cache.observe(query(), OUT, "out", 101.5)
    assert cache.observe(answer(), BACK, "in", 103.0) == 1
    assert len(cache.pending) == 0


def test_without_direction_queries_and_answers_are_told_by_their_qr_bit() -> None:
    # a gateway or replay: both ways on one hook; an answer cannot be "outbound" there
    cache = DnsCache()
    cache.observe(query(), OUT, None, 1.0)
    assert cache.observe(answer(), BACK, None, 1.1) == 1


def test_gateway_counts_only_queries_of_inside_clients() -> None:
    cache = DnsCache(clients=["198.18.0.0/24"])
    outside = DnsEnds(17, "198.19.9.9", 40000, RESOLVER, 53)
    cache.observe(query(), outside, None, 1.0)
    cache.observe(answer(), DnsEnds(17, RESOLVER, 53, "198.19.9.9", 40000), None, 1.1)
    assert cache.names_for(IP) == []
    assert (cache.stats.queries_not_inside, cache.stats.rejected_no_query) == (1, 1)


def test_resolver_allow_list() -> None:
    cache = DnsCache(resolvers=["198.18.0.53/32"])
    rogue = DnsEnds(17, CLIENT, 40001, "198.18.0.99", 53)
    cache.observe(query(), rogue, "out", 1.0)
    cache.observe(answer(), DnsEnds(17, "198.18.0.99", 53, CLIENT, 40001), "in", 1.1)
    cache.observe(query(), OUT, "out", 1.0)
    cache.observe(answer(ip="198.19.8.8"), BACK, "in", 1.1)
    assert cache.names_for(IP) == [] and cache.names_for("198.19.8.8") == [NAME]
    assert cache.stats.queries_other_resolver == 1


def test_trust_unmatched_learns_answers_without_any_query_only() -> None:
    cache = DnsCache(trust_unmatched=True)
    assert cache.observe(answer(), BACK, None, 1.0) == 1
    cache.observe(query(ident=5), OUT, None, 2.0)
    assert cache.observe(answer(ident=6, ip="198.19.8.8"), BACK, None, 2.1) == 0
    assert (cache.stats.trusted_unmatched, cache.stats.rejected_id_mismatch) == (1, 1)


def test_query_arriving_is_not_pending_and_unparsable_is_counted() -> None:
    cache = DnsCache()
    cache.observe(query(), BACK, "in", 1.0)
    cache.observe(b"\x00\x01", OUT, "out", 1.0)
    assert (cache.stats.queries_inbound, cache.stats.ignored_messages, len(cache.pending)) == (
        1, 1, 0)
