"""The public corpus vendored under tests/corpus/: expected answers, a dpkt packet
reader, and the captures' frames through the real kernel program.

tests/corpus/README.md names each file's source repository, commit and licence.
Packets are decoded down to TCP/UDP with dpkt for the link types the corpus uses
(Ethernet incl. VLAN tags, raw IP, BSD loopback, PPP, Linux SLL/SLL2, pcapng).
IPv4 fragments are skipped; IPv6 fragments are reassembled (the DNS corpus has
a fragmented answer). What the kernel captures of a hello is never modelled
here: `KernelCapture` runs the frames through the compiled program, as
`leaktap replay` does.
"""

from __future__ import annotations

import csv
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dpkt

from leaktap.controller.kernel import testrun
from leaktap.controller.kernel.ringbuf import Sample
from leaktap.controller.protocols.pcap import iter_frames
from leaktap.controller.protocols.tls import ClientHello, HelloReassembler

# In the repository: a missing file is a failing test, never a skip.
CORPUS = Path(__file__).resolve().parent / "corpus"
# frames run between two ring-buffer polls: well below what the replay ring holds
_POLL_EVERY = 32


def load_tsv(name: str) -> list[dict[str, str]]:
    """Rows of e.g. 'zeek/expected.tsv' as dicts; the pcap column is made absolute."""
    path = CORPUS / name
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    for row in rows:
        if "pcap" in row:
            row["pcap_path"] = str(path.parent / row["pcap"])
    return rows


@dataclass(frozen=True, slots=True)
class Segment:
    """One TCP segment or UDP datagram."""

    index: int
    ts: float
    proto: str  # "tcp" | "udp"
    src: str
    dst: str
    sport: int
    dport: int
    payload: bytes
    seq: int = 0
    syn: bool = False
    fin: bool = False
    rst: bool = False

    @property
    def flow(self) -> tuple[str, int, str, int, str]:
        return (self.src, self.sport, self.dst, self.dport, self.proto)


def _ip_str(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


def _open(path: Path) -> tuple[object, int]:
    f = path.open("rb")
    magic = f.read(4)
    f.seek(0)
    reader: dpkt.pcap.Reader | dpkt.pcapng.Reader
    reader = dpkt.pcapng.Reader(f) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(f)
    return reader, reader.datalink()


def _network_layer(buf: bytes, linktype: int) -> bytes | dpkt.Packet | None:
    if linktype == dpkt.pcap.DLT_EN10MB:
        eth = dpkt.ethernet.Ethernet(buf)
        return eth.data if isinstance(eth.data, (dpkt.ip.IP, dpkt.ip6.IP6)) else None
    if linktype in (dpkt.pcap.DLT_RAW, 12, 14, 101):
        return buf
    if linktype == dpkt.pcap.DLT_NULL:
        return buf[4:]
    if linktype == dpkt.pcap.DLT_LINUX_SLL:
        return buf[16:]
    if linktype == 276:  # LINUX_SLL2
        return buf[20:]
    if linktype == dpkt.pcap.DLT_PPP:
        if buf[:2] == b"\xff\x03":
            buf = buf[2:]
        proto = buf[0] if buf[0] & 1 else int.from_bytes(buf[:2], "big")
        return buf[1:] if buf[0] & 1 else (buf[2:] if proto in (0x21, 0x57) else None)
    return None


def _ip(obj: bytes | dpkt.Packet | None) -> dpkt.Packet | None:
    if obj is None or isinstance(obj, dpkt.Packet):
        return obj
    if not obj:
        return None
    version = obj[0] >> 4
    try:
        return dpkt.ip.IP(obj) if version == 4 else dpkt.ip6.IP6(obj) if version == 6 else None
    except (dpkt.UnpackError, IndexError):
        return None


def read_segments(path: str | Path, tunnels: bool = False) -> Iterator[Segment]:
    """TCP and UDP payloads of a capture in file order.

    tunnels=True also opens Teredo (IPv6 in UDP/3544) and GRE-in-UDP (UDP/4754).
    """
    path = Path(path)
    reader, linktype = _open(path)
    frags6: dict[tuple[bytes, bytes, int], dict[int, bytes]] = {}
    for index, (ts, buf) in enumerate(reader):  # type: ignore[attr-defined]
        try:
            ip = _ip(_network_layer(buf, linktype))
        except (dpkt.UnpackError, IndexError, ValueError):
            continue
        depth = 0
        while ip is not None and depth < 3:
            depth += 1
            l4, ip_src, ip_dst = _transport(ip, frags6)
            if l4 is None:
                break
            seg = _segment(index, ts, l4, ip_src, ip_dst)
            if seg is None:
                break
            if tunnels and seg.proto == "udp" and 3544 in (seg.sport, seg.dport):
                ip = _ip(seg.payload)
                continue
            if tunnels and seg.proto == "udp" and 4754 in (seg.sport, seg.dport):
                ip = _ip(_gre_inner(seg.payload))
                continue
            yield seg
            break


def _gre_inner(data: bytes) -> bytes | None:
    if len(data) < 4:
        return None
    flags = int.from_bytes(data[:2], "big")
    off = 4 + 4 * sum(1 for bit in (0x8000, 0x2000, 0x1000) if flags & bit)  # csum, key, seq
    proto = int.from_bytes(data[2:4], "big")
    inner = data[off:]
    if proto == 0x6558:  # transparent Ethernet bridging
        eth = dpkt.ethernet.Ethernet(inner)
        return bytes(eth.data) if isinstance(eth.data, (dpkt.ip.IP, dpkt.ip6.IP6)) else None
    return inner if proto in (0x0800, 0x86DD) else None


def _transport(
    ip: dpkt.Packet, frags6: dict[tuple[bytes, bytes, int], dict[int, bytes]]
) -> tuple[dpkt.Packet | None, str, str]:
    src, dst = _ip_str(ip.src), _ip_str(ip.dst)
    if isinstance(ip, dpkt.ip.IP):
        if ip.mf or ip.offset:
            return None, src, dst
        return ip.data, src, dst
    frag = getattr(ip, "extension_hdrs", {}).get(dpkt.ip.IP_PROTO_FRAGMENT)
    if frag is not None:
        key = (ip.src, ip.dst, frag.id)
        parts = frags6.setdefault(key, {})
        parts[frag.frag_off << 3] = bytes(ip.data) if not isinstance(ip.data, bytes) else ip.data
        if frag.m_flag:
            return None, src, dst
        whole = bytearray()
        for off in sorted(parts):
            if off != len(whole):
                return None, src, dst
            whole += parts[off]
        del frags6[key]
        nxt = frag.nxt
        try:
            if nxt == dpkt.ip.IP_PROTO_UDP:
                return dpkt.udp.UDP(bytes(whole)), src, dst
            if nxt == dpkt.ip.IP_PROTO_TCP:
                return dpkt.tcp.TCP(bytes(whole)), src, dst
        except dpkt.UnpackError:
            return None, src, dst
        return None, src, dst
    return ip.data, src, dst


def _segment(index: int, ts: float, l4: dpkt.Packet, src: str, dst: str) -> Segment | None:
    if isinstance(l4, dpkt.tcp.TCP):
        flags = l4.flags
        return Segment(
            index, ts, "tcp", src, dst, l4.sport, l4.dport, bytes(l4.data), l4.seq,
            bool(flags & dpkt.tcp.TH_SYN), bool(flags & dpkt.tcp.TH_FIN),
            bool(flags & dpkt.tcp.TH_RST),
        )
    if isinstance(l4, dpkt.udp.UDP):
        data = l4.data if isinstance(l4.data, bytes) else bytes(l4.data)
        return Segment(index, ts, "udp", src, dst, l4.sport, l4.dport, data)
    return None


class KernelCapture:
    """A capture's frames through the real TC program, as `leaktap replay` runs them
    (REPLAY_OPTIONS, Ethernet frames cut to a test-run skb, frames the test run
    refuses left out): the samples the kernel delivers. Compiled once per instance."""

    def __init__(self) -> None:
        from leaktap.controller.commands.replay import REPLAY_OPTIONS
        from leaktap.controller.kernel import loader
        from leaktap.controller.kernel.maps import MapReader
        from leaktap.controller.kernel.ringbuf import RingDrainer

        self.probes = loader.load("tc", REPLAY_OPTIONS)
        self._reader = MapReader(self.probes)
        self._received: list[Sample] = []
        self._drainer = RingDrainer(self.probes, self._received.append)
        self._fd = self.probes.fd("egress")

    def samples(self, path: str | Path) -> list[Sample]:
        """Every sample of one capture; flows and followed hellos start empty for each."""
        for i, frame in enumerate(iter_frames(path)):
            if testrun.tc_refuses(frame.frame):
                continue
            testrun.run_frame(self._fd, frame.frame[: testrun.MAX_FRAME])
            if i % _POLL_EVERY == _POLL_EVERY - 1:
                self._drainer.poll()
        self._drainer.poll()
        self._reader.drain_flows()
        self.probes.table("lt_hello").clear()
        out = list(self._received)
        self._received.clear()
        return out

    def hellos(self, path: str | Path) -> list[tuple[tuple[Any, ...], ClientHello]]:
        """(flow, ClientHello) of each hello the kernel's samples complete, in order."""
        r = HelloReassembler()
        out = []
        for s in self.samples(path):
            if s.kind != "tls_hello":
                continue
            flow = (s.src, s.sport, s.dst, s.dport, "tcp")
            hello = r.feed(flow, s.seq, s.data)
            if hello is not None:
                out.append((flow, hello))
        return out

    def quic_hellos(self, path: str | Path) -> list[ClientHello]:
        """The ClientHello of each QUIC Initial flight the kernel's samples complete."""
        from leaktap.controller.protocols.quic import QuicHelloAssembler

        assembler = QuicHelloAssembler()
        out = []
        for s in self.samples(path):
            if s.kind != "quic_initial":
                continue
            hello = assembler.feed((s.src, s.sport, s.dst, s.dport, "udp"), s.data)
            if hello is not None:
                out.append(hello)
        return out

    def close(self) -> None:
        self.probes.close()
