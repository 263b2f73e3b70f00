"""Frames for the kernel tests: scapy-built, addresses from the benchmarking ranges.

Every helper returns the frame as bytes (what BPF_PROG_TEST_RUN takes). Hosts
are 198.18.0.0/15 and 2001:db8::/32 (DESIGN.md "Test hosts and addresses").
"""

from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.layers.tls.extensions import ServerName, TLS_Ext_Padding, TLS_Ext_ServerName
from scapy.layers.tls.handshake import TLSClientHello
from scapy.layers.tls.record import TLS
from scapy.packet import Raw

CLIENT4, SERVER4 = "198.18.0.1", "198.19.0.2"
CLIENT6, SERVER6 = "2001:db8::1", "2001:db8:1::2"
MAC_SRC, MAC_DST = "02:00:00:00:00:01", "02:00:00:00:00:02"
SNI = "acme.my.salesforce.com"


def eth(**kw: object) -> Ether:
    return Ether(src=MAC_SRC, dst=MAC_DST, **kw)


def tcp4(
    payload: bytes = b"",
    sport: int = 40000,
    dport: int = 443,
    seq: int = 1000,
    flags: str = "PA",
    src: str = CLIENT4,
    dst: str = SERVER4,
    **tcp_kw: object,
) -> bytes:
    tcp = TCP(sport=sport, dport=dport, seq=seq, flags=flags, **tcp_kw)
    pkt = eth() / IP(src=src, dst=dst) / tcp
    return bytes(pkt / Raw(payload)) if payload else bytes(pkt)


def tcp6(
    payload: bytes = b"",
    sport: int = 40000,
    dport: int = 443,
    seq: int = 1000,
    flags: str = "PA",
    src: str = CLIENT6,
    dst: str = SERVER6,
) -> bytes:
    pkt = eth() / IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, seq=seq, flags=flags)
    return bytes(pkt / Raw(payload)) if payload else bytes(pkt)


def udp4(
    payload: bytes = b"",
    sport: int = 40000,
    dport: int = 443,
    src: str = CLIENT4,
    dst: str = SERVER4,
) -> bytes:
    pkt = eth() / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport)
    return bytes(pkt / Raw(payload)) if payload else bytes(pkt)


def udp6(
    payload: bytes = b"",
    sport: int = 40000,
    dport: int = 443,
    src: str = CLIENT6,
    dst: str = SERVER6,
) -> bytes:
    pkt = eth() / IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport)
    return bytes(pkt / Raw(payload)) if payload else bytes(pkt)


def client_hello(sni: str = SNI, size: int | None = None) -> bytes:
    """A TLS record carrying a ClientHello with `sni`; `size` pads it to exactly that many bytes."""

    def build(pad: int | None) -> bytes:
        ext = [TLS_Ext_ServerName(servernames=[ServerName(servername=sni.encode())])]
        if pad is not None:
            ext.append(TLS_Ext_Padding(padding=b"\0" * pad))
        return bytes(TLS(msg=[TLSClientHello(ciphers=[0x1301, 0x1302, 0xC02F], ext=ext)]))

    if size is None:
        return build(None)
    base = len(build(0))  # padding extension header included
    if size < base:
        raise ValueError(f"a hello with SNI {sni!r} has at least {base} bytes")
    hello = build(size - base)
    assert len(hello) == size, (len(hello), size)
    return hello


def segments(data: bytes, sizes: list[int]) -> list[tuple[int, bytes]]:
    """Split `data` into (offset, bytes) pieces of the given sizes (the last takes the rest)."""
    out, off = [], 0
    for n in sizes:
        out.append((off, data[off : off + n]))
        off += n
    if off < len(data):
        out.append((off, data[off:]))
    return out
