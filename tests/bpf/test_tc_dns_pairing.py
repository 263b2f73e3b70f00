"""DNS answers name addresses only when they answer a query this host sent (issue 17.1).

Queries run through the real TC egress program and answers through the real
TC ingress program (BPF_PROG_TEST_RUN); the samples go to the attributor the
agent uses. Before the fix, any answer from source port 53 was learned.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR

from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.attribution.flows import Conversation, ConversationTable
from leaktap.controller.config import LeaktapConfig
from leaktap.controller.kernel.ringbuf import Sample
from tests.bpf.harness import Harness
from tests.bpf.lt_frames import CLIENT4, CLIENT6, client_hello, tcp4, udp4, udp6

pytestmark = pytest.mark.kernel

RESOLVER = "198.18.0.53"
OTHER_RESOLVER = "198.18.0.54"
NAME = "acme.my.salesforce.com"
CRM_IP = "198.19.7.7"
CPORT = 43500


def query(ident: int = 7, name: str = NAME, qtype: str = "A") -> bytes:
    return bytes(DNS(id=ident, rd=1, qd=DNSQR(qname=name, qtype=qtype)))


def answer(ident: int = 7, name: str = NAME, ip: str = CRM_IP) -> bytes:
    return bytes(DNS(id=ident, qr=1, rd=1, ra=1, qd=DNSQR(qname=name),
                     an=DNSRR(rrname=name, type="A", ttl=300, rdata=ip)))


def sent(tc: Harness, message: bytes, sport: int = CPORT, resolver: str = RESOLVER) -> Sample:
    out = tc.run(udp4(message, src=CLIENT4, dst=resolver, sport=sport, dport=53))
    [s] = out.samples
    assert (s.dir, s.kind) == (0, "dns")
    return s


def received(tc: Harness, message: bytes, dport: int = CPORT,
             resolver: str = RESOLVER) -> Sample:
    out = tc.run(udp4(message, src=resolver, dst=CLIENT4, sport=53, dport=dport),
                 direction="ingress")
    [s] = out.samples
    assert (s.dir, s.kind) == (1, "dns")
    return s


@pytest.fixture
def attributor() -> Attributor:
    return Attributor(LeaktapConfig(), live=True)


def rejected(a: Attributor) -> dict[str, int]:
    stats = dataclasses.asdict(a.dns.stats)
    return {k: v for k, v in stats.items() if k.startswith("rejected_") and v}


def test_unsolicited_answer_names_nothing(tc: Harness, attributor: Attributor) -> None:
    attributor.on_sample(received(tc, answer()))

    assert attributor.dns.names_for(CRM_IP) == []
    assert rejected(attributor) == {"rejected_no_query": 1}
    assert attributor.dns.stats.learned == 0


def test_answer_to_a_query_sent_names_the_address(tc: Harness, attributor: Attributor) -> None:
    attributor.on_sample(sent(tc, query()))
    attributor.on_sample(received(tc, answer()))

    assert attributor.dns.names_for(CRM_IP) == [NAME]
    assert (attributor.dns.stats.queries, attributor.dns.stats.queries_matched) == (1, 1)
    assert rejected(attributor) == {}


def test_a_match_consumes_the_query(tc: Harness, attributor: Attributor) -> None:
    attributor.on_sample(sent(tc, query()))
    attributor.on_sample(received(tc, answer()))
    attributor.on_sample(received(tc, answer(ip="198.19.6.6")))

    assert attributor.dns.names_for("198.19.6.6") == []
    assert rejected(attributor) == {"rejected_no_query": 1}


def test_0x20_randomised_question_matches(tc: Harness, attributor: Attributor) -> None:
    attributor.on_sample(sent(tc, query(name="AcMe.mY.SalesForce.COM")))
    attributor.on_sample(received(tc, answer(name="aCmE.My.sAlEsFoRcE.cOm")))

    assert attributor.dns.names_for(CRM_IP) == [NAME]


def test_tcp_query_and_answer_match(tc: Harness, attributor: Attributor) -> None:
    q, a = query(ident=9), answer(ident=9)
    out_q = tc.run(tcp4(len(q).to_bytes(2, "big") + q, src=CLIENT4, dst=RESOLVER,
                        sport=CPORT + 1, dport=53))
    out_a = tc.run(tcp4(len(a).to_bytes(2, "big") + a, src=RESOLVER, dst=CLIENT4,
                        sport=53, dport=CPORT + 1), direction="ingress")
    for s in out_q.samples + out_a.samples:
        attributor.on_sample(s)

    assert attributor.dns.names_for(CRM_IP) == [NAME]


def test_ipv6_query_and_answer_match(tc: Harness, attributor: Attributor) -> None:
    resolver6 = "2001:db8:53::53"
    out_q = tc.run(udp6(query(), src=CLIENT6, dst=resolver6, sport=CPORT, dport=53))
    out_a = tc.run(udp6(answer(), src=resolver6, dst=CLIENT6, sport=53, dport=CPORT),
                   direction="ingress")
    for s in out_q.samples + out_a.samples:
        attributor.on_sample(s)

    assert attributor.dns.names_for(CRM_IP) == [NAME]


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (dict(resolver=OTHER_RESOLVER), "rejected_wrong_resolver"),
        (dict(message=answer(ident=8)), "rejected_id_mismatch"),
        (dict(message=answer(name="evil.example")), "rejected_question_mismatch"),
        (dict(dport=CPORT + 7), "rejected_no_query"),
    ],
    ids=["other-resolver", "wrong-id", "wrong-question", "other-client-port"],
)
def test_answer_not_matching_the_query_is_rejected_by_reason(
    tc: Harness, attributor: Attributor, reply: dict[str, object], reason: str
) -> None:
    attributor.on_sample(sent(tc, query()))
    kwargs = {"message": answer(), **reply}
    attributor.on_sample(received(tc, **kwargs))  # type: ignore[arg-type]

    assert attributor.dns.names_for(CRM_IP) == []
    assert rejected(attributor) == {reason: 1}


def test_late_answer_is_rejected_as_expired(tc: Harness, attributor: Attributor) -> None:
    q = sent(tc, query())
    a = received(tc, answer())
    window_ns = int(attributor.dns.pending.window_s * 1e9)
    attributor.on_sample(q)
    # the answer as if it had arrived one window plus a millisecond after the query
    attributor.on_sample(dataclasses.replace(a, ts_ns=q.ts_ns + window_ns + 1_000_000))

    assert attributor.dns.names_for(CRM_IP) == []
    assert rejected(attributor) == {"rejected_expired": 1}


def test_answer_sent_on_egress_is_ignored(tc: Harness, attributor: Attributor) -> None:
    # a local process forging an answer to itself: with a query pending, on both
    # transports; the kernel does not sample it, and user space would reject it
    attributor.on_sample(sent(tc, query()))
    forged = answer()
    out = tc.run([udp4(forged, src=RESOLVER, dst=CLIENT4, sport=53, dport=CPORT),
                  udp4(forged, src=RESOLVER, dst=CLIENT4, sport=53, dport=53)])

    assert out.changed() == {"cnt_flow_new": 2, "cnt_dns_ans_out": 1, "cnt_ev_dns": 1}
    [s] = out.samples  # port 53 to port 53 is sampled as a query: its QR bit says answer
    attributor.on_sample(s)
    assert attributor.dns.names_for(CRM_IP) == []
    assert rejected(attributor) == {"rejected_outbound_answer": 1}


def test_pending_queries_are_bounded_and_evictions_counted(tc: Harness) -> None:
    config = LeaktapConfig.model_validate({"dns": {"pending_max": 16}})
    attributor = Attributor(config, live=True)
    for i in range(20):
        attributor.on_sample(sent(tc, query(ident=100 + i), sport=CPORT + 10 + i))

    assert len(attributor.dns.pending) == 16
    assert attributor.dns.stats.queries_evicted == 4
    attributor.on_sample(received(tc, answer(ident=100), dport=CPORT + 10))  # evicted
    attributor.on_sample(received(tc, answer(ident=119), dport=CPORT + 29))
    assert rejected(attributor) == {"rejected_no_query": 1}
    assert attributor.dns.stats.queries_matched == 1


# ---- a ClientHello contradicting the DNS name (issue 17.1, last rule) -----------


def _conversation(tc: Harness, attributor: Attributor, sni: str, sport: int) -> Conversation:
    """A TCP flow to CRM_IP whose ClientHello carries `sni`, through TC egress."""
    out = tc.run([tcp4(b"", src=CLIENT4, dst=CRM_IP, sport=sport, dport=443, flags="S"),
                  tcp4(client_hello(sni), src=CLIENT4, dst=CRM_IP, sport=sport, dport=443)])
    for s in out.samples:
        attributor.on_sample(s)
    for name in out.names:  # the kernel names a single-segment hello (issue 12)
        attributor.on_kernel_name(name)
    table = ConversationTable()
    for counters in out.flows:
        conv = table.add(counters)
    return conv


def test_hello_naming_another_crm_than_dns_wins_and_is_a_finding(
    tc: Harness, attributor: Attributor, caplog: pytest.LogCaptureFixture
) -> None:
    attributor.on_sample(sent(tc, query()))
    attributor.on_sample(received(tc, answer()))  # CRM_IP is acme.my.salesforce.com
    conv = _conversation(tc, attributor, "globex.my.salesforce.com", sport=43600)

    with caplog.at_level(logging.WARNING):
        names = attributor.names(conv)
        again = attributor.names(conv)

    assert (names.sni, names.crm_vendor, names.crm_instance, names.named_by) == (
        "globex.my.salesforce.com", "salesforce", "globex", "sni")
    assert names.dns_names == [NAME] and again == names
    assert attributor.dns.stats.dns_sni_mismatch == 1  # once per flow
    [record] = [r for r in caplog.records if "ClientHello" in r.getMessage()]
    assert NAME in record.getMessage() and "globex.my.salesforce.com" in record.getMessage()


def test_hello_naming_a_non_crm_host_behind_a_dns_crm_address_is_a_finding(
    tc: Harness, attributor: Attributor
) -> None:
    attributor.on_sample(sent(tc, query()))
    attributor.on_sample(received(tc, answer()))
    names = attributor.names(_conversation(tc, attributor, "files.example.net", sport=43601))

    assert (names.sni, names.crm_vendor, names.crm_instance) == ("files.example.net", None, None)
    assert attributor.dns.stats.dns_sni_mismatch == 1


def test_hello_agreeing_with_dns_is_no_finding(tc: Harness, attributor: Attributor) -> None:
    attributor.on_sample(sent(tc, query()))
    attributor.on_sample(received(tc, answer()))
    names = attributor.names(_conversation(tc, attributor, NAME, sport=43602))

    assert (names.crm_vendor, names.crm_instance) == ("salesforce", "acme")
    assert attributor.dns.stats.dns_sni_mismatch == 0


# ---- gateway mode: one XDP hook sees the inside client's query and its answer -----


def test_gateway_pairs_an_inside_clients_query_with_its_answer(xdp: Harness) -> None:
    config = LeaktapConfig.model_validate({"mode": "xdp", "inside": ["198.18.0.0/24"]})
    attributor = Attributor(config, live=True)
    frames = [
        udp4(query(), src=CLIENT4, dst=RESOLVER, sport=CPORT, dport=53),  # from inside
        udp4(answer(), src=RESOLVER, dst=CLIENT4, sport=53, dport=CPORT),
        udp4(answer(ident=9, ip="198.19.6.6"), src=RESOLVER, dst=CLIENT4, sport=53,
             dport=CPORT),  # unsolicited
    ]
    out = xdp.run(frames)
    assert [s.dir for s in out.samples] == [1, 1, 1]  # one hook: direction says nothing
    for s in out.samples:
        attributor.on_sample(s)

    assert attributor.dns.names_for(CRM_IP) == [NAME]
    assert attributor.dns.names_for("198.19.6.6") == []
    assert rejected(attributor) == {"rejected_no_query": 1}  # the first answer consumed it
