"""ClientHello capture on TC egress (lt_flow.h tls_probe): by content, multi-segment, chunked.

Samples are checked byte for byte against the hello that was sent, and fed
to the controller's reassembler and parser so the SNI comes out end to end.
"""

from __future__ import annotations

import math

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from leaktap.controller.kernel import abi
from leaktap.controller.kernel.ringbuf import Sample
from leaktap.controller.kernel.testrun import MAX_FRAME
from leaktap.controller.protocols.tls import HelloReassembler, parse_client_hello
from tests.bpf.harness import Harness
from tests.bpf.lt_frames import (
    CLIENT4,
    CLIENT6,
    SERVER4,
    SERVER6,
    SNI,
    client_hello,
    eth,
    segments,
    tcp4,
    tcp6,
)

pytestmark = pytest.mark.kernel


@pytest.fixture
def tc(tc_ring: Harness) -> Harness:
    """Capture tests read the hello bytes from the ring: the build whose ring also
    carries the single-segment hellos the kernel names (tests/bpf/test_tc_hello_names.py
    covers the default build, which leaves those to lt_names)."""
    return tc_ring

FF = abi.flow_flags()
LIMITS = abi.defines()
SNAP = LIMITS["LT_SNAP"]
SEQ_MOD = 1 << 32
TCP_PSH_ACK, TCP_SYN = 0x18, 0x02
HELLO = client_hello()
PQ_HELLO = client_hello(size=1800)  # a hybrid post-quantum key share makes hellos ~1.8 KB


def stitch(samples: list[Sample]) -> bytes:
    """Concatenate samples by sequence number (relative to the lowest, modulo 2^32)."""
    base = min(samples, key=lambda s: (s.seq - samples[0].seq + SEQ_MOD // 2) % SEQ_MOD).seq
    out = bytearray()
    for s in sorted(samples, key=lambda s: (s.seq - base) % SEQ_MOD):
        off = (s.seq - base) % SEQ_MOD
        assert off <= len(out), f"gap before seq {s.seq}"
        out[off : off + len(s.data)] = s.data
    return bytes(out)


def sni_through_reassembler(samples: list[Sample]) -> str | None:
    reassembler = HelloReassembler()
    found = None
    for s in samples:
        hello = reassembler.feed((s.src, s.sport, s.dst, s.dport), s.seq, s.data)
        if hello is not None:
            found = hello.sni
    return found


def send_split(tc, hello: bytes, sizes: list[int], sport: int, isn: int = 5000) -> list:
    """Send `hello` as consecutive segments; returns one Outcome per segment."""
    return [
        tc.run(tcp4(piece, sport=sport, seq=(isn + off) % SEQ_MOD))
        for off, piece in segments(hello, sizes)
    ]


def test_hello_in_one_segment_is_one_sample_with_exact_bytes(tc):
    out = tc.run(tcp4(HELLO, sport=42001, dport=443, seq=123456))

    assert out.changed() == {"cnt_flow_new": 1, "cnt_ev_hello": 1, "cnt_sni_named": 1}
    [s] = out.samples
    assert s.kind == "tls_hello"
    assert s.data == HELLO
    assert (s.seq, s.payload_off, s.payload_len) == (123456, 0, len(HELLO))
    assert (s.family, s.proto, s.dir, s.tcp_flags) == (4, 6, 0, TCP_PSH_ACK)
    assert (s.src, s.sport, s.dst, s.dport) == (CLIENT4, 42001, SERVER4, 443)
    flow = out.flow()
    assert s.cgroup_id == flow.key.cgroup_id
    assert flow.flags & FF["LT_FF_HELLO"]
    assert parse_client_hello(s.data).sni == SNI
    assert sni_through_reassembler(out.samples) == SNI


@pytest.mark.parametrize("dport", [443, 8443, 25, 5432])
def test_hello_is_detected_by_content_on_any_port(tc, dport):
    out = tc.run(tcp4(HELLO, sport=42002, dport=dport))

    assert [(s.kind, s.dport, s.data) for s in out.samples] == [("tls_hello", dport, HELLO)]


def test_ipv6_hello(tc):
    out = tc.run(tcp6(HELLO, sport=42003))

    [s] = out.samples
    assert (s.family, s.src, s.dst, s.data) == (6, CLIENT6, SERVER6, HELLO)
    assert sni_through_reassembler(out.samples) == SNI


def test_hello_split_over_three_segments_gives_three_samples_that_stitch(tc):
    outs = send_split(tc, PQ_HELLO, [600, 600], sport=42004, isn=5000)

    samples = [s for o in outs for s in o.samples]
    assert [(s.seq, len(s.data)) for s in samples] == [(5000, 600), (5600, 600), (6200, 600)]
    assert [s.payload_off for s in samples] == [0, 0, 0]
    assert stitch(samples) == PQ_HELLO
    assert sni_through_reassembler(samples) == SNI
    assert sum(o.stats["cnt_ev_hello"] for o in outs) == 3
    assert len(tc.probes.table("lt_hello").items()) == 0  # complete: no longer followed


def test_segment_after_the_hello_completed_is_not_captured(tc):
    send_split(tc, PQ_HELLO, [1000], sport=42005, isn=7000)
    after = tcp4(b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x20" + b"\xaa" * 32,
                 sport=42005, seq=7000 + len(PQ_HELLO))

    out = tc.run(after)

    assert out.samples == []
    assert out.changed() == {"cnt_flow_new": 1}  # a new entry: the previous run drained it


def test_segment_after_a_single_segment_hello_is_not_captured(tc):
    tc.run(tcp4(HELLO, sport=42006, seq=100))

    out = tc.run(tcp4(b"\x17\x03\x03\x00\x10" + b"\xbb" * 16, sport=42006, seq=100 + len(HELLO)))

    assert out.samples == []


def test_retransmitted_continuation_is_captured_again_while_pending(tc):
    pieces = segments(PQ_HELLO, [600, 600])
    frames = [tcp4(p, sport=42007, seq=9000 + off) for off, p in pieces]

    out = tc.run([frames[0], frames[1], frames[1], frames[2]])

    assert [s.seq for s in out.samples] == [9000, 9600, 9600, 10200]
    assert out.samples[1].data == out.samples[2].data == pieces[1][1]
    assert stitch(out.samples) == PQ_HELLO
    assert sni_through_reassembler(out.samples) == SNI
    # once complete, a late retransmission is not followed any more
    assert tc.run(frames[1]).samples == []


def test_post_quantum_hello_in_one_gso_skb_is_one_sample(tc):
    out = tc.run(tcp4(PQ_HELLO, sport=42008, seq=1), gso_segs=2, gso_size=1448)

    [s] = out.samples
    assert (s.seq, s.data) == (1, PQ_HELLO)
    assert out.flow().tx_packets == 2
    assert sni_through_reassembler(out.samples) == SNI


def test_post_quantum_hello_in_two_mss_segments(tc):
    outs = send_split(tc, PQ_HELLO, [1448], sport=42009, isn=77)

    samples = [s for o in outs for s in o.samples]
    assert [(s.seq, len(s.data)) for s in samples] == [(77, 1448), (77 + 1448, 1800 - 1448)]
    assert stitch(samples) == PQ_HELLO
    assert sni_through_reassembler(samples) == SNI


def test_hello_larger_than_one_event_is_chunked_within_one_skb(tc):
    size = MAX_FRAME - 54  # the largest hello a test-run skb holds: Ethernet+IPv4+TCP = 54
    hello = client_hello(size=size)

    out = tc.run(tcp4(hello, sport=42010, seq=4242), gso_segs=3, gso_size=1448)

    assert [(s.seq, s.payload_off, len(s.data)) for s in out.samples] == [
        (4242, 0, SNAP), (4242 + SNAP, SNAP, size - SNAP)
    ]
    assert all(s.payload_len == size for s in out.samples)
    assert stitch(out.samples) == hello
    assert out.changed() == {"cnt_flow_new": 1, "cnt_ev_hello": 2, "cnt_sni_named": 1}


def test_5k_hello_in_a_large_skb_and_a_continuation_is_covered_by_chunks(tc):
    # A 5 KB hello does not fit one test-run skb (one page); its first
    # MAX_FRAME bytes go as one GSO skb, chunked, the rest as a continuation.
    hello = client_hello(size=5000)
    first = MAX_FRAME - 54
    outs = [
        tc.run(tcp4(hello[:first], sport=42011, seq=1 << 20), gso_segs=3, gso_size=1448),
        tc.run(tcp4(hello[first:], sport=42011, seq=(1 << 20) + first)),
    ]

    samples = [s for o in outs for s in o.samples]
    assert len(samples) == math.ceil(len(hello) / SNAP) == 3
    assert all(len(s.data) <= SNAP for s in samples)
    assert stitch(samples) == hello
    assert sni_through_reassembler(samples) == SNI
    assert sum(o.stats["loss_truncated"] for o in outs) == 0


def test_tcp_fast_open_syn_carrying_the_hello_has_seq_isn_plus_one(tc):
    isn = 0x10000
    syn = bytes(
        eth()
        / IP(src=CLIENT4, dst=SERVER4)
        / TCP(sport=42012, dport=443, seq=isn, flags="S",
              options=[("MSS", 1460), ("TFO", (0x01020304, 0x05060708))])
        / Raw(PQ_HELLO[:1000])
    )
    rest = tcp4(PQ_HELLO[1000:], sport=42012, seq=isn + 1 + 1000)

    out = tc.run([syn, rest])

    assert [(s.seq, s.tcp_flags) for s in out.samples] == [
        (isn + 1, TCP_SYN), (isn + 1 + 1000, TCP_PSH_ACK)
    ]
    assert stitch(out.samples) == PQ_HELLO
    assert sni_through_reassembler(out.samples) == SNI
    assert out.flow().flags == FF["LT_FF_SYN"] | FF["LT_FF_HELLO"]


def test_hello_crossing_the_sequence_wrap(tc):
    isn = SEQ_MOD - 700
    outs = send_split(tc, PQ_HELLO, [600, 600], sport=42013, isn=isn)

    samples = [s for o in outs for s in o.samples]
    assert [s.seq for s in samples] == [isn, (isn + 600) % SEQ_MOD, (isn + 1200) % SEQ_MOD]
    assert stitch(samples) == PQ_HELLO


def fragment_records(msg: bytes, sizes: list[int]) -> bytes:
    """A handshake message spread over TLS records of the given sizes (the last takes the rest)."""
    return b"".join(
        b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece for _, piece in segments(msg, sizes)
    )


def test_hello_message_fragmented_over_equal_records(tc):
    msg = client_hello(size=400)[5:]  # the handshake message, 395 bytes
    records = fragment_records(msg, [150, 150])  # 150 + 150 + 95
    outs = send_split(tc, records, [60, 200], sport=42014, isn=500)

    samples = [s for o in outs for s in o.samples]
    assert stitch(samples) == records
    assert sni_through_reassembler(samples) == SNI
    assert len(tc.probes.table("lt_hello").items()) == 0  # complete: no longer followed
    assert tc.run(tcp4(b"\x17\x03\x03\x00\x05hello", sport=42014, seq=500 + len(records))
                  ).samples == []


def test_hello_with_a_short_first_record_stops_when_complete(tc):
    # Splitting the first record early (before the SNI) is a common DPI-evasion
    # trick; the hello ends with the second record and the next segment is the
    # client's second flight, which must not be captured.
    msg = client_hello(size=400)[5:]
    records = fragment_records(msg, [20])  # 20 + 375
    outs = send_split(tc, records, [200], sport=42020, isn=800)
    samples = [s for o in outs for s in o.samples]
    assert stitch(samples) == records
    assert sni_through_reassembler(samples) == SNI

    second_flight = b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x35" + b"\xee" * 53
    out = tc.run(tcp4(second_flight, sport=42020, seq=800 + len(records)))

    assert out.samples == [], (
        f"{len(out.samples)} sample(s) of the segment after a complete {len(records)}-byte "
        f"hello; lt_hello still follows it: {len(tc.probes.table('lt_hello').items())} entry"
    )


def test_hello_after_plaintext_starttls_is_captured(tc):
    ehlo = b"STARTTLS\r\n"
    out = tc.run([
        tcp4(ehlo, sport=42015, dport=25, seq=10),
        tcp4(HELLO, sport=42015, dport=25, seq=10 + len(ehlo)),
    ])

    assert [(s.seq, s.data) for s in out.samples] == [(10 + len(ehlo), HELLO)]


def test_hello_needing_more_than_the_segment_bound_is_counted(tc):
    bound = LIMITS["LT_HELLO_SEGS_MAX"]
    sizes = [100] * (len(PQ_HELLO) // 100)
    assert len(sizes) > bound

    outs = send_split(tc, PQ_HELLO, sizes, sport=42016, isn=1)

    samples = [s for o in outs for s in o.samples]
    assert len(samples) == bound
    assert sum(o.stats["loss_hello_segs"] for o in outs) == 1
    assert sum(o.stats["cnt_ev_hello"] for o in outs) == bound


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: acme.my.salesforce.com\r\n\r\n",
        b"\x17\x03\x03\x00\x40" + b"\xcc" * 64 + b"\x17\x03\x03\x00\x10" + b"\xdd" * 16,
        b"\x16\x03\x03\x00\x31\x02" + b"\0" * 48,  # ServerHello
        b"\x16\x03\x05\x00\x31\x01" + b"\0" * 48,  # record version 3.5
        # a short first segment may open a split hello (test_tc_hello_split.py); an
        # empty record cannot
        b"\x16\x03\x01\x00\x00\x01\x00\x00\x10",
        b"\x16\x03\x01\x48\x00\x01",  # record longer than TLS allows
    ],
    ids=["http-plaintext", "application-data", "server-hello", "bad-version", "empty-record",
         "oversized-record"],
)
def test_non_hello_payload_on_443_is_not_sampled(tc, payload):
    out = tc.run(tcp4(payload, sport=42017, dport=443))

    assert out.samples == []
    assert out.changed() == {"cnt_flow_new": 1}


def test_established_flow_application_data_is_not_sampled(tc):
    frames = [
        tcp4(b"\x17\x03\x03\x05\x00" + bytes([i]) * 1280, sport=42018, seq=1 + i * 1285)
        for i in range(30)
    ]

    out = tc.run(frames)

    assert out.samples == []
    assert out.flow().tx_packets == 30


def test_no_hello_sampling_on_ingress(tc):
    out = tc.run(tcp4(HELLO, src=SERVER4, dst=CLIENT4, sport=443, dport=42019),
                 direction="ingress")

    assert out.samples == []
    assert out.changed() == {"cnt_flow_new": 1}
    assert out.flow().flags & FF["LT_FF_HELLO"] == 0
