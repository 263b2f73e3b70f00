"""The parser (bpf/include/lt_parse.h): header variants and the malformed-packet table.

Every packet, parsed or not, is in the totals; a rejected one bumps exactly
its lt_stat reason. Frames are at least 14 bytes (BPF_PROG_TEST_RUN's minimum).
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw

from leaktap.controller.kernel import abi
from tests.bpf.lt_frames import CLIENT4, CLIENT6, SERVER4, SERVER6, eth

pytestmark = pytest.mark.kernel

TCP_P, UDP_P, ICMP_P, ICMP6_P = 6, 17, 1, 58
V4 = IP(src=CLIENT4, dst=SERVER4)
V6 = IPv6(src=CLIENT6, dst=SERVER6)
# extension headers the parser walks (lt_types.h), not a copy of the number
EXT_MAX = abi.defines()["LT_IPV6_EXT_MAX"]


def _tcp(sport: int) -> Packet:
    return TCP(sport=sport, dport=443, flags="PA") / Raw(b"p" * 40)


def _ext(n: int) -> Packet:
    """n IPv6 extension headers (hop-by-hop first, as RFC 8200 requires)."""
    hdrs: Packet = IPv6ExtHdrHopByHop()
    for _ in range(n - 1):
        hdrs = hdrs / IPv6ExtHdrDestOpt()
    return hdrs


# name -> (frame, (family, proto, sport, dport), counters expected besides cnt_flow_new)
VARIANTS: dict[str, tuple[Packet, tuple[int, int, int, int], dict[str, int]]] = {
    "802.1Q": (eth() / Dot1Q(vlan=10) / V4 / _tcp(41001), (4, TCP_P, 41001, 443), {}),
    "802.1ad+802.1Q": (
        eth() / Dot1AD(vlan=100) / Dot1Q(vlan=10) / V4 / _tcp(41002), (4, TCP_P, 41002, 443), {}
    ),
    "QinQ 0x9100+802.1Q": (
        eth(type=0x9100) / Dot1Q(vlan=100) / Dot1Q(vlan=10) / V4 / _tcp(41003),
        (4, TCP_P, 41003, 443), {},
    ),
    "IPv4 ihl=8": (
        eth() / IP(src=CLIENT4, dst=SERVER4, options=[IPOption_NOP()] * 12) / _tcp(41004),
        (4, TCP_P, 41004, 443), {},
    ),
    "IPv4 ihl=15": (
        eth() / IP(src=CLIENT4, dst=SERVER4, options=[IPOption_NOP()] * 40) / _tcp(41005),
        (4, TCP_P, 41005, 443), {},
    ),
    "QinQ + IPv4 ihl=15 + TCP options": (
        eth() / Dot1AD(vlan=1) / Dot1Q(vlan=2)
        / IP(src=CLIENT4, dst=SERVER4, options=[IPOption_NOP()] * 40)
        / TCP(sport=41006, dport=443, options=[("NOP", None)] * 40) / Raw(b"o" * 10),
        (4, TCP_P, 41006, 443), {},
    ),
    "IPv6 HBH+routing+dest-opts": (
        eth() / V6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=[SERVER6])
        / IPv6ExtHdrDestOpt() / _tcp(41007),
        (6, TCP_P, 41007, 443), {},
    ),
    "IPv6 AH": (
        eth() / V6 / AH(nh=TCP_P, payloadlen=4, icv=b"\0" * 12) / _tcp(41008),
        (6, TCP_P, 41008, 443), {},
    ),
    f"IPv6 {EXT_MAX - 1} extension headers": (
        eth() / V6 / _ext(EXT_MAX - 1) / _tcp(41009), (6, TCP_P, 41009, 443), {}
    ),
    # LT_IPV6_EXT_MAX headers are within the documented bound ("up to LT_IPV6_EXT_MAX")
    f"IPv6 {EXT_MAX} extension headers": (
        eth() / V6 / _ext(EXT_MAX) / _tcp(41010), (6, TCP_P, 41010, 443), {}
    ),
    "IPv6 first fragment": (
        eth() / V6 / IPv6ExtHdrFragment(offset=0, m=1, id=7) / _tcp(41011),
        (6, TCP_P, 41011, 443), {},
    ),
    "IPv6 non-first fragment": (
        eth() / V6 / IPv6ExtHdrFragment(nh=TCP_P, offset=100, m=0, id=7) / Raw(b"f" * 64),
        (6, TCP_P, 0, 0), {"parse_fragment": 1},
    ),
    "IPv4 first fragment": (
        eth() / IP(src=CLIENT4, dst=SERVER4, flags="MF", frag=0) / _tcp(41012),
        (4, TCP_P, 41012, 443), {},
    ),
    "IPv4 non-first fragment": (
        eth() / IP(src=CLIENT4, dst=SERVER4, proto=TCP_P, frag=185) / Raw(b"f" * 64),
        (4, TCP_P, 0, 0), {"parse_fragment": 1},
    ),
    "ICMP": (eth() / V4 / ICMP() / Raw(b"ping"), (4, ICMP_P, 0, 0), {"parse_other_l4": 1}),
    "ICMPv6": (eth() / V6 / ICMPv6EchoRequest(), (6, ICMP6_P, 0, 0), {"parse_other_l4": 1}),
    "UDP over IPv4": (
        eth() / V4 / UDP(sport=41013, dport=9000) / Raw(b"u"), (4, UDP_P, 41013, 9000), {}
    ),
    "UDP over IPv6": (
        eth() / V6 / UDP(sport=41014, dport=9000) / Raw(b"u"), (6, UDP_P, 41014, 9000), {}
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_header_variant_is_one_flow(tc, name):
    pkt, (family, proto, sport, dport), extra = VARIANTS[name]
    frame = bytes(pkt)

    out = tc.run(frame)

    assert out.retvals == [0]
    assert out.changed() == {"cnt_flow_new": 1, **extra}
    flow = out.flow()
    assert (flow.key.family, flow.key.proto, flow.key.sport, flow.key.dport) == (
        family, proto, sport, dport
    )
    want_src, want_dst = (CLIENT4, SERVER4) if family == 4 else (CLIENT6, SERVER6)
    assert (flow.key.src, flow.key.dst) == (want_src, want_dst)
    assert (flow.tx_bytes, flow.tx_packets) == (len(frame), 1)
    assert out.totals[0] == (len(frame), 1)


def _ipv4(payload: Packet | bytes, **ip: object) -> Packet:
    return eth() / IP(src=CLIENT4, dst=SERVER4, **ip) / payload


def _cut(pkt: Packet, n: int) -> bytes:
    """The first n bytes of pkt, IP length fields set to match (so nothing is clamped)."""
    data = bytes(pkt)[:n]
    ip = pkt.getlayer(IP)
    if ip is not None:
        off = len(pkt) - len(ip)
        if n >= off + 20:
            data = _set(data, off + 2, (n - off).to_bytes(2, "big"))
    ip6 = pkt.getlayer(IPv6)
    if ip6 is not None:
        off = len(pkt) - len(ip6)
        if n >= off + 40:
            data = _set(data, off + 4, (n - off - 40).to_bytes(2, "big"))
    return data


def _set(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


TCP_OK = TCP(sport=41100, dport=443, flags="PA") / Raw(b"d" * 20)
L3 = 14  # IP header offset in an untagged frame

# name -> (frame, counters expected to move, (family, proto, sport, dport) of the flow or None)
MALFORMED: dict[str, tuple[bytes, dict[str, int], tuple[int, int, int, int] | None]] = {
    "ARP": (bytes(Ether(src="02:00:00:00:00:01") / ARP(psrc=CLIENT4, pdst=SERVER4)),
            {"parse_not_ip": 1}, None),
    "three VLAN tags (bound is two)": (
        bytes(eth() / Dot1AD(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / V4 / TCP_OK),
        {"parse_not_ip": 1}, None,
    ),
    "14-byte frame announcing a VLAN tag": (
        bytes(eth(type=0x8100)), {"parse_trunc_l2": 1}, None
    ),
    "VLAN tag cut after 2 bytes": (_cut(eth() / Dot1Q(vlan=5) / V4 / TCP_OK, 16),
                                   {"parse_trunc_l2": 1}, None),
    "second VLAN tag cut": (_cut(eth() / Dot1AD(vlan=5) / Dot1Q(vlan=6) / V4, 20),
                            {"parse_trunc_l2": 1}, None),
    # The kernel refuses a test-run frame whose IP EtherType is followed by less than
    # a fixed IP header, so frames cut inside the IP header sit behind a VLAN tag.
    "VLAN, IPv4 ethertype, no IP header": (
        bytes(eth() / Dot1Q(vlan=4, type=0x0800)), {"parse_trunc_l3": 1}, None
    ),
    "VLAN, IPv4 header cut at 12 bytes": (
        _cut(eth() / Dot1Q(vlan=4) / V4 / TCP_OK, L3 + 4 + 12), {"parse_trunc_l3": 1}, None
    ),
    "IPv4 ihl=15, options cut short": (
        _cut(_ipv4(TCP_OK, options=[IPOption_NOP()] * 40), L3 + 40), {"parse_trunc_l3": 1}, None
    ),
    "IPv4 ihl=4": (_set(bytes(_ipv4(TCP_OK)), L3, b"\x44"), {"parse_bad_ipv4": 1}, None),
    "IPv4 ihl=0": (_set(bytes(_ipv4(TCP_OK)), L3, b"\x40"), {"parse_bad_ipv4": 1}, None),
    "IPv4 version 5": (_set(bytes(_ipv4(TCP_OK)), L3, b"\x55"), {"parse_bad_ipv4": 1}, None),
    "IPv4 tot_len < ihl*4": (bytes(_ipv4(TCP_OK, len=19)), {"parse_bad_len": 1}, None),
    "IPv4 tot_len beyond the frame (clamped, still a flow)": (
        bytes(_ipv4(TCP_OK, len=1500)), {"parse_len_clamped": 1, "cnt_flow_new": 1},
        (4, TCP_P, 41100, 443),
    ),
    "TCP doff=4": (bytes(_ipv4(TCP(sport=41100, dport=443, dataofs=4) / Raw(b"d" * 20))),
                   {"parse_bad_l4": 1}, None),
    "TCP doff=0": (bytes(_ipv4(TCP(sport=41100, dport=443, dataofs=0) / Raw(b"d" * 20))),
                   {"parse_bad_l4": 1}, None),
    "TCP doff=15 beyond the IP length": (
        bytes(_ipv4(TCP(sport=41100, dport=443, dataofs=15))), {"parse_bad_l4": 1}, None
    ),
    "TCP header cut short (frame and IP length)": (
        bytes(_ipv4(Raw(bytes(TCP(sport=41100, dport=443))[:10]), proto=TCP_P)),
        {"parse_bad_l4": 1}, None,
    ),
    "TCP header outside the IP length, inside the frame": (
        bytes(_ipv4(TCP_OK, len=20 + 10)), {"parse_bad_l4": 1}, None
    ),
    "UDP header cut short": (
        bytes(_ipv4(Raw(bytes(UDP(sport=41100, dport=53))[:6]), proto=UDP_P)),
        {"parse_bad_l4": 1}, None,
    ),
    "IPv6 version 4 under the IPv6 ethertype": (
        _set(bytes(eth() / V6 / TCP_OK), L3, b"\x40"), {"parse_bad_ipv6": 1}, None
    ),
    "VLAN, IPv6 header cut at 39 bytes": (
        _cut(eth() / Dot1Q(vlan=4) / V6 / TCP_OK, L3 + 4 + 39), {"parse_trunc_l3": 1}, None
    ),
    f"IPv6 {EXT_MAX + 1} extension headers": (
        bytes(eth() / V6 / _ext(EXT_MAX + 1) / TCP_OK), {"parse_ipv6_ext": 1}, None
    ),
    "IPv6 extension header longer than the packet": (
        bytes(eth() / V6 / IPv6ExtHdrDestOpt(len=200, autopad=0) / TCP_OK),
        {"parse_bad_len": 1}, None,
    ),
    "IPv6 extension header cut at the frame end": (
        _cut(eth() / V6 / IPv6ExtHdrHopByHop() / TCP_OK, L3 + 40 + 1), {"parse_trunc_l3": 1}, None
    ),
    "IPv6 fragment header cut": (
        _cut(eth() / V6 / IPv6ExtHdrFragment(offset=3) / TCP_OK, L3 + 40 + 4),
        {"parse_trunc_l3": 1}, None,
    ),
    "IPv6 TCP header cut short (frame and IP length)": (
        _cut(eth() / V6 / TCP_OK, L3 + 40 + 10), {"parse_bad_l4": 1}, None
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_frame_bumps_its_reason_once_and_stays_in_totals(tc, name):
    frame, expected, flow = MALFORMED[name]
    assert len(frame) >= 14

    out = tc.run(frame)

    assert out.retvals == [0], "a monitor never drops"
    assert out.changed() == expected
    assert out.totals == {0: (len(frame), 1), 1: (0, 0)}
    assert out.samples == []
    if flow is None:
        assert out.flows == []
    else:
        got = out.flow()
        assert (got.key.family, got.key.proto, got.key.sport, got.key.dport) == flow
        assert got.tx_bytes == len(frame)


@pytest.mark.parametrize(
    "frame",
    [
        bytes(_ipv4(TCP(sport=41200, dport=443, flags="A"))),
        bytes(_ipv4(UDP(sport=53, dport=41200))),
        bytes(_ipv4(UDP(sport=41200, dport=443))),
        bytes(eth() / V6 / TCP(sport=41200, dport=443, flags="A")),
    ],
    ids=["tcp-ack", "udp-from-53", "udp-443", "ipv6-tcp-ack"],
)
def test_zero_length_payload_is_a_flow_without_events(tc, frame):
    out = tc.run(frame)

    assert out.changed() == {"cnt_flow_new": 1}
    assert out.samples == []
    assert out.flow().tx_bytes == len(frame)
