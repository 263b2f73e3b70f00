"""ClientHello parser and TCP reassembly: crafted hellos, hostile input, the public corpus."""

from __future__ import annotations

import itertools
import random
import struct
from collections import Counter, defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.tls.extensions import (
    ProtocolName,
    ServerName,
    TLS_Ext_ALPN,
    TLS_Ext_Padding,
    TLS_Ext_ServerName,
    TLS_Ext_SupportedVersion_CH,
    TLS_Ext_Unknown,
)
from scapy.layers.tls.handshake import TLSClientHello
from scapy.layers.tls.record import TLS

from leaktap.controller.protocols.tls import (
    ClientHello,
    HelloReassembler,
    is_grease,
    parse_client_hello,
    parse_dtls_client_hello,
    parse_handshake_message,
)
from tests.corpus import CORPUS, load_tsv, read_segments

MSS = 1448
FLOW = ("198.18.1.10", 40000, "198.18.5.5", 443, "tcp")


def make_hello(
    sni: bytes | None = b"acme.my.salesforce.com",
    *,
    seed: int = 0,
    pq_bytes: int = 0,
    ech: bool = False,
    grease: bool = True,
    padding: int = 64,
    sni_last: bool = False,
) -> bytes:
    """A TLS record holding a scapy-built ClientHello, extensions in seeded random order."""
    exts: list[object] = [
        TLS_Ext_ALPN(protocols=[ProtocolName(protocol=b"h2"), ProtocolName(protocol=b"http/1.1")]),
        TLS_Ext_SupportedVersion_CH(versions=[0x7A7A, 0x0304, 0x0303]),
    ]
    if grease:
        exts += [TLS_Ext_Unknown(type=0x2A2A, val=b""), TLS_Ext_Unknown(type=0xDADA, val=b"\x00")]
    if ech:
        exts.append(TLS_Ext_Unknown(type=0xFE0D, val=bytes(range(200))))
    if pq_bytes:
        # key_share stand-in: X25519MLKEM768 is 1216 bytes of key material
        exts.append(TLS_Ext_Unknown(type=0x0033, val=b"\x11\xec" + b"\x5a" * pq_bytes))
    rng = random.Random(seed)
    rng.shuffle(exts)
    if padding:
        exts.append(TLS_Ext_Padding(padding=b"\x00" * padding))
    if sni is not None:
        sni_ext = TLS_Ext_ServerName(servernames=[ServerName(servername=sni)])
        if sni_last:
            exts.append(sni_ext)
        else:
            exts.insert(rng.randrange(len(exts) + 1), sni_ext)
    ciphers = [0x0A0A, 0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F]
    ch = TLSClientHello(version=0x0303, ciphers=ciphers, sid=bytes(32), ext=exts)
    return bytes(TLS(version=0x0301, msg=[ch]))


def split_records(record: bytes, sizes: list[int]) -> bytes:
    """Re-frame one handshake record as several records of the given fragment sizes."""
    msg = record[5:]
    out = b""
    pos = 0
    for size in sizes + [len(msg)]:
        if pos >= len(msg):
            break
        frag = msg[pos : pos + size]
        out += b"\x16\x03\x01" + struct.pack("!H", len(frag)) + frag
        pos += len(frag)
    return out


def segments(data: bytes, sizes: list[int], isn: int = 1000) -> list[tuple[int, bytes]]:
    """(seq, payload) cuts of a stream whose first byte has sequence number isn+1."""
    out = []
    pos = 0
    seq = (isn + 1) % 2**32
    for size in sizes + [len(data)]:
        if pos >= len(data):
            break
        chunk = data[pos : pos + size]
        out.append(((seq + pos) % 2**32, chunk))
        pos += len(chunk)
    return out


# --- parser --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_shuffled_extensions_grease_and_padding(seed: int) -> None:
    hello = parse_client_hello(make_hello(seed=seed))
    assert hello is not None
    assert hello.sni == "acme.my.salesforce.com"
    assert hello.alpn == ("h2", "http/1.1")
    assert hello.supported_versions == (0x0304, 0x0303)  # GREASE 0x7a7a dropped
    assert hello.legacy_version == 0x0303
    assert hello.ech is False


def test_ech_flagged_and_outer_name_kept() -> None:
    hello = parse_client_hello(make_hello(b"cloudflare-ech.com", ech=True))
    assert hello is not None and hello.ech and hello.sni == "cloudflare-ech.com"


@pytest.mark.parametrize(
    ("raw", "sni"),
    [
        (b"Acme.My.Salesforce.COM.", "acme.my.salesforce.com"),
        (b"198.18.5.5", "198.18.5.5"),  # IP literal: RFC 6066 forbids it, peers report it
        (b"rr4---sn-5hne6nzy.googlevideo.com", "rr4---sn-5hne6nzy.googlevideo.com"),
        (b"_dmarc.example.com", "_dmarc.example.com"),
        (b"bad name.example", None),
        (b"nul\x00.example.com", None),
        (b"server4:443", None),
        (b"-lead.example.com", None),
        (b"a..b", None),
        (b".", None),
        ("bücher.example".encode(), None),
        (b"x" * 64 + b".example.com", None),  # label over 63
        ((b"a" * 60 + b".") * 5, None),  # name over 253
    ],
)
def test_sni_normalisation_and_validity(raw: bytes, sni: str | None) -> None:
    hello = parse_client_hello(make_hello(raw))
    assert hello is not None
    assert hello.sni == sni
    assert hello.sni_raw is not None and "\x00" not in hello.sni_raw


def test_no_sni_extension() -> None:
    hello = parse_client_hello(make_hello(None))
    assert hello is not None and hello.sni is None and hello.sni_raw is None


def test_hello_fragmented_over_records() -> None:
    rec = make_hello(seed=3)
    multi = split_records(rec, [1, 3, 50, 7])  # even the 4-byte header is split
    assert parse_client_hello(multi) == parse_client_hello(rec)


def test_bare_handshake_message_entry_point() -> None:
    rec = make_hello(seed=5)
    assert parse_handshake_message(rec[5:]) == parse_client_hello(rec)


def test_sslv2_compatible_hello_has_no_sni() -> None:
    # SSLv2 CLIENT-HELLO announcing TLS 1.0: 3 cipher specs, no session id, 16-byte challenge
    body = b"\x01\x03\x01" + struct.pack("!HHH", 9, 0, 16) + bytes(9) + bytes(range(16))
    data = struct.pack("!H", 0x8000 | len(body)) + body
    hello = parse_client_hello(data)
    assert hello == ClientHello(None, False, (), 0x0301, (), None, True)
    assert parse_client_hello(data[:-1]) is None


def test_old_hello_without_extensions() -> None:
    body = b"\x03\x01" + bytes(32) + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    rec = b"\x16\x03\x01" + struct.pack("!H", len(msg)) + msg
    hello = parse_client_hello(rec)
    assert hello is not None and hello.sni is None and hello.legacy_version == 0x0301


def test_grease_values() -> None:
    assert all(is_grease(0x0A0A + 0x1010 * i) for i in range(16))
    assert not is_grease(0x0A1A) and not is_grease(0x1301)


def _corrupt(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def test_lying_length_fields() -> None:
    rec = make_hello(seed=1)
    # record length shorter than the handshake message: the next "record" is garbage
    assert parse_client_hello(_corrupt(rec, 3, b"\x00\x10")) is None
    # record length beyond the TLS maximum
    assert parse_client_hello(_corrupt(rec, 3, b"\xff\xff")) is None
    # a record longer than the hello is fine: the kernel captures up to the hello's end
    assert parse_client_hello(_corrupt(rec, 3, b"\x3f\xff")) == parse_client_hello(rec)
    assert parse_client_hello(_corrupt(rec, 6, b"\x00\xff\xff")) is None
    assert parse_client_hello(_corrupt(rec, 6, b"\x00\x00\x10")) is None
    # session id longer than 32
    assert parse_client_hello(_corrupt(rec, 5 + 4 + 34, b"\x21")) is None
    # extensions block length off by one either way
    msg = rec[5:]
    p = 4 + 2 + 32 + 1 + msg[4 + 34]
    p += 2 + int.from_bytes(msg[p : p + 2], "big")
    p += 1 + msg[p]
    ext_len = int.from_bytes(msg[p : p + 2], "big")
    for delta in (-1, 1, 0x1000):
        bad = _corrupt(rec, 5 + p, ((ext_len + delta) & 0xFFFF).to_bytes(2, "big"))
        assert parse_client_hello(bad) is None


def test_lying_sni_lengths() -> None:
    rec = make_hello(b"acme.my.salesforce.com", seed=2, padding=0)
    i = rec.index(b"acme.my.salesforce.com")
    # server_name entry length 0x00ff and list length 0xffff overrun their extension
    assert parse_client_hello(_corrupt(rec, i - 2, b"\x00\xff")) is None
    assert parse_client_hello(_corrupt(rec, i - 5, b"\xff\xff")) is None


def test_duplicate_sni_extension_rejected() -> None:
    sni = TLS_Ext_ServerName(servernames=[ServerName(servername=b"a.example")])
    sni2 = TLS_Ext_ServerName(servernames=[ServerName(servername=b"b.example")])
    rec = bytes(TLS(msg=[TLSClientHello(ciphers=[0x1301], ext=[sni, sni2])]))
    assert parse_client_hello(rec) is None


def test_every_truncation_is_none() -> None:
    rec = make_hello(seed=4)
    for i in range(len(rec)):
        assert parse_client_hello(rec[:i]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: acme.my.salesforce.com\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x16\x03\x01\x00\x00",
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # ServerHello
        b"\x17\x03\x03\x00\x10" + bytes(16),  # application data
        b"\x16\x03\x09\x00\x04\x01\x00\x00\x00",
        b"\x16\xfe\xfd" + bytes(40),  # DTLS
        b"",
    ],
)
def test_not_a_client_hello(data: bytes) -> None:
    assert parse_client_hello(data) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_never_raise(data: bytes) -> None:
    result = parse_client_hello(data)
    assert result is None or isinstance(result, ClientHello)
    parse_handshake_message(data)
    parse_client_hello(b"\x16\x03\x01" + data)


_BASE = make_hello(seed=9, ech=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_BASE) - 1), st.integers(0, 255)), max_size=8))
def test_mutated_hello_never_raises(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_BASE)
    for pos, val in edits:
        data[pos] = val
    result = parse_client_hello(bytes(data))
    if result is not None and result.sni is not None:
        assert result.sni == result.sni.lower() and not result.sni.endswith(".")


# --- reassembly ------------------------------------------------------------------


def test_post_quantum_hello_sni_after_first_mss() -> None:
    rec = make_hello(
        b"acme--uat.sandbox.my.salesforce.com", pq_bytes=1252, padding=380, sni_last=True
    )
    assert 1700 <= len(rec) <= 2000
    assert rec.index(b"acme--uat") > MSS
    r = HelloReassembler()
    segs = segments(rec, [MSS])
    assert len(segs) == 2
    assert r.feed(FLOW, *segs[0]) is None
    hello = r.feed(FLOW, *segs[1])
    assert hello is not None and hello.sni == "acme--uat.sandbox.my.salesforce.com"
    assert r.stats.completed == 1 and len(r) == 0


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_three_segments_any_order(order: tuple[int, ...]) -> None:
    rec = make_hello(seed=7)
    segs = segments(rec, [80, 80])
    assert len(segs) == 3
    r = HelloReassembler()
    results = [r.feed(FLOW, *segs[i]) for i in order]
    assert results[:2] == [None, None]
    assert results[2] is not None and results[2].sni == "acme.my.salesforce.com"


def test_retransmissions_and_overlaps() -> None:
    rec = make_hello(seed=8, pq_bytes=1300)
    segs = segments(rec, [500, 400, 300])
    seq0 = segs[0][0]
    r = HelloReassembler()
    assert len(segs) == 4
    feed = [
        segs[1],
        segs[1],  # duplicate
        segs[0],
        (seq0 + 450, rec[450:1300]),  # overlaps the end of 0, all of 1, part of 2
        segs[0],  # retransmission
    ]
    assert all(r.feed(FLOW, s, d) is None for s, d in feed)
    hello = r.feed(FLOW, *segs[3])
    assert hello is not None and hello.sni == "acme.my.salesforce.com"
    assert hello == parse_client_hello(rec)
    # later retransmissions of the same flow are ignored, not reported twice
    assert r.feed(FLOW, *segs[0]) is None and r.stats.ignored == 1


def test_record_fragmented_hello_over_segments() -> None:
    data = split_records(make_hello(seed=1), [120, 120, 120])
    r = HelloReassembler()
    out = [r.feed(FLOW, s, d) for s, d in segments(data, [130, 130])]
    assert out[-1] is not None and out[-1].sni == "acme.my.salesforce.com"


def test_hello_ending_inside_a_longer_last_record_completes_at_the_message_end() -> None:
    # The kernel stops capturing at the handshake message's end; a last record
    # that also carries the next message must not keep the hello waiting for it.
    record = make_hello(seed=3)
    more = b"\x0b\x00\x00\x02\xab\xcd"
    data = split_records(record[:5] + record[5:] + more, [150])
    hello_end = len(data) - len(more)
    r = HelloReassembler()
    out = [r.feed(FLOW, s, d) for s, d in segments(data[:hello_end], [100, 100])]
    assert out[:-1] == [None, None]
    assert out[-1] is not None and out[-1].sni == "acme.my.salesforce.com"


def test_tcp_fast_open_syn_carries_the_hello() -> None:
    rec = make_hello(seed=2)
    isn = 0xFFFFFF00  # sequence numbers wrap inside the hello
    r = HelloReassembler()
    assert r.feed(FLOW, isn, rec[:200], syn=True) is None
    hello = r.feed(FLOW, (isn + 1 + 200) % 2**32, rec[200:])
    assert hello is not None and hello.sni == "acme.my.salesforce.com"


def test_starttls_plaintext_before_hello_ignored() -> None:
    rec = make_hello(seed=3)
    r = HelloReassembler()
    assert r.feed(FLOW, 5000, b"STARTTLS\r\n") is None  # not captured normally; harmless
    assert r.feed(FLOW, 5010 + 300, rec[300:]) is None  # continuation before the start
    hello = r.feed(FLOW, 5010, rec[:300])
    assert hello is not None and hello.sni == "acme.my.salesforce.com"


def test_not_tls_flow_given_up_once() -> None:
    r = HelloReassembler()
    assert r.feed(FLOW, 1, b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") is None  # ServerHello
    assert r.stats.not_tls == 1 and len(r) == 0


def test_bound_bytes() -> None:
    # a hello announcing 15 KiB, delivered in 1 KiB records: the 2 KiB bound gives up
    r = HelloReassembler(max_bytes=2048)
    msg = b"\x01" + (15000).to_bytes(3, "big") + bytes(15000)
    data = split_records(b"\x16\x03\x01\x00\x00" + msg, [1000] * 16)
    for s, d in segments(data, [700] * 30):
        assert r.feed(FLOW, s, d) is None
    assert r.stats.gave_up_bytes == 1 and len(r) == 0


def test_bound_oversized_hello_is_not_tls() -> None:
    r = HelloReassembler()
    assert r.feed(FLOW, 1, b"\x16\x03\x01\x40\x00\x01\x01\x00\x00") is None  # 64 KiB hello
    assert r.stats.not_tls == 1


def test_bound_segments() -> None:
    rec = make_hello(seed=4)
    r = HelloReassembler(max_segments=4)
    segs = segments(rec, [10] * 100)
    for s, d in segs[:5]:
        assert r.feed(FLOW, s, d) is None
    assert r.stats.gave_up_segments == 1 and len(r) == 0


def test_bound_flows_lru_and_age() -> None:
    now = [0.0]
    r = HelloReassembler(max_flows=3, max_age=5.0, clock=lambda: now[0])
    rec = make_hello(seed=5)
    for port in range(5):
        r.feed(("h", port), 1, rec[:50])
    assert len(r) == 3 and r.stats.evicted == 2
    now[0] = 6.0
    r.feed(("h", 99), 1, rec[:50])
    assert r.stats.expired == 3 and len(r) == 1
    # an evicted flow simply starts again
    assert r.feed(("h", 0), 51, rec[50:]) is None


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=600), st.booleans()),
        max_size=40,
    )
)
def test_reassembler_random_segments_never_raise(segs: list[tuple[int, bytes, bool]]) -> None:
    r = HelloReassembler(max_flows=4, max_segments=8)
    for i, (seq, data, syn) in enumerate(segs):
        flow = i % 5
        out = r.feed(flow, seq, b"\x16\x03\x01" + data if i % 3 == 0 else data, syn)
        assert out is None or isinstance(out, ClientHello)
    assert len(r) <= 4


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_reassembler_any_cut_any_order(data: st.DataObject) -> None:
    rec = make_hello(seed=6, pq_bytes=1300)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(rec) - 1), max_size=6)))
    sizes = [b - a for a, b in zip([0, *cuts], cuts, strict=False)]
    segs = segments(rec, sizes, isn=data.draw(st.integers(0, 2**32 - 1)))
    segs = data.draw(st.permutations(segs))
    r = HelloReassembler()
    results = [r.feed(FLOW, s, d) for s, d in segs]
    assert [x for x in results if x is not None] == [parse_client_hello(rec)]


# --- public corpus: Zeek and Suricata TCP rows ------------------------------------


# Rows of the corpus that are not plain TCP TLS, with the reason they are not checked here.
ZEEK_NOT_TCP = {
    "tcp-tunneled": "TLS inside WebSocket frames (wstunnel): no TLS record on the TCP stream",
    "udp-dtls": "checked by test_corpus_zeek_dtls (the kernel does not capture DTLS)",
    "quic": "checked in test_quic.py",
}


def _name(hello: ClientHello) -> str:
    return hello.sni if hello.sni is not None else "-"


def _grouped(tsv: str, transport: str) -> dict[str, list[dict[str, str]]]:
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in load_tsv(tsv):
        if row["transport"] == transport:
            groups[row["pcap_path"]].append(row)
    return dict(groups)


def test_corpus_rows_accounted_for() -> None:
    for row in load_tsv("zeek/expected.tsv"):
        assert row["transport"] == "tcp" or row["transport"] in ZEEK_NOT_TCP, row
    for row in load_tsv("suricata/expected.tsv"):
        assert row["transport"] in ("tcp", "quic"), row


@pytest.mark.parametrize(
    "pcap",
    ["suricata/pcaps/tcp-fastopen-10-syn-data-ignore__input.pcap",
     "suricata/pcaps/tcp-fastopen-11-reject-syn-data__tlpw-tcp-tfo-data-on-syn-nack.pcap"],
)
def test_corpus_tfo_hello_from_the_syn_alone(pcap: str) -> None:
    syns = [s for s in read_segments(CORPUS / pcap) if s.syn and s.payload]
    assert syns
    r = HelloReassembler()
    hello = r.feed(syns[0].flow, syns[0].seq, syns[0].payload, syn=True)
    assert hello is not None and hello.sni == "icloud.com"


@pytest.mark.parametrize(
    ("pcap", "rows"), sorted(_grouped("zeek/expected.tsv", "udp-dtls").items()),
    ids=lambda v: v.rsplit("/", 1)[-1] if isinstance(v, str) else "",
)
def test_corpus_zeek_dtls(pcap: str, rows: list[dict[str, str]]) -> None:
    """DTLS hellos: fragmented over datagrams, and sent twice around a HelloVerifyRequest."""
    flows: dict[tuple[str, int, str, int, str], list[bytes]] = defaultdict(list)
    for seg in read_segments(pcap):
        if seg.proto == "udp":
            flows[seg.flow].append(seg.payload)
    hellos = [h for h in map(parse_dtls_client_hello, flows.values()) if h is not None]
    assert Counter(_name(h) for h in hellos) == Counter(r["server_name"] for r in rows)
    assert all(h.legacy_version in (0xFEFD, 0xFEFF) for h in hellos)


def test_dtls_hostile_input_is_none() -> None:
    assert parse_dtls_client_hello([b""]) is None
    assert parse_dtls_client_hello([b"\x16\xfe\xfd" + bytes(10) + b"\xff\xff" + bytes(20)]) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=400), max_size=4))
def test_dtls_random_bytes_never_raise(data: list[bytes]) -> None:
    parse_dtls_client_hello([b"\x16\xfe\xfd" + d for d in data])
    parse_dtls_client_hello([b"\x16\xfe\xfd" + bytes(8) + b"\x00\x18\x01" + d for d in data])
