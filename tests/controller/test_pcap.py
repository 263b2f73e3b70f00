"""leaktap.controller.protocols.pcap against real captures and files written byte by byte."""

from __future__ import annotations

import csv
import gzip
import random
import struct
from collections import Counter
from pathlib import Path

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1Q, Ether
from scapy.utils import PcapWriter

from leaktap.controller.errors import PcapError
from leaktap.controller.protocols.pcap import SUPPORTED_LINKTYPES, Frame, iter_frames
from tests.corpus import CORPUS

SYNTHETIC_MACS = bytes.fromhex("020000000002" "020000000001")
VLAN_ETHERTYPES = {0x8100, 0x88A8}

IPV4 = bytes(IP(src="198.18.0.1", dst="198.18.0.2") / TCP(sport=40000, dport=443, flags="S"))
IPV6 = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=40000, dport=53) / b"query")
ARP_PACKET = bytes(ARP(psrc="198.18.0.1", pdst="198.18.0.2"))


def ethertype_of(frame: bytes) -> int:
    offset = 12
    while int.from_bytes(frame[offset : offset + 2], "big") in VLAN_ETHERTYPES:
        offset += 4
    return int.from_bytes(frame[offset : offset + 2], "big")


def read_until_error(path: Path) -> tuple[list[Frame], str]:
    frames: list[Frame] = []
    with pytest.raises(PcapError) as excinfo:
        for frame in iter_frames(path):
            frames.append(frame)
    return frames, str(excinfo.value)


# --- writers (independent of the module under test) ---------------------------


def pcap_bytes(
    linktype: int,
    records: list[bytes],
    *,
    order: str = "<",
    nano: bool = False,
    snaplen: int = 65535,
    ts: tuple[int, int] = (1_700_000_000, 0),
) -> bytes:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)
    for data in records:
        out += struct.pack(order + "IIII", ts[0], ts[1], len(data), len(data)) + data
    return out


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def ng_block(order: str, block_type: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    total = len(body) + 12
    return struct.pack(order + "II", block_type, total) + body + struct.pack(order + "I", total)


def ng_option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def ng_shb(order: str = "<") -> bytes:
    return ng_block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def ng_idb(
    order: str,
    linktype: int,
    *,
    snaplen: int = 0,
    tsresol: int | None = None,
    tsoffset: int | None = None,
) -> bytes:
    body = struct.pack(order + "HHI", linktype, 0, snaplen)
    body += ng_option(order, 2, b"veth-test")  # if_name, to be skipped
    if tsresol is not None:
        body += ng_option(order, 9, bytes([tsresol]))
    if tsoffset is not None:
        body += ng_option(order, 14, struct.pack(order + "q", tsoffset))
    body += struct.pack(order + "HH", 0, 0)
    return ng_block(order, 1, body)


def ng_epb(order: str, interface_id: int, ticks: int, data: bytes) -> bytes:
    fixed = struct.pack(
        order + "IIIII", interface_id, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data)
    )
    return ng_block(order, 6, fixed + data)


def ng_pb(order: str, interface_id: int, ticks: int, data: bytes) -> bytes:
    fixed = struct.pack(
        order + "HHIIII", interface_id, 0, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data)
    )
    return ng_block(order, 2, fixed + data)


def ng_spb(order: str, original_len: int, data: bytes) -> bytes:
    return ng_block(order, 3, struct.pack(order + "I", original_len) + data)


def ng_isb(order: str) -> bytes:
    return ng_block(order, 5, struct.pack(order + "III", 0, 0, 0))


# --- the corpus: third-party captures with counts from verify.tsv --------------


def corpus_rows() -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for tsv in sorted(CORPUS.glob("*/verify.tsv")):
        with tsv.open(newline="") as f:
            rows.extend(csv.DictReader(f, delimiter="\t"))
    return rows


def test_corpus_rows_cover_every_capture() -> None:
    listed = {row["file"] for row in corpus_rows()}
    on_disk = {str(p.relative_to(CORPUS)) for p in CORPUS.glob("*/pcaps/*")}
    assert on_disk and listed == on_disk


@pytest.mark.parametrize("row", corpus_rows(), ids=lambda row: row["file"])
def test_corpus_file_reads_completely(row: dict[str, str]) -> None:
    frames = list(iter_frames(CORPUS / row["file"]))

    assert [f.number for f in frames] == list(range(1, int(row["packets"]) + 1))
    assert {f.linktype for f in frames} == {int(row["linktype"])}
    ethertypes = Counter(ethertype_of(f.frame) for f in frames)
    assert ethertypes[0x0800] == int(row["ipv4"])
    assert ethertypes[0x86DD] == int(row["ipv6"])
    assert all(len(f.frame) >= 14 for f in frames)


@pytest.mark.parametrize(
    "name", sorted(str(p.relative_to(CORPUS)) for p in CORPUS.glob("*/pcaps/*"))
)
def test_corpus_file_matches_dpkt(name: str) -> None:
    """Timestamps and record bytes agree with dpkt's own readers on intact files."""
    with (CORPUS / name).open("rb") as f:
        reader = dpkt.pcapng.Reader(f) if name.endswith(".pcapng") else dpkt.pcap.Reader(f)
        expected = [(float(ts), data) for ts, data in reader]
    frames = list(iter_frames(CORPUS / name))

    assert [f.captured_len for f in frames] == [len(data) for _, data in expected]
    assert [f.ts for f in frames] == pytest.approx([ts for ts, _ in expected], abs=1e-6)
    if frames[0].linktype == 1:
        assert [f.frame for f in frames] == [data for _, data in expected]


# --- every supported link type, written by scapy ---------------------------------

MAC = b"\x02\x00\x00\x00\x00\x01\x00\x00"
# (linktype, case id, link header before IPV4 or None, link header before IPV6 or None)
LINK_CASES = [
    (0, "null-little-endian-host", struct.pack("<I", 2), struct.pack("<I", 30)),
    (0, "null-big-endian-host", struct.pack(">I", 2), struct.pack(">I", 24)),
    (0, "null-freebsd", struct.pack("<I", 2), struct.pack("<I", 28)),
    (9, "ppp", b"\x00\x21", b"\x00\x57"),
    (9, "ppp-hdlc-framed", b"\xff\x03\x00\x21", b"\xff\x03\x00\x57"),
    (9, "ppp-compressed-protocol", b"\x21", b"\x57"),
    (12, "raw-dlt12", b"", b""),
    (14, "raw-dlt14", b"", b""),
    (50, "ppp-hdlc", b"\xff\x03\x00\x21", b"\xff\x03\x00\x57"),
    (50, "cisco-hdlc", b"\x0f\x00\x08\x00", b"\x8f\x00\x86\xdd"),
    (101, "raw", b"", b""),
    (108, "loop", struct.pack(">I", 2), struct.pack(">I", 24)),
    (
        113,
        "linux-sll",
        bytes(CookedLinux(pkttype=4, lladdrtype=1, lladdrlen=6, src=MAC, proto=0x0800)),
        bytes(CookedLinux(pkttype=4, lladdrtype=1, lladdrlen=6, src=MAC, proto=0x86DD)),
    ),
    (228, "ipv4", b"", None),
    (229, "ipv6", None, b""),
    (
        276,
        "linux-sll2",
        bytes(CookedLinuxV2(proto=0x0800, ifindex=2, lladdrtype=1, lladdrlen=6, src=MAC)),
        bytes(CookedLinuxV2(proto=0x86DD, ifindex=2, lladdrtype=1, lladdrlen=6, src=MAC)),
    ),
]


def test_every_supported_linktype_has_a_case() -> None:
    assert {case[0] for case in LINK_CASES} | {1} == set(SUPPORTED_LINKTYPES)


@pytest.mark.parametrize(
    ("linktype", "v4_header", "v6_header"),
    [pytest.param(lt, h4, h6, id=case_id) for lt, case_id, h4, h6 in LINK_CASES],
)
def test_link_header_becomes_synthetic_ethernet(
    tmp_path: Path, linktype: int, v4_header: bytes | None, v6_header: bytes | None
) -> None:
    expected = [
        (header + ip, ethertype, ip)
        for header, ethertype, ip in [(v4_header, 0x0800, IPV4), (v6_header, 0x86DD, IPV6)]
        if header is not None
    ]
    path = tmp_path / "link.pcap"
    if linktype == 0:
        # scapy's PcapWriter takes linktype=0 for "guess" (`if linktype:`) and writes 1.
        path.write_bytes(pcap_bytes(0, [record for record, _, _ in expected]))
    else:
        with PcapWriter(str(path), linktype=linktype) as writer:
            for record, _, _ in expected:
                writer.write(record)

    frames = list(iter_frames(path))

    assert len(frames) == len(expected)
    pairs = zip(frames, expected, strict=True)
    for number, (frame, (record, ethertype, ip)) in enumerate(pairs, 1):
        assert frame.number == number
        assert frame.linktype == linktype
        assert frame.captured_len == len(record)
        assert frame.frame[:12] == SYNTHETIC_MACS
        assert int.from_bytes(frame.frame[12:14], "big") == ethertype
        assert frame.frame[14:] == ip


def test_ethernet_frame_is_unchanged_vlan_tags_included(tmp_path: Path) -> None:
    packets = [
        bytes(Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b") / IP(IPV4)),
        bytes(Ether() / Dot1Q(vlan=7) / Dot1Q(vlan=8) / IPv6(IPV6)),
    ]
    path = tmp_path / "ether.pcap"
    with PcapWriter(str(path), linktype=1) as writer:
        for packet in packets:
            writer.write(packet)

    frames = list(iter_frames(path))

    assert [f.frame for f in frames] == packets
    assert [f.captured_len for f in frames] == [len(p) for p in packets]
    assert [ethertype_of(f.frame) for f in frames] == [0x0800, 0x86DD]


@pytest.mark.parametrize(
    ("linktype", "record", "ethertype", "payload"),
    [
        pytest.param(113, bytes(CookedLinux(proto=0x0806)) + ARP_PACKET, 0x0806, ARP_PACKET,
                     id="sll-arp"),
        pytest.param(276, bytes(CookedLinuxV2(proto=0x0806)) + ARP_PACKET, 0x0806, ARP_PACKET,
                     id="sll2-arp"),
        pytest.param(113, bytes(CookedLinux(proto=0x0004)) + b"\xaa\xaa\x03", 0, b"\xaa\xaa\x03",
                     id="sll-802.2-llc"),
        pytest.param(9, b"\xc0\x21\x01\x01\x00\x04", 0, b"\x01\x01\x00\x04", id="ppp-lcp"),
        pytest.param(0, struct.pack("<I", 7) + b"xyz", 0, b"xyz", id="null-unknown-family"),
        pytest.param(101, b"\x50\x00\x00\x14", 0, b"\x50\x00\x00\x14", id="raw-version-5"),
        pytest.param(101, b"", 0, b"", id="raw-empty"),
        pytest.param(108, b"\x00\x00", 0, b"\x00\x00", id="loop-cut-short"),
        pytest.param(276, b"\x08\x00\x00", 0, b"\x08\x00\x00", id="sll2-cut-short"),
    ],
)
def test_non_ip_frames_are_yielded_not_dropped(
    tmp_path: Path, linktype: int, record: bytes, ethertype: int, payload: bytes
) -> None:
    path = write(tmp_path, "other.pcap", pcap_bytes(linktype, [record]))

    (frame,) = iter_frames(path)

    assert frame.frame == SYNTHETIC_MACS + ethertype.to_bytes(2, "big") + payload
    assert frame.captured_len == len(record)


def test_ethernet_record_shorter_than_header_is_padded(tmp_path: Path) -> None:
    path = write(tmp_path, "runt.pcap", pcap_bytes(1, [b"\x02" * 10]))

    (frame,) = iter_frames(path)

    assert frame.frame == b"\x02" * 10 + b"\0" * 4
    assert frame.captured_len == 10


# --- pcap variants -----------------------------------------------------------------


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
@pytest.mark.parametrize(
    ("nano", "fraction", "expected_ts"),
    [(False, 654_321, 1_700_000_000.654321), (True, 123_456_789, 1_700_000_000.123456789)],
    ids=["microsecond", "nanosecond"],
)
def test_pcap_byte_orders_and_resolutions(
    tmp_path: Path, order: str, nano: bool, fraction: int, expected_ts: float
) -> None:
    content = pcap_bytes(101, [IPV4, IPV6], order=order, nano=nano, ts=(1_700_000_000, fraction))
    path = write(tmp_path, "variant.pcap", content)

    frames = list(iter_frames(path))

    assert [f.frame[14:] for f in frames] == [IPV4, IPV6]
    assert [f.ts for f in frames] == [pytest.approx(expected_ts, abs=1e-6)] * 2


def test_big_endian_nanosecond_pcap_from_scapy(tmp_path: Path) -> None:
    packet = Ether() / IP(IPV4)
    packet.time = 1_700_000_000.25
    path = tmp_path / "be.pcap"
    with PcapWriter(str(path), linktype=1, endianness=">", nano=True) as writer:
        writer.write(packet)

    assert path.read_bytes()[:4] == bytes.fromhex("a1b23c4d")
    (frame,) = iter_frames(path)
    assert frame.frame == bytes(packet)
    assert frame.ts == pytest.approx(1_700_000_000.25, abs=1e-9)


def test_modified_pcap_with_longer_record_headers(tmp_path: Path) -> None:
    # Kuznetsov's patched libpcap: magic a1b2cd34, 24-byte record headers.
    content = struct.pack("<IHHiIII", 0xA1B2CD34, 2, 4, 0, 0, 65535, 101)
    for ip in (IPV4, IPV6):
        content += struct.pack("<IIIIIHBB", 7, 500_000, len(ip), len(ip), 2, 0x0800, 0, 0) + ip
    path = write(tmp_path, "modified.pcap", content)

    frames = list(iter_frames(path))

    assert [(f.ts, f.frame[14:]) for f in frames] == [(7.5, IPV4), (7.5, IPV6)]


# --- pcapng ------------------------------------------------------------------------


def test_pcapng_interfaces_with_different_link_types(tmp_path: Path) -> None:
    order = "<"
    eth_packet = bytes(Ether() / IP(IPV4))
    sll2_header = bytes(CookedLinuxV2(proto=0x86DD))
    content = (
        ng_shb(order)
        + ng_idb(order, 1, snaplen=262144)  # default resolution: microseconds
        + ng_idb(order, 276, tsresol=9)  # nanoseconds
        + ng_idb(order, 0, tsresol=0x80 | 10, tsoffset=1_700_000_000)  # 1/1024 s, offset
        + ng_epb(order, 1, 1_700_000_001_500_000_000, sll2_header + IPV6)
        + ng_isb(order)  # statistics block: no packet, skipped
        + ng_epb(order, 0, 1_700_000_002_250_000, eth_packet)
        + ng_pb(order, 2, 512, struct.pack("<I", 2) + IPV4)
    )
    path = write(tmp_path, "multi.pcapng", content)

    frames = list(iter_frames(path))

    assert [(f.number, f.linktype) for f in frames] == [(1, 276), (2, 1), (3, 0)]
    assert [f.ts for f in frames] == pytest.approx(
        [1_700_000_001.5, 1_700_000_002.25, 1_700_000_000.5]
    )
    assert frames[0].frame == SYNTHETIC_MACS + b"\x86\xdd" + IPV6
    assert frames[1].frame == eth_packet
    assert frames[2].frame == SYNTHETIC_MACS + b"\x08\x00" + IPV4
    assert [f.captured_len for f in frames] == [
        len(sll2_header) + len(IPV6), len(eth_packet), 4 + len(IPV4)
    ]


def test_pcapng_simple_packet_blocks_cut_to_snaplen(tmp_path: Path) -> None:
    order = "<"
    snaplen = 40
    content = (
        ng_shb(order)
        + ng_idb(order, 101, snaplen=snaplen)
        + ng_spb(order, len(IPV4), IPV4)  # 40 bytes: fits
        + ng_spb(order, len(IPV6), IPV6[:snaplen])  # cut to the snaplen by the capture
    )
    assert len(IPV4) == snaplen < len(IPV6)
    path = write(tmp_path, "spb.pcapng", content)

    frames = list(iter_frames(path))

    assert [f.frame[14:] for f in frames] == [IPV4, IPV6[:snaplen]]
    assert [f.captured_len for f in frames] == [snaplen, snaplen]
    assert [f.ts for f in frames] == [0.0, 0.0]  # a Simple Packet Block has no timestamp


def test_pcapng_big_endian_section_after_little_endian_one(tmp_path: Path) -> None:
    content = (
        ng_shb("<")
        + ng_idb("<", 1)
        + ng_epb("<", 0, 1_000_000, bytes(Ether() / IP(IPV4)))
        + ng_shb(">")  # a new section: new byte order, interface ids start again
        + ng_idb(">", 229)
        + ng_epb(">", 0, 2_000_000, IPV6)
    )
    path = write(tmp_path, "sections.pcapng", content)

    frames = list(iter_frames(path))

    assert [(f.number, f.linktype, f.ts) for f in frames] == [(1, 1, 1.0), (2, 229, 2.0)]
    assert frames[1].frame == SYNTHETIC_MACS + b"\x86\xdd" + IPV6


# --- hostile input -----------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    _, message = read_until_error(tmp_path / "absent.pcap")
    assert message.endswith("absent.pcap: cannot open: No such file or directory")


def test_empty_file(tmp_path: Path) -> None:
    _, message = read_until_error(write(tmp_path, "empty.pcap", b""))
    assert message.endswith("empty.pcap: empty file, not a pcap or pcapng capture")


def test_random_bytes(tmp_path: Path) -> None:
    noise = random.Random(1234).randbytes(4096)
    _, message = read_until_error(write(tmp_path, "noise.pcap", noise))
    assert message.endswith(f"not a pcap or pcapng file: magic 0x{noise[:4].hex()}")


def test_gzip_compressed_capture(tmp_path: Path) -> None:
    content = gzip.compress(pcap_bytes(101, [IPV4]))
    _, message = read_until_error(write(tmp_path, "c.pcap.gz", content))
    assert "magic 0x1f8b0800; it looks gzip-compressed, gunzip it first" in message


def test_truncated_global_header(tmp_path: Path) -> None:
    _, message = read_until_error(write(tmp_path, "t.pcap", pcap_bytes(101, [IPV4])[:10]))
    assert message.endswith("truncated pcap file header: 10 of 24 bytes")


def test_truncated_record_header(tmp_path: Path) -> None:
    content = pcap_bytes(101, [IPV4, IPV6]) + b"\0" * 7
    frames, message = read_until_error(write(tmp_path, "t.pcap", content))
    assert len(frames) == 2
    assert message.endswith("packet 3: truncated: record header needs 16 bytes, file ends after 7")


def test_truncated_record_body(tmp_path: Path) -> None:
    frame_1514 = bytes(Ether() / IP(IPV4)).ljust(1514, b"\0")
    content = pcap_bytes(1, [frame_1514] * 17)[: -(1514 - 200)]
    frames, message = read_until_error(write(tmp_path, "t.pcap", content))
    assert [f.number for f in frames] == list(range(1, 17))
    assert message.endswith(
        "packet 17: truncated: record header says 1514 bytes, file ends after 200"
    )


def test_caplen_of_4_gigabytes(tmp_path: Path) -> None:
    content = pcap_bytes(101, [IPV4]) + struct.pack("<IIII", 0, 0, 0xFFFFFFFF, 0xFFFFFFFF) + IPV4
    frames, message = read_until_error(write(tmp_path, "huge.pcap", content))
    assert len(frames) == 1
    assert message.endswith(
        "packet 2: record says 4294967295 bytes, more than the 262144-byte limit "
        "of any capture tool (corrupt record)"
    )


def test_caplen_above_snaplen(tmp_path: Path) -> None:
    content = pcap_bytes(101, [IPV4[:30], IPV4], snaplen=30)
    frames, message = read_until_error(write(tmp_path, "snap.pcap", content))
    assert len(frames) == 1
    assert message.endswith(
        f"packet 2: record says {len(IPV4)} bytes, more than the file's snaplen of 30 "
        "(corrupt record or wrong snaplen)"
    )


def test_unsupported_linktype_in_pcap(tmp_path: Path) -> None:
    _, message = read_until_error(write(tmp_path, "wifi.pcap", pcap_bytes(127, [b"\0" * 40])))
    assert "unsupported link type 127 (IEEE802_11_RADIO); supported: 0 NULL, 1 ETHERNET" in message
    assert "276 LINUX_SLL2" in message


def test_unsupported_linktype_on_a_pcapng_interface(tmp_path: Path) -> None:
    content = (
        ng_shb() + ng_idb("<", 101) + ng_idb("<", 147)
        + ng_epb("<", 0, 0, IPV4) + ng_epb("<", 1, 0, b"user-defined")
    )
    frames, message = read_until_error(write(tmp_path, "u.pcapng", content))
    assert len(frames) == 1
    assert "packet 2: unsupported link type 147 (unknown); supported: 0 NULL" in message


def _lying_blocks() -> list[object]:
    head = ng_shb() + ng_idb("<", 101)
    good = ng_epb("<", 0, 0, IPV4)
    offset = len(head) + len(good)  # where the bad block starts
    epb = ng_epb("<", 0, 0, IPV6)
    total = len(epb)

    def with_lengths(leading: int, trailing: int) -> bytes:
        return struct.pack("<II", 6, leading) + epb[8:-4] + struct.pack("<I", trailing)

    overrun = bytearray(epb)
    struct.pack_into("<I", overrun, 20, 1000)  # captured length beyond the block
    return [
        pytest.param(head + good + with_lengths(total, total + 4),
                     f"packet 2 (pcapng block at byte {offset}): block length {total} "
                     f"disagrees with its trailing copy {total + 4}", id="trailing-copy-differs"),
        pytest.param(head + good + with_lengths(total + 4, total + 4) + b"\0" * 8,
                     f"packet 2 (pcapng block at byte {offset}): block length {total + 4} "
                     "disagrees with its trailing copy 0", id="says-longer"),
        pytest.param(head + good + with_lengths(total + 100, total),
                     f"packet 2 (pcapng block at byte {offset}): truncated: block header says "
                     f"{total + 100} bytes, file ends after {total}", id="past-end-of-file"),
        pytest.param(head + good + with_lengths(total - 2, total - 2),
                     f"packet 2 (pcapng block at byte {offset}): invalid block length "
                     f"{total - 2}", id="not-multiple-of-4"),
        pytest.param(head + good + with_lengths(8, 8),
                     f"packet 2 (pcapng block at byte {offset}): invalid block length 8",
                     id="shorter-than-minimum"),
        pytest.param(head + good + with_lengths(0xFFFFFFFC, total),
                     f"packet 2 (pcapng block at byte {offset}): block length 4294967292 "
                     "exceeds the 16777216-byte limit", id="4-gigabytes"),
        pytest.param(head + good + bytes(overrun),
                     "packet 2: packet length 1000 overruns its block, which has room for "
                     f"{len(epb) - 32}", id="caplen-overruns-block"),
        pytest.param(head + good + ng_epb("<", 3, 0, IPV6),
                     "packet 2: interface 3 is not described (the section has 1 interface "
                     "descriptions)", id="undescribed-interface"),
        pytest.param(head + good + ng_idb("<", 1)[:-4] + struct.pack("<I", 12),
                     f"pcapng block at byte {offset}: block length 40 disagrees with its "
                     "trailing copy 12", id="interface-block"),
    ]


@pytest.mark.parametrize(("content", "expected"), _lying_blocks())
def test_pcapng_block_with_lying_length(tmp_path: Path, content: bytes, expected: str) -> None:
    frames, message = read_until_error(write(tmp_path, "lie.pcapng", content))
    assert [f.frame[14:] for f in frames] == [IPV4]
    assert message.endswith(expected)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_damaged_files_raise_only_pcap_error(tmp_path: Path, data: st.DataObject) -> None:
    """Cut or flip bytes anywhere: the reader yields frames or says PcapError, nothing else."""
    originals = [
        pcap_bytes(113, [bytes(CookedLinux(proto=0x0800)) + IPV4] * 3),
        ng_shb() + ng_idb("<", 1, tsresol=9) + ng_idb("<", 0)
        + ng_epb("<", 0, 5, bytes(Ether() / IP(IPV4))) + ng_spb("<", len(IPV6), IPV6)
        + ng_epb("<", 1, 7, struct.pack("<I", 30) + IPV6),
    ]
    content = bytearray(data.draw(st.sampled_from(originals)))
    for _ in range(data.draw(st.integers(0, 4))):
        position = data.draw(st.integers(0, len(content) - 1))
        content[position] = data.draw(st.integers(0, 255))
    content = content[: data.draw(st.integers(0, len(content)))]
    path = write(tmp_path, "damaged", bytes(content))

    try:
        for frame in iter_frames(path):
            assert len(frame.frame) >= 14
    except PcapError:
        pass
