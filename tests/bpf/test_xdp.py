"""The XDP gateway program against the TC egress program: the same packet
table through both gives the same flows, counters and samples (they share
every line of parsing, counting and sampling code), XDP always passes, and
the mirror-port build counts a repeated packet once."""

from __future__ import annotations

from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from tests.bpf.harness import Harness, Outcome
from tests.bpf.lt_frames import CLIENT4, CLIENT6, SERVER4, SERVER6, client_hello, eth, segments
from tests.bpf.test_tc_parse import MALFORMED, VARIANTS

pytestmark = pytest.mark.kernel

XDP_PASS = 2
HELLO = client_hello(size=1800)
PIECES = segments(HELLO, [700, 700])


def _dns_answer() -> bytes:
    # id, flags (response), 1 question, 1 answer: crm.example A 198.18.5.5
    q = b"\x03crm\x07example\x00\x00\x01\x00\x01"
    a = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04\xc6\x12\x05\x05"
    return b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + q + a


def _dns_query() -> bytes:
    return b"\x12\x35\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03crm\x07example\x00\x00\x01\x00\x01"


# TC samples DNS answers arriving only (ingress); XDP sees both ways on its one hook
TC_DIRECTION = {"DNS answer": "ingress"}


def _quic_initial() -> bytes:
    # long header, version 1, Initial; padded to the client minimum
    return bytes([0xC3, 0, 0, 0, 1, 8]) + b"\x11" * 8 + b"\x00" + b"\x00" * 1185


SAMPLED: dict[str, list[bytes]] = {
    "hello in 3 segments (v4)": [
        bytes(eth() / IP(src=CLIENT4, dst=SERVER4)
              / TCP(sport=42001, dport=443, flags="PA", seq=1000 + off) / Raw(data))
        for off, data in PIECES
    ],
    "hello in one segment (v6)": [
        bytes(eth() / IPv6(src=CLIENT6, dst=SERVER6)
              / TCP(sport=42002, dport=443, flags="PA", seq=7) / Raw(HELLO))
    ],
    "DNS answer": [bytes(eth() / IP(src=SERVER4, dst=CLIENT4)
                         / UDP(sport=53, dport=42003) / Raw(_dns_answer()))],
    "DNS query": [bytes(eth() / IP(src=CLIENT4, dst=SERVER4)
                        / UDP(sport=42005, dport=53) / Raw(_dns_query()))],
    "QUIC Initial": [bytes(eth() / IP(src=CLIENT4, dst=SERVER4)
                           / UDP(sport=42004, dport=443) / Raw(_quic_initial()))],
}
CASES: dict[str, list[bytes]] = {
    **{f"variant {k}": [bytes(v[0])] for k, v in VARIANTS.items()},
    **{f"malformed {k}": [v[0]] for k, v in MALFORMED.items()},
    **SAMPLED,
}


def _normalized(out: Outcome) -> dict[str, Any]:
    """What must be equal across hooks: not the hook direction nor the socket's cgroup/uid."""
    flows = sorted(
        (f.key.family, f.key.proto, f.key.src, f.key.dst, f.key.sport, f.key.dport,
         f.tx_bytes, f.tx_packets, f.flags)
        for f in out.flows
    )
    samples = [(s.kind, s.src, s.dst, s.sport, s.dport, s.seq, s.payload_off, s.data)
               for s in out.samples]
    # server names are read in the kernel on TC egress only (lt_tc.h's tail programs)
    stats = {k: v for k, v in out.changed().items() if "sni_" not in k}
    return {"flows": flows, "samples": samples, "stats": stats,
            "bytes": sum(b for b, _ in out.totals.values())}


@pytest.mark.parametrize("name", list(CASES))
def test_xdp_and_tc_agree(tc_ring: Harness, xdp: Harness, name: str) -> None:
    # XDP reads no names in the kernel: its ring carries every hello, as the TC build
    # with ring_named_hellos does (the default TC build leaves named ones to lt_names)
    frames = CASES[name]
    via_tc = tc_ring.run(frames, direction=TC_DIRECTION.get(name, "egress"))
    via_xdp = xdp.run(frames, direction="ingress")
    assert via_xdp.retvals == [XDP_PASS] * len(frames)
    assert _normalized(via_xdp) == _normalized(via_tc)
    assert all(f.key.dir == 1 and f.key.cgroup_id == 0 for f in via_xdp.flows)
    assert via_xdp.totals[1][0] == sum(len(f) for f in frames)


def test_samples_cover_the_cases() -> None:
    assert len(CASES) > 40


def test_mirror_port_copy_is_counted_once(xdp_dedup: Harness) -> None:
    frame = bytes(eth() / IP(src=CLIENT4, dst=SERVER4, id=77)
                  / TCP(sport=42010, dport=443, flags="PA", seq=1) / Raw(b"x" * 100))
    out = xdp_dedup.run([frame, frame])
    assert out.flow().tx_packets == 1 and out.flow().tx_bytes == len(frame)
    assert out.changed() == {"cnt_flow_new": 1, "cnt_duplicate": 1}
    assert out.totals[1] == (len(frame), 1)


def test_mirror_port_keeps_distinct_packets(xdp_dedup: Harness) -> None:
    # a retransmission carries a new IP id, the next segment a new sequence:
    # neither is a copy; a copy that is not back to back is not detected either
    base = eth() / IP(src=CLIENT4, dst=SERVER4, id=1) / TCP(sport=42011, dport=443,
                                                            flags="PA", seq=1)
    first = bytes(base / Raw(b"y" * 100))
    retransmitted = bytes(eth() / IP(src=CLIENT4, dst=SERVER4, id=2)
                          / TCP(sport=42011, dport=443, flags="PA", seq=1) / Raw(b"y" * 100))
    following = bytes(eth() / IP(src=CLIENT4, dst=SERVER4, id=3)
                      / TCP(sport=42011, dport=443, flags="PA", seq=101) / Raw(b"y" * 100))
    out = xdp_dedup.run([first, retransmitted, following, first])
    assert out.flow().tx_packets == 4
    assert "cnt_duplicate" not in out.changed()


def test_without_dedup_every_copy_counts(xdp: Harness) -> None:
    frame = bytes(eth() / IP(src=CLIENT4, dst=SERVER4, id=9)
                  / TCP(sport=42012, dport=443, flags="PA", seq=1) / Raw(b"z" * 10))
    assert xdp.run([frame, frame]).flow().tx_packets == 2
