"""Read pcap and pcapng captures and hand every packet on as an Ethernet frame.

`leaktap replay` pushes each packet through the TC program with
BPF_PROG_TEST_RUN, which takes Ethernet frames only. Packets captured on other
link layers get a synthetic Ethernet header whose EtherType comes from their
link header. Packets that are not IP are yielded too (EtherType 0 when the link
does not name one), so the kernel counts them as not understood instead of
them vanishing here.

Classic pcap headers are decoded by dpkt; the record loop is ours because
dpkt's reader trusts the record length and stops silently on a truncated
record. pcapng is read here too: dpkt's reader knows only the first interface
and skips Simple Packet Blocks.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import dpkt

from leaktap.controller.errors import PcapError

__all__ = ["SUPPORTED_LINKTYPES", "Frame", "iter_frames"]

logger = logging.getLogger(__name__)

SUPPORTED_LINKTYPES: dict[int, str] = {
    0: "NULL",
    1: "ETHERNET",
    9: "PPP",
    12: "RAW",  # DLT_RAW's value on most systems, found in files written there
    14: "RAW",  # DLT_RAW's value on OpenBSD
    50: "PPP_HDLC",
    101: "RAW",
    108: "LOOP",
    113: "LINUX_SLL",
    228: "IPV4",
    229: "IPV6",
    276: "LINUX_SLL2",
}

# Only to name the link type in an error; see https://www.tcpdump.org/linktypes.html.
_UNSUPPORTED_LINKTYPE_NAMES = {
    104: "C_HDLC",
    105: "IEEE802_11",
    127: "IEEE802_11_RADIO",
    192: "PPI",
    239: "NFLOG",
    253: "NETLINK",
}

# libpcap's MAXIMUM_SNAPLEN: no capture tool writes a longer record.
_MAX_CAPLEN = 256 * 1024

_ETH_HLEN = 14
_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_SYNTHETIC_MACS = bytes.fromhex("020000000002" "020000000001")  # dst, src

_IP_VERSION_TO_ETHERTYPE = {4: _ETHERTYPE_IPV4, 6: _ETHERTYPE_IPV6}
_PPP_PROTOCOL_TO_ETHERTYPE = {0x0021: _ETHERTYPE_IPV4, 0x0057: _ETHERTYPE_IPV6}
# AF_INET6 differs by OS: 24 NetBSD/OpenBSD (also Npcap), 28 FreeBSD, 30 macOS.
_ADDRESS_FAMILY_TO_ETHERTYPE = {
    2: _ETHERTYPE_IPV4,
    24: _ETHERTYPE_IPV6,
    28: _ETHERTYPE_IPV6,
    30: _ETHERTYPE_IPV6,
}


@dataclass(frozen=True, slots=True)
class Frame:
    number: int  # 1-based packet number in the file
    ts: float  # seconds since epoch (0.0 for a pcapng Simple Packet Block: it has none)
    linktype: int  # link type of the interface the packet was captured on
    frame: bytes  # what to feed the kernel: an Ethernet frame, synthetic header if needed
    captured_len: int  # bytes of this packet in the file (caplen)


@dataclass(frozen=True, slots=True)
class _Record:
    number: int
    ts: float
    linktype: int
    data: bytes


def iter_frames(path: str | os.PathLike[str]) -> Iterator[Frame]:
    """Yield every packet of a pcap or pcapng file as an Ethernet frame.

    @path: the capture file
    Raises PcapError, with the file name and packet number, at the first
    malformed or truncated part; every packet before it has been yielded.
    """
    name = os.fspath(path)
    try:
        capture = open(name, "rb")
    except OSError as e:
        raise PcapError(f"{name}: cannot open: {e.strerror}") from e
    with capture:
        try:
            for record in _read_records(capture):
                yield Frame(
                    number=record.number,
                    ts=record.ts,
                    linktype=record.linktype,
                    frame=_to_ethernet(record.linktype, record.data),
                    captured_len=len(record.data),
                )
        except PcapError as e:
            raise PcapError(f"{name}: {e}") from None


def _read_records(capture: BinaryIO) -> Iterator[_Record]:
    magic = capture.read(4)
    if not magic:
        raise PcapError("empty file, not a pcap or pcapng capture")
    if magic == _PCAPNG_SHB_MAGIC:
        yield from _read_pcapng(capture)
    elif len(magic) == 4 and int.from_bytes(magic, "big") in dpkt.pcap.MAGIC_TO_PKT_HDR:
        yield from _read_pcap(capture, magic)
    else:
        hint = "; it looks gzip-compressed, gunzip it first" if magic[:2] == b"\x1f\x8b" else ""
        raise PcapError(f"not a pcap or pcapng file: magic 0x{magic.hex()}{hint}")


def _check_linktype(linktype: int, where: str = "") -> None:
    if linktype not in SUPPORTED_LINKTYPES:
        name = _UNSUPPORTED_LINKTYPE_NAMES.get(linktype, "unknown")
        supported = ", ".join(f"{lt} {n}" for lt, n in SUPPORTED_LINKTYPES.items())
        raise PcapError(f"{where}unsupported link type {linktype} ({name}); supported: {supported}")


def _check_caplen(number: int, caplen: int, snaplen: int) -> None:
    if caplen > _MAX_CAPLEN:
        raise PcapError(
            f"packet {number}: record says {caplen} bytes, more than the "
            f"{_MAX_CAPLEN}-byte limit of any capture tool (corrupt record)"
        )
    # snaplen 0 means "not recorded" (pcapng: no limit)
    if snaplen and caplen > snaplen:
        raise PcapError(
            f"packet {number}: record says {caplen} bytes, more than the file's "
            f"snaplen of {snaplen} (corrupt record or wrong snaplen)"
        )


# --- classic pcap ----------------------------------------------------------

_PCAP_FILE_HDR_LEN = 24
_PCAP_LITTLE_ENDIAN_MAGICS = {
    dpkt.pcap.PMUDPCT_MAGIC,
    dpkt.pcap.PMUDPCT_MAGIC_NANO,
    dpkt.pcap.PACPDOM_MAGIC,
}
_PCAP_NANOSECOND_MAGICS = {dpkt.pcap.TCPDUMP_MAGIC_NANO, dpkt.pcap.PMUDPCT_MAGIC_NANO}
# libpcap's LT_LINKTYPE(): the top bits of the field carry the FCS length.
_PCAP_LINKTYPE_MASK = 0x03FFFFFF


def _read_pcap(capture: BinaryIO, magic: bytes) -> Iterator[_Record]:
    header = magic + capture.read(_PCAP_FILE_HDR_LEN - len(magic))
    if len(header) < _PCAP_FILE_HDR_LEN:
        raise PcapError(
            f"truncated pcap file header: {len(header)} of {_PCAP_FILE_HDR_LEN} bytes"
        )
    magic_value = int.from_bytes(magic, "big")
    little_endian = magic_value in _PCAP_LITTLE_ENDIAN_MAGICS
    file_hdr = (dpkt.pcap.LEFileHdr if little_endian else dpkt.pcap.FileHdr)(header)
    record_hdr_class = dpkt.pcap.MAGIC_TO_PKT_HDR[magic_value]
    record_hdr_len: int = record_hdr_class.__hdr_len__
    ticks_per_second = 1_000_000_000 if magic_value in _PCAP_NANOSECOND_MAGICS else 1_000_000
    linktype: int = file_hdr.linktype & _PCAP_LINKTYPE_MASK
    snaplen: int = file_hdr.snaplen
    _check_linktype(linktype)
    logger.debug("pcap: link type %d, snaplen %d, %d ticks/s", linktype, snaplen, ticks_per_second)

    number = 0
    while raw_hdr := capture.read(record_hdr_len):
        number += 1
        if len(raw_hdr) < record_hdr_len:
            raise PcapError(
                f"packet {number}: truncated: record header needs {record_hdr_len} bytes, "
                f"file ends after {len(raw_hdr)}"
            )
        record_hdr = record_hdr_class(raw_hdr)
        caplen: int = record_hdr.caplen
        _check_caplen(number, caplen, snaplen)
        data = capture.read(caplen)
        if len(data) < caplen:
            raise PcapError(
                f"packet {number}: truncated: record header says {caplen} bytes, "
                f"file ends after {len(data)}"
            )
        ts = record_hdr.tv_sec + record_hdr.tv_usec / ticks_per_second
        yield _Record(number, ts, linktype, data)


# --- pcapng (https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng-03.html) ---
#
# Every block:  type u32 | total length u32 | body ... | total length u32 (again)
# Lengths are in the byte order of the section, which its SHB's byte-order magic sets.

_PCAPNG_SHB_MAGIC = b"\x0a\x0d\x0d\x0a"  # a palindrome: the same in either byte order
_BLOCK_SHB = 0x0A0D0D0A
_BLOCK_IDB = 1
_BLOCK_PB = 2  # obsolete Packet Block, still written by old tools
_BLOCK_SPB = 3
_BLOCK_EPB = 6
_PACKET_BLOCKS = {_BLOCK_PB, _BLOCK_SPB, _BLOCK_EPB}
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_BLOCK_OVERHEAD = 12  # type, length, trailing length
# Wireshark's limit too; bounds what a lying length can make us read.
_MAX_BLOCK_LEN = 16 * 1024 * 1024
_OPT_ENDOFOPT = 0
_OPT_IF_TSRESOL = 9
_OPT_IF_TSOFFSET = 14


@dataclass(frozen=True, slots=True)
class _Interface:
    linktype: int
    snaplen: int
    ticks_per_second: int
    ts_offset_s: int


def _read_pcapng(capture: BinaryIO) -> Iterator[_Record]:
    order = "<"
    interfaces: list[_Interface] = []
    number = 0  # packets so far
    offset = 0  # of the current block, for error messages
    already_read = _PCAPNG_SHB_MAGIC  # by the format check
    while True:
        block = _read_block(capture, offset, order, already_read, number + 1)
        if block is None:
            return
        block_type, body, order = block
        offset += len(body) + _BLOCK_OVERHEAD
        already_read = b""
        if block_type == _BLOCK_SHB:
            _check_section_header(body, order)
            interfaces = []  # interface ids restart in every section
        elif block_type == _BLOCK_IDB:
            interfaces.append(_parse_interface(body, order, len(interfaces)))
        elif block_type in _PACKET_BLOCKS:
            number += 1
            yield _parse_packet(block_type, body, order, interfaces, number)
        # Other blocks (statistics, name resolution, custom...) carry no packets.


def _read_block(
    capture: BinaryIO, offset: int, order: str, already_read: bytes, next_number: int
) -> tuple[int, bytes, str] | None:
    """Read one whole block; return (type, body, byte order) or None at end of file.

    @offset: where the block starts in the file, for error messages
    @order: byte order of the current section (a new SHB replaces it)
    @already_read: the first bytes of the block, consumed by the caller
    @next_number: the number the next packet gets, for error messages
    """
    head = already_read + capture.read(8 - len(already_read))
    if not head:
        return None
    where = f"pcapng block at byte {offset}"
    if len(head) < 8:
        raise PcapError(
            f"{where}: truncated: block header needs 8 bytes, file ends after {len(head)}"
        )
    body_start = b""
    if head[:4] == _PCAPNG_SHB_MAGIC:
        # A section header sets the byte order of the lengths, its own included.
        body_start = capture.read(4)
        if len(body_start) < 4:
            raise PcapError(f"{where}: truncated section header")
        if struct.unpack("<I", body_start)[0] == _BYTE_ORDER_MAGIC:
            order = "<"
        elif struct.unpack(">I", body_start)[0] == _BYTE_ORDER_MAGIC:
            order = ">"
        else:
            raise PcapError(f"{where}: bad byte-order magic 0x{body_start.hex()}")
    block_type, total_len = struct.unpack(order + "II", head)
    if block_type in _PACKET_BLOCKS:
        where = f"packet {next_number} ({where})"
    if total_len < _BLOCK_OVERHEAD + len(body_start) or total_len % 4:
        raise PcapError(f"{where}: invalid block length {total_len}")
    if total_len > _MAX_BLOCK_LEN:
        raise PcapError(
            f"{where}: block length {total_len} exceeds the {_MAX_BLOCK_LEN}-byte limit"
        )
    rest_len = total_len - 8 - len(body_start)
    rest = capture.read(rest_len)
    if len(rest) < rest_len:
        raise PcapError(
            f"{where}: truncated: block header says {total_len} bytes, "
            f"file ends after {8 + len(body_start) + len(rest)}"
        )
    (trailing_len,) = struct.unpack(order + "I", rest[-4:])
    if trailing_len != total_len:
        raise PcapError(
            f"{where}: block length {total_len} disagrees with its trailing copy {trailing_len}"
        )
    return block_type, body_start + rest[:-4], order


def _check_section_header(body: bytes, order: str) -> None:
    if len(body) < 16:  # byte-order magic, version, section length
        raise PcapError("pcapng section header too short")
    major, minor = struct.unpack_from(order + "HH", body, 4)
    if major != 1:
        raise PcapError(f"unsupported pcapng version {major}.{minor}")


def _parse_interface(body: bytes, order: str, interface_id: int) -> _Interface:
    if len(body) < 8:
        raise PcapError(f"interface {interface_id}: description block too short")
    linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", body)
    ticks_per_second = 1_000_000
    ts_offset_s = 0
    for code, value in _iter_options(body[8:], order, interface_id):
        if code == _OPT_IF_TSRESOL and len(value) >= 1:
            # High bit set: a negative power of 2; otherwise a negative power of 10.
            exponent = value[0] & 0x7F
            ticks_per_second = 2**exponent if value[0] & 0x80 else 10**exponent
        elif code == _OPT_IF_TSOFFSET and len(value) >= 8:
            (ts_offset_s,) = struct.unpack_from(order + "q", value)
    logger.debug(
        "pcapng interface %d: link type %d, snaplen %d, %d ticks/s",
        interface_id, linktype, snaplen, ticks_per_second,
    )
    return _Interface(linktype, snaplen, ticks_per_second, ts_offset_s)


def _iter_options(options: bytes, order: str, interface_id: int) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(options):
        code, length = struct.unpack_from(order + "HH", options, pos)
        if code == _OPT_ENDOFOPT:
            return
        value = options[pos + 4 : pos + 4 + length]
        if len(value) < length:
            raise PcapError(f"interface {interface_id}: option {code} runs past its block")
        yield code, value
        pos += 4 + _pad4(length)


def _parse_packet(
    block_type: int, body: bytes, order: str, interfaces: list[_Interface], number: int
) -> _Record:
    if block_type == _BLOCK_SPB:
        # No interface id, no timestamp, no captured length: interface 0, and the
        # length is the original one cut to the snaplen.
        if len(body) < 4:
            raise PcapError(f"packet {number}: simple packet block too short")
        (original_len,) = struct.unpack_from(order + "I", body)
        interface = _interface(interfaces, 0, number)
        caplen = min(original_len, interface.snaplen or original_len)
        ts = 0.0
        data_start = 4
    else:
        if len(body) < 20:
            raise PcapError(f"packet {number}: packet block too short")
        if block_type == _BLOCK_EPB:
            interface_id, ts_high, ts_low, caplen, _original_len = struct.unpack_from(
                order + "IIIII", body
            )
        else:  # the obsolete Packet Block: a 16-bit interface id and a drop count
            interface_id, _drops, ts_high, ts_low, caplen, _original_len = struct.unpack_from(
                order + "HHIIII", body
            )
        interface = _interface(interfaces, interface_id, number)
        ts = interface.ts_offset_s + ((ts_high << 32) | ts_low) / interface.ticks_per_second
        data_start = 20

    _check_linktype(interface.linktype, where=f"packet {number}: ")
    _check_caplen(number, caplen, interface.snaplen)
    data = body[data_start : data_start + caplen]
    if len(data) < caplen:
        raise PcapError(
            f"packet {number}: packet length {caplen} overruns its block, "
            f"which has room for {len(body) - data_start}"
        )
    return _Record(number, ts, interface.linktype, data)


def _interface(interfaces: list[_Interface], interface_id: int, number: int) -> _Interface:
    if interface_id >= len(interfaces):
        raise PcapError(
            f"packet {number}: interface {interface_id} is not described "
            f"(the section has {len(interfaces)} interface descriptions)"
        )
    return interfaces[interface_id]


def _pad4(length: int) -> int:
    return (length + 3) & ~3


# --- link layer to Ethernet -------------------------------------------------
# Each splitter returns (EtherType, payload after the link header). A record too
# short for its link header, or with a header it cannot read, gives EtherType 0
# and the whole record as payload: nothing is silently dropped.


def _to_ethernet(linktype: int, data: bytes) -> bytes:
    """Return the Ethernet frame to feed the kernel for one captured packet.

    @linktype: a key of SUPPORTED_LINKTYPES
    @data: the packet as captured, link header included
    """
    if linktype == 1:
        # Unchanged, VLAN tags included; a capture cut shorter than the Ethernet
        # header is zero-padded because BPF_PROG_TEST_RUN rejects < 14 bytes.
        return data.ljust(_ETH_HLEN, b"\0")
    ethertype, payload = _LINK_SPLITTERS[linktype](data)
    return _SYNTHETIC_MACS + ethertype.to_bytes(2, "big") + payload


def _split_raw_ip(data: bytes) -> tuple[int, bytes]:
    version = data[0] >> 4 if data else 0
    return _IP_VERSION_TO_ETHERTYPE.get(version, 0), data


def _split_null(data: bytes) -> tuple[int, bytes]:
    if len(data) < 4:
        return 0, data
    # The address family is in the capturing host's byte order; the real value is small.
    family = int.from_bytes(data[:4], "little")
    if family > 0xFFFF:
        family = int.from_bytes(data[:4], "big")
    return _ADDRESS_FAMILY_TO_ETHERTYPE.get(family, 0), data[4:]


def _split_loop(data: bytes) -> tuple[int, bytes]:
    if len(data) < 4:
        return 0, data
    return _ADDRESS_FAMILY_TO_ETHERTYPE.get(int.from_bytes(data[:4], "big"), 0), data[4:]


def _split_ppp(data: bytes) -> tuple[int, bytes]:
    # Optional RFC 1662 address/control bytes, then a 2-byte protocol, or a
    # 1-byte one when compressed (RFC 1661: its low bit is set).
    header = 2 if data[:2] == b"\xff\x03" else 0
    if len(data) <= header:
        return 0, data
    if data[header] & 1:
        protocol, header = data[header], header + 1
    elif len(data) >= header + 2:
        protocol, header = int.from_bytes(data[header : header + 2], "big"), header + 2
    else:
        return 0, data
    return _PPP_PROTOCOL_TO_ETHERTYPE.get(protocol, 0), data[header:]


def _split_ppp_hdlc(data: bytes) -> tuple[int, bytes]:
    # Cisco HDLC (address 0x0F unicast, 0x8F broadcast) carries an EtherType itself.
    if data[:1] in (b"\x0f", b"\x8f"):
        if len(data) < 4:
            return 0, data
        return int.from_bytes(data[2:4], "big"), data[4:]
    return _split_ppp(data)


def _split_cooked(data: bytes, header_len: int, protocol_at: int) -> tuple[int, bytes]:
    if len(data) < header_len:
        return 0, data
    protocol = int.from_bytes(data[protocol_at : protocol_at + 2], "big")
    # Below 0x0600 the field is not an EtherType (802.3 length, LLC, netlink family).
    return (protocol if protocol >= 0x0600 else 0), data[header_len:]


def _split_sll(data: bytes) -> tuple[int, bytes]:
    return _split_cooked(data, header_len=16, protocol_at=14)


def _split_sll2(data: bytes) -> tuple[int, bytes]:
    return _split_cooked(data, header_len=20, protocol_at=0)


_LINK_SPLITTERS = {
    0: _split_null,
    9: _split_ppp,
    12: _split_raw_ip,
    14: _split_raw_ip,
    50: _split_ppp_hdlc,
    101: _split_raw_ip,
    108: _split_loop,
    113: _split_sll,
    228: _split_raw_ip,
    229: _split_raw_ip,
    276: _split_sll2,
}
