"""QUIC Initial decryption and CRYPTO reassembly: RFC vectors, crafted packets (the corpus
runs through the kernel in test_corpus_hellos.py)."""

from __future__ import annotations

import random

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.tls.extensions import ServerName, TLS_Ext_ServerName, TLS_Ext_Unknown
from scapy.layers.tls.handshake import TLSClientHello

from leaktap.controller.protocols.quic import (
    QUIC_V1,
    QUIC_V2,
    QuicHelloAssembler,
    client_initial_keys,
    iter_crypto_frames,
    parse_long_header,
)
from leaktap.controller.protocols.tls import ClientHello

RFC_DCID = bytes.fromhex("8394c8f03e515708")
# RFC 9001 appendix A.1 and RFC 9369 appendix A.1: client Initial key, iv, hp
RFC_KEYS = {
    QUIC_V1: ("1f369613dd76d5467730efcbe3b1a22d", "fa044b2f42a3fd3b46fb255c",
              "9f50449e04a0e810283a1e9933adedd2"),
    QUIC_V2: ("8b1a0bc121284290a29e0971b5cd045d", "91f73e2351d8fa91660e909f",
              "45b95e15235d6f45a6b19cbcb0294ba9"),
}
FLOW = ("198.18.1.10", 50000, "198.18.5.5", 443, "udp")


@pytest.mark.parametrize("version", [QUIC_V1, QUIC_V2])
def test_rfc_key_derivation(version: int) -> None:
    keys = client_initial_keys(RFC_DCID, version)
    assert keys is not None
    assert (keys.key.hex(), keys.iv.hex(), keys.hp_key.hex()) == RFC_KEYS[version]


# --- a test-side encoder using the RFC's keys (independent of the derivation) ------


def _varint(v: int) -> bytes:
    if v < 0x40:
        return bytes([v])
    if v < 0x4000:
        return (v | 0x4000).to_bytes(2, "big")
    return (v | 0x80000000).to_bytes(4, "big")


def crypto_frame(offset: int, data: bytes) -> bytes:
    return b"\x06" + _varint(offset) + _varint(len(data)) + data


def protect_initial(
    frames: bytes, version: int = QUIC_V1, pn: int = 0, dcid: bytes = RFC_DCID,
    keys: tuple[str, str, str] | None = None, pad_to: int = 1162,
) -> bytes:
    """A client Initial (RFC 9001 §5) with a 2-byte packet number."""
    key, iv, hp = (bytes.fromhex(x) for x in (keys or RFC_KEYS[version]))
    payload = frames + b"\x00" * max(0, pad_to - len(frames))
    ptype = 0 if version == QUIC_V1 else 1
    first = 0xC0 | (ptype << 4) | 0x01  # pn length 2
    pn_bytes = pn.to_bytes(2, "big")
    length = len(pn_bytes) + len(payload) + 16
    header = (bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid
              + b"\x00" + _varint(0) + (length | 0x4000).to_bytes(2, "big") + pn_bytes)
    nonce = (int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big")
    ct = AESGCM(key).encrypt(nonce, payload, header)
    pn_off = len(header) - 2
    sample = ct[4 - 2 : 4 - 2 + 16]
    enc = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = enc.update(sample) + enc.finalize()
    h = bytearray(header)
    h[0] ^= mask[0] & 0x0F
    h[pn_off] ^= mask[1]
    h[pn_off + 1] ^= mask[2]
    return bytes(h) + ct


def hello_message(sni: bytes = b"acme.my.salesforce.com", big: bool = False) -> bytes:
    exts = [TLS_Ext_ServerName(servernames=[ServerName(servername=sni)]),
            TLS_Ext_Unknown(type=0x0039, val=b"\x01\x02\x03\x04")]  # quic_transport_parameters
    if big:
        exts.insert(0, TLS_Ext_Unknown(type=0x0033, val=b"\x11\xec" + b"\x77" * 1250))
    return bytes(TLSClientHello(version=0x0303, ciphers=[0x1301], ext=exts))


@pytest.mark.parametrize("version", [QUIC_V1, QUIC_V2])
def test_single_initial(version: int) -> None:
    pkt = protect_initial(crypto_frame(0, hello_message()), version)
    hdr = parse_long_header(pkt)
    assert hdr is not None and hdr.is_initial and hdr.dcid == RFC_DCID
    a = QuicHelloAssembler()
    hello = a.feed(FLOW, pkt)
    assert hello is not None and hello.sni == "acme.my.salesforce.com"
    assert a.stats.completed == 1


def test_rfc9001_a2_header_protection_prefix() -> None:
    """Our test encoder reproduces the start of RFC 9001 A.2's protected packet."""
    # A.2's first frame (CRYPTO of the 241-byte hello) starts "060040f1010000ed0303"; the
    # unprotected header is c300000001088394c8f03e5157080000449e00000002 (4-byte pn).
    protected = bytes.fromhex("c000000001088394c8f03e5157080000449e7b9aec34")
    hdr = parse_long_header(protected + bytes(1200))
    assert hdr is not None and hdr.is_initial and hdr.version == QUIC_V1
    assert hdr.pn_offset == 18 and hdr.end == 18 + 0x049E


def test_fragmented_unordered_crypto_over_initials_and_coalesced() -> None:
    msg = hello_message(big=True)
    assert len(msg) > 1300
    cuts = [0, 7, 300, 301, 900, 1100, len(msg)]
    pieces = [crypto_frame(a, msg[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    rng = random.Random(1)
    rng.shuffle(pieces)
    # Chrome-style chaos: PING and PADDING between CRYPTO frames, an ACK too
    p1 = b"\x01" + pieces[0] + b"\x00\x00" + pieces[1] + b"\x02\x00\x00\x00\x00" + pieces[2]
    p2 = pieces[3] + b"\x01" + pieces[4]
    p3 = pieces[5]
    d1 = protect_initial(p1, pn=0, pad_to=0)
    d2 = protect_initial(p2, pn=1, pad_to=0) + protect_initial(p3, pn=2, pad_to=0)  # coalesced
    a = QuicHelloAssembler()
    assert a.feed(FLOW, d1) is None
    hello = a.feed(FLOW, d2)
    assert hello is not None and hello.sni == "acme.my.salesforce.com"


def test_later_initial_with_server_chosen_dcid_uses_first_keys() -> None:
    msg = hello_message()
    d1 = protect_initial(crypto_frame(0, msg[:30]), pn=0)
    # after the server's Initial, the client addresses the server's CID but keeps its keys
    d2 = protect_initial(crypto_frame(30, msg[30:]), pn=1, dcid=bytes.fromhex("aabbccdd"))
    a = QuicHelloAssembler()
    assert a.feed(FLOW, d1) is None
    hello = a.feed(FLOW, d2)
    assert hello is not None and hello.sni == "acme.my.salesforce.com"


def test_gap_never_completes_and_is_bounded() -> None:
    msg = hello_message()
    a = QuicHelloAssembler(max_datagrams=3)
    for pn in range(3):
        assert a.feed(FLOW, protect_initial(crypto_frame(50, msg[50:]), pn=pn)) is None
    assert a.feed(FLOW, protect_initial(crypto_frame(50, msg[50:]), pn=3)) is None
    assert a.stats.gave_up_datagrams == 1 and len(a) == 0


def test_crypto_beyond_max_bytes_gives_up() -> None:
    a = QuicHelloAssembler(max_bytes=4096)
    assert a.feed(FLOW, protect_initial(crypto_frame(5000, b"x" * 10))) is None
    assert a.stats.gave_up_bytes == 1


def test_wrong_keys_short_header_and_version_negotiation() -> None:
    a = QuicHelloAssembler()
    wrong = ("00" * 16, "00" * 12, "00" * 16)
    assert a.feed(FLOW, protect_initial(crypto_frame(0, hello_message()), keys=wrong)) is None
    assert a.stats.decrypt_failed == 1
    assert a.feed(FLOW, b"\x40" + bytes(1200)) is None  # short header
    vn = b"\x80\x00\x00\x00\x00\x08" + RFC_DCID + b"\x00" + b"\x00\x00\x00\x01"
    assert a.feed(FLOW, vn) is None
    assert a.stats.not_initial == 2


def test_not_a_client_hello_in_crypto() -> None:
    a = QuicHelloAssembler()
    assert a.feed(FLOW, protect_initial(crypto_frame(0, b"\x02\x00\x00\x04abcd"))) is None
    assert a.stats.not_client_hello == 1


def test_lru_and_age_bounds() -> None:
    now = [0.0]
    a = QuicHelloAssembler(max_flows=2, max_age=1.0, clock=lambda: now[0])
    part = protect_initial(crypto_frame(0, hello_message()[:40]))
    for port in range(4):
        a.feed(("f", port), part)
    assert len(a) == 2 and a.stats.evicted == 2
    now[0] = 2.0
    a.feed(("f", 9), part)
    assert a.stats.expired == 2 and len(a) == 1


def test_gquic_chlo() -> None:
    values = b"\x00" * 4 + b"acme.zendesk.com" + b"Q046"
    chlo = (b"CHLO" + (3).to_bytes(2, "little") + b"\x00\x00"
            + b"PAD\x00" + (4).to_bytes(4, "little")
            + b"SNI\x00" + (20).to_bytes(4, "little")
            + b"VER\x00" + (24).to_bytes(4, "little") + values)
    dgram = b"\xc3Q046\x50" + bytes(8) + b"\x01" + bytes(12) + b"\xa0\x01" + chlo
    hello = QuicHelloAssembler().feed(FLOW, dgram + bytes(100))
    assert hello is not None and hello.sni == "acme.zendesk.com"
    # an entry end offset beyond the datagram
    bad = dgram.replace((20).to_bytes(4, "little"), (9000).to_bytes(4, "little"))
    assert QuicHelloAssembler().feed(FLOW, bad) is None


def test_frame_parser_rejects_stream_frames() -> None:
    assert iter_crypto_frames(b"\x08\x00\x00") is None
    assert iter_crypto_frames(b"\x06\x00\x10abc") is None  # length past the end
    assert iter_crypto_frames(b"\x00\x00\x01\x06\x00\x01z") == [(0, b"z")]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500))
def test_random_datagrams_never_raise(data: bytes) -> None:
    a = QuicHelloAssembler()
    a.feed(FLOW, data)
    a.feed(FLOW, b"\xc0\x00\x00\x00\x01" + data)
    iter_crypto_frames(data)


_GOOD = protect_initial(crypto_frame(0, hello_message()))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_header_never_raises(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_GOOD)
    for pos, val in edits:
        data[pos] = val
    out = QuicHelloAssembler().feed(FLOW, bytes(data))
    assert out is None or isinstance(out, ClientHello)
