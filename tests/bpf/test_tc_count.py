"""Counting in lt_tc_egress / lt_tc_ingress: flow keys, bytes, packets, GSO, totals."""

from __future__ import annotations

import socket

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from leaktap.controller.kernel import abi
from leaktap.controller.kernel.testrun import MAX_FRAME
from tests.bpf.lt_frames import CLIENT4, CLIENT6, SERVER4, SERVER6, eth, tcp4, tcp6, udp4

pytestmark = pytest.mark.kernel

TC_ACT_OK = 0
FF = abi.flow_flags()
IPPROTO_TCP, IPPROTO_UDP = 6, 17


def test_ipv4_tcp_data_packet_is_one_flow_with_exact_key_and_volume(tc):
    frame = tcp4(b"x" * 100, sport=40001, dport=443)

    out = tc.run(frame)

    assert out.retvals == [TC_ACT_OK]
    flow = out.flow()
    key = flow.key
    assert (key.family, key.proto, key.dir) == (4, IPPROTO_TCP, 0)
    assert (key.src, key.dst, key.sport, key.dport) == (CLIENT4, SERVER4, 40001, 443)
    assert (flow.tx_bytes, flow.tx_packets) == (len(frame), 1)
    assert flow.flags == 0  # PSH+ACK: neither SYN, SYN+ACK, FIN nor RST
    assert flow.first_seen_ns > 0
    assert out.changed() == {"cnt_flow_new": 1}
    assert out.totals == {0: (len(frame), 1), 1: (0, 0)}
    assert out.samples == []


def test_cgroup_is_the_senders_and_cgroup_totals_count_the_frame(tc):
    frame = tcp4(b"y" * 10, sport=40002)

    out = tc.run(frame)

    cgroup = out.flow().key.cgroup_id
    assert cgroup != 0  # the test-run socket belongs to this process's cgroup
    if tc.cgroup_id is not None:
        assert cgroup == tc.cgroup_id
    assert out.cgroups == {cgroup: (len(frame), 1)}


def test_ipv6_tcp_key_holds_full_addresses(tc):
    frame = tcp6(b"z" * 33, sport=40003, dport=8443)

    out = tc.run(frame)

    key = out.flow().key
    assert (key.family, key.proto, key.src, key.dst) == (6, IPPROTO_TCP, CLIENT6, SERVER6)
    assert (key.sport, key.dport) == (40003, 8443)
    assert out.flow().tx_bytes == len(frame)
    assert out.changed() == {"cnt_flow_new": 1}


def test_packets_of_one_flow_add_up_in_one_entry(tc):
    frames = [tcp4(b"a" * n, sport=40004, seq=1000 + 7 * n) for n in (1, 500, 1400)]

    out = tc.run(frames)

    flow = out.flow()
    assert (flow.tx_bytes, flow.tx_packets) == (sum(map(len, frames)), 3)
    assert out.changed() == {"cnt_flow_new": 1}
    assert out.totals[0] == (sum(map(len, frames)), 3)


def test_udp_flow(tc):
    frame = udp4(b"q" * 70, sport=40005, dport=9999)

    out = tc.run(frame)

    key = out.flow().key
    assert (key.proto, key.sport, key.dport) == (IPPROTO_UDP, 40005, 9999)
    assert out.flow().tx_bytes == len(frame)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("S", FF["LT_FF_SYN"]),
        ("SA", FF["LT_FF_SYNACK"]),
        ("FA", FF["LT_FF_FIN"]),
        ("R", FF["LT_FF_RST"]),
        ("A", 0),
    ],
)
def test_tcp_flags_are_recorded_on_the_flow(tc, flags, expected):
    out = tc.run(tcp4(sport=40006, flags=flags))

    assert out.flow().flags == expected


def test_gso_super_packet_counts_segments_and_skb_len(tc):
    # The largest skb a test run can build is one page; gso_segs is what the wire sees.
    frame = tcp4(b"g" * (MAX_FRAME - 54), sport=40007)
    assert len(frame) == MAX_FRAME

    out = tc.run(frame, gso_segs=5, gso_size=1448)

    flow = out.flow()
    assert (flow.tx_bytes, flow.tx_packets) == (len(frame), 5)
    assert out.totals[0] == (len(frame), 5)
    assert out.changed() == {"cnt_flow_new": 1}


def test_big_tcp_gso_with_zero_ip_length_uses_the_frame_length(tc):
    # BIG TCP GSO packets carry tot_len 0: the frame is the truth.
    frame = bytes(eth() / IP(src=CLIENT4, dst=SERVER4, len=0) / TCP(sport=40008, dport=443)
                  / Raw(b"b" * 3000))

    out = tc.run(frame, gso_segs=3, gso_size=1448)

    flow = out.flow()
    assert (flow.key.sport, flow.tx_bytes, flow.tx_packets) == (40008, len(frame), 3)
    assert out.changed() == {"cnt_flow_new": 1}


def test_zero_ip_length_without_gso_is_bad_len_but_still_in_totals(tc):
    frame = bytes(eth() / IP(src=CLIENT4, dst=SERVER4, len=0) / TCP(sport=40009) / Raw(b"b" * 30))

    out = tc.run(frame)

    assert out.flows == []
    assert out.changed() == {"parse_bad_len": 1}
    assert out.totals[0] == (len(frame), 1)


def test_ethernet_padding_counts_as_wire_bytes(tc):
    frame = tcp4(sport=40010, flags="A")
    padded = frame + b"\0" * (60 - len(frame))

    out = tc.run(padded)

    assert out.flow().tx_bytes == 60
    assert out.changed() == {"cnt_flow_new": 1}


def test_ingress_flow_has_direction_1_cgroup_0_and_ingress_totals(tc):
    frame = tcp4(b"r" * 200, src=SERVER4, dst=CLIENT4, sport=443, dport=40011)

    out = tc.run(frame, direction="ingress")

    assert out.retvals == [TC_ACT_OK]
    key = out.flow().key
    assert (key.dir, key.cgroup_id) == (1, 0)
    assert (key.src, key.sport, key.dst, key.dport) == (SERVER4, 443, CLIENT4, 40011)
    assert out.flow().tx_bytes == len(frame)
    assert out.totals == {0: (0, 0), 1: (len(frame), 1)}
    assert out.cgroups == {}  # per-cgroup totals are egress only


def test_egress_and_ingress_of_one_connection_are_two_entries(tc):
    out_frame = tcp4(b"o" * 10, sport=40012)
    in_frame = tcp4(b"i" * 20, src=SERVER4, dst=CLIENT4, sport=443, dport=40012)

    tc.run(out_frame)
    first = tc.run(in_frame, direction="ingress")
    assert [f.key.dir for f in first.flows] == [1]
    both = [tc.run(out_frame).flow(), tc.run(in_frame, direction="ingress").flow()]
    assert [(f.key.dir, f.tx_bytes) for f in both] == [(0, len(out_frame)), (1, len(in_frame))]


def test_test_run_ifindex_is_loopback(tc):
    # Samples carry skb->ifindex; a test-run skb sits on the loopback device.
    frame = udp4(b"\0" * 20, sport=40013, dport=53)  # sampled as a DNS query

    out = tc.run(frame)

    assert [s.ifindex for s in out.samples] == [socket.if_nametoindex("lo")]
