"""DNS and QUIC Initial sampling on TC egress and ingress (lt_flow.h): queries are
sampled leaving, answers arriving; an answer leaving and a query arriving are counted."""

from __future__ import annotations

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR

from leaktap.controller.attribution.dns_cache import DnsCache
from leaktap.controller.kernel import abi
from tests.bpf.lt_frames import CLIENT4, CLIENT6, SERVER4, SERVER6, client_hello, tcp4, udp4, udp6

pytestmark = pytest.mark.kernel

LIMITS = abi.defines()
DNS_SNAP = LIMITS["LT_DNS_SNAP"]
SNAP = LIMITS["LT_SNAP"]
QUIC_FLOOR = LIMITS["LT_QUIC_MIN_DATAGRAM"]
RESOLVER = "198.18.0.53"
NAME = "acme.my.salesforce.com"
CRM_IP = "198.19.7.7"


def dns_answer(name: str = NAME, ip: str = CRM_IP, extra_txt: int = 0) -> bytes:
    """A DNS response for `name` A `ip`; extra_txt pads it with a TXT answer of that size."""
    an = DNSRR(rrname=name, type="A", ttl=300, rdata=ip)
    if extra_txt:
        an = an / DNSRR(rrname=name, type="TXT", ttl=300, rdata=[b"t" * 200] * (extra_txt // 201))
    return bytes(DNS(id=7, qr=1, aa=0, rd=1, ra=1, qd=DNSQR(qname=name), an=an))


ANSWER = dns_answer()


def test_udp_answer_from_port_53_is_one_dns_sample_with_the_whole_message(tc):
    out = tc.run(udp4(ANSWER, src=RESOLVER, dst=CLIENT4, sport=53, dport=43001),
                 direction="ingress")

    assert out.changed() == {"cnt_flow_new": 1, "cnt_ev_dns": 1}
    [s] = out.samples
    assert (s.kind, s.data, s.payload_len, s.seq) == ("dns", ANSWER, len(ANSWER), 0)
    assert (s.proto, s.src, s.sport, s.dst, s.dport) == (17, RESOLVER, 53, CLIENT4, 43001)
    cache = DnsCache()
    cache.learn_bytes(s.data)
    assert NAME in cache.names_for(CRM_IP)


def test_large_answer_is_cut_to_512_bytes_and_counted_as_truncated(tc):
    answer = dns_answer(extra_txt=620)
    assert 650 <= len(answer) <= 800

    out = tc.run(udp4(answer, src=RESOLVER, dst=CLIENT4, sport=53, dport=43002),
                 direction="ingress")

    [s] = out.samples
    assert (len(s.data), s.data, s.payload_len) == (DNS_SNAP, answer[:DNS_SNAP], len(answer))
    assert out.changed() == {"cnt_flow_new": 1, "cnt_ev_dns": 1, "loss_truncated": 1}


def test_tcp_answer_from_port_53_is_captured(tc):
    message = len(ANSWER).to_bytes(2, "big") + ANSWER  # DNS over TCP: length prefix
    out = tc.run(tcp4(message, src=RESOLVER, dst=CLIENT4, sport=53, dport=43003, seq=99),
                 direction="ingress")

    [s] = out.samples
    assert (s.kind, s.proto, s.data, s.seq) == ("dns", 6, message, 99)
    cache = DnsCache()
    cache.learn_bytes(s.data, over_tcp=True)
    assert NAME in cache.names_for(CRM_IP)


def test_ipv6_answer(tc):
    out = tc.run(udp6(ANSWER, src=SERVER6, dst=CLIENT6, sport=53, dport=43004),
                 direction="ingress")

    assert [(s.kind, s.family, s.data) for s in out.samples] == [("dns", 6, ANSWER)]


QUERY = bytes(DNS(id=8, rd=1, qd=DNSQR(qname=NAME)))


def test_query_leaving_is_sampled(tc):
    out = tc.run(udp4(QUERY, src=CLIENT4, dst=RESOLVER, sport=43005, dport=53))

    [s] = out.samples
    assert (s.kind, s.dir, s.data, s.sport, s.dport) == ("dns", 0, QUERY, 43005, 53)
    assert out.changed() == {"cnt_flow_new": 1, "cnt_ev_dns": 1}
    assert out.flow().key.dport == 53


def test_tcp_query_leaving_is_sampled(tc):
    message = len(QUERY).to_bytes(2, "big") + QUERY
    out = tc.run(tcp4(message, src=CLIENT4, dst=RESOLVER, sport=43009, dport=53, seq=7))

    assert [(s.kind, s.proto, s.data, s.seq) for s in out.samples] == [("dns", 6, message, 7)]


def test_answer_leaving_the_host_is_counted_not_sampled(tc):
    # a local process forging an answer (or a local server answering): never learned
    out = tc.run([udp4(ANSWER, src=RESOLVER, dst=CLIENT4, sport=53, dport=43010),
                  tcp4(len(ANSWER).to_bytes(2, "big") + ANSWER, src=RESOLVER, dst=CLIENT4,
                       sport=53, dport=43011)])

    assert out.samples == []
    assert out.changed() == {"cnt_flow_new": 2, "cnt_dns_ans_out": 2}


def test_query_arriving_is_counted_not_sampled(tc):
    out = tc.run(udp4(QUERY, src=RESOLVER, dst=CLIENT4, sport=43012, dport=53),
                 direction="ingress")

    assert out.samples == []
    assert out.changed() == {"cnt_flow_new": 1, "cnt_dns_qry_in": 1}


def test_answers_are_sampled_beyond_the_probe_budget(tc):
    # DNS is never gated by LT_PROBE_SEGS: every answer may name a destination.
    frames = [udp4(dns_answer(ip=f"198.19.8.{i}"), src=RESOLVER, dst=CLIENT4, sport=53,
                   dport=43006) for i in range(30)]

    out = tc.run(frames, direction="ingress")

    assert len(out.samples) == 30
    assert out.stats["cnt_ev_dns"] == 30


def test_ingress_answer_is_sampled_with_direction_1_and_cgroup_0(tc):
    out = tc.run(udp4(ANSWER, src=RESOLVER, dst=CLIENT4, sport=53, dport=43007),
                 direction="ingress")

    [s] = out.samples
    assert (s.kind, s.dir, s.cgroup_id, s.data) == ("dns", 1, 0, ANSWER)
    key = out.flow().key
    assert (key.dir, key.cgroup_id, key.src, key.sport) == (1, 0, RESOLVER, 53)
    assert out.totals[1] == (len(udp4(ANSWER, src=RESOLVER, dst=CLIENT4, sport=53,
                                       dport=43007)), 1)
    assert out.changed() == {"cnt_flow_new": 1, "cnt_ev_dns": 1}


def test_ingress_tcp_answer_is_sampled(tc):
    message = len(ANSWER).to_bytes(2, "big") + ANSWER
    out = tc.run(tcp4(message, src=RESOLVER, dst=CLIENT4, sport=53, dport=43008),
                 direction="ingress")

    assert [(s.kind, s.dir, s.data) for s in out.samples] == [("dns", 1, message)]


# ---- QUIC ----------------------------------------------------------------------

QUIC_V1, QUIC_V2 = 0x00000001, 0x6B3343CF


def quic_long(first: int, version: int, size: int = 1200) -> bytes:
    """A long-header datagram: first byte, version, DCID/SCID, then padding to `size`."""
    head = bytes([first]) + version.to_bytes(4, "big") + b"\x08" + b"\x11" * 8 + b"\x00"
    return head + b"\x00" * (size - len(head))


@pytest.mark.parametrize(
    ("datagram", "sampled"),
    [
        (quic_long(0xC3, QUIC_V1), True),  # v1 Initial
        (quic_long(0xD3, QUIC_V2), True),  # v2 Initial (type bits 01)
        (quic_long(0xC3, 0xFF00001D), True),  # unknown version (draft-29): kept for user space
        (quic_long(0xE3, QUIC_V1), False),  # v1 Handshake
        (quic_long(0xD3, QUIC_V1), False),  # v1 0-RTT
        (quic_long(0xC3, QUIC_V2), False),  # v2 0-RTT (type bits 00)
        (quic_long(0xC3, 0), False),  # version negotiation
        (b"\x43" + b"\x11" * 1199, False),  # short header
        (quic_long(0xC3, QUIC_V1, size=QUIC_FLOOR - 1), False),  # below the floor
        (quic_long(0xC3, QUIC_V1, size=QUIC_FLOOR), True),  # at the floor
    ],
    ids=["v1-initial", "v2-initial", "unknown-version", "v1-handshake", "v1-0rtt",
         "v2-type0", "version-negotiation", "short-header", "short-datagram", "floor-datagram"],
)
def test_quic_long_header_initials_are_sampled(tc, datagram, sampled):
    out = tc.run(udp4(datagram, sport=43100, dport=443))

    if sampled:
        [s] = out.samples
        assert (s.kind, s.data, s.payload_len, s.proto) == (
            "quic_initial", datagram, len(datagram), 17
        )
        assert out.changed() == {"cnt_flow_new": 1, "cnt_ev_quic": 1}
    else:
        assert out.samples == []
        assert out.changed() == {"cnt_flow_new": 1}


def test_quic_initial_larger_than_an_event_is_cut_and_counted(tc):
    datagram = quic_long(0xC3, QUIC_V1, size=2500)

    out = tc.run(udp4(datagram, sport=43101, dport=443))

    [s] = out.samples
    assert (len(s.data), s.data, s.payload_len) == (SNAP, datagram[:SNAP], 2500)
    assert out.changed() == {"cnt_flow_new": 1, "cnt_ev_quic": 1, "loss_truncated": 1}


def test_quic_initial_is_looked_for_only_in_the_first_probe_segments(tc):
    probe = LIMITS["LT_PROBE_SEGS"]
    short = udp4(b"\x43" + b"\x22" * 1199, sport=43102, dport=443)
    initial = udp4(quic_long(0xC3, QUIC_V1), sport=43102, dport=443)

    last_in_budget = tc.run([short] * (probe - 1) + [initial])
    assert len(last_in_budget.samples) == 1
    past_budget = tc.run([short] * probe + [initial])
    assert past_budget.samples == []


def test_quic_over_ipv6(tc):
    datagram = quic_long(0xC3, QUIC_V1)
    out = tc.run(udp6(datagram, sport=43103, dport=443))

    assert [(s.kind, s.family, s.data) for s in out.samples] == [("quic_initial", 6, datagram)]


def test_no_quic_or_hello_sampling_on_ingress(tc):
    out = tc.run(
        [udp4(quic_long(0xC3, QUIC_V1), src=SERVER4, dst=CLIENT4, sport=443, dport=43104),
         tcp4(client_hello(), src=SERVER4, dst=CLIENT4, sport=443, dport=43105)],
        direction="ingress",
    )

    assert out.samples == []
    assert out.changed() == {"cnt_flow_new": 2}
