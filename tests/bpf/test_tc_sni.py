"""The server name read in the kernel (bpf/include/lt_sni.h) equals the user-space parser's.

Every case of tests/controller/test_tls.py's parser tables runs through the TC
egress program (BPF_PROG_TEST_RUN) and through controller/protocols/tls.py: the
kernel's name (drained from lt_names) must equal ClientHello.sni, and a hello the
user-space parser rejects must get no name in the kernel. Splits: a hello over
several segments of one record is read on the segment that completes it; one
spread over several records is not read in the kernel (counted).
"""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Dot1Q
from scapy.layers.tls.extensions import ServerName, TLS_Ext_ServerName
from scapy.layers.tls.handshake import TLSClientHello
from scapy.layers.tls.record import TLS
from scapy.packet import Raw

from leaktap.controller.protocols.tls import parse_client_hello
from tests.bpf.harness import Harness, Outcome
from tests.bpf.lt_frames import CLIENT4, SERVER4, eth, tcp4, tcp6
from tests.controller.test_tls import MSS, _corrupt, make_hello, split_records

pytestmark = pytest.mark.kernel

_sport = iter(range(20000, 60000))


def _user_name(record: bytes) -> str | None:
    hello = parse_client_hello(record)
    return None if hello is None else hello.sni


def _run_one(tc: Harness, frame_of: object, record: bytes) -> Outcome:
    sport = next(_sport)
    return tc.run(frame_of(record, sport))  # type: ignore[operator]


def _v4(record: bytes, sport: int) -> bytes:
    return tcp4(record, sport=sport)


def _kernel_name(out: Outcome) -> str | None:
    named = [n for n in out.names if n.outcome == "named"]
    assert len(named) <= 1, out.names
    return named[0].name if named else None


SNI_CASES = [
    b"Acme.My.Salesforce.COM.",
    b"198.18.5.5",
    b"rr4---sn-5hne6nzy.googlevideo.com",
    b"_dmarc.example.com",
    b"bad name.example",
    b"nul\x00.example.com",
    b"server4:443",
    b"-lead.example.com",
    b"lead-.example.com",
    b"a..b",
    b".",
    "bücher.example".encode(),
    b"x" * 64 + b".example.com",
    b"x" * 63 + b".example.com",
    (b"a" * 60 + b".") * 5,
    (b"a" * 62 + b".") * 4,  # 252 bytes + a trailing dot
    b"a" * 40 + b"." + b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 63 + b"..",
]


def _cases() -> list[tuple[str, bytes]]:
    cases = [(f"seed{seed}", make_hello(seed=seed)) for seed in range(8)]
    cases += [(f"sni{i}", make_hello(raw, seed=i)) for i, raw in enumerate(SNI_CASES)]
    cases += [
        ("no_sni", make_hello(None)),
        ("no_grease_no_padding", make_hello(grease=False, padding=0)),
        ("sni_last", make_hello(sni_last=True, seed=3)),
        ("ech", make_hello(b"cloudflare-ech.com", ech=True)),
    ]
    body = b"\x03\x01" + bytes(32) + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    cases.append(("no_extensions", b"\x16\x03\x01" + len(msg).to_bytes(2, "big") + msg))
    # lying lengths (tests/controller/test_tls.py test_lying_length_fields / _sni_lengths)
    rec = make_hello(seed=1)
    cases += [
        ("rec_len_long", _corrupt(rec, 3, b"\x3f\xff")),
        ("hs_len_ffff", _corrupt(rec, 6, b"\x00\xff\xff")),
        ("hs_len_short", _corrupt(rec, 6, b"\x00\x00\x10")),
        ("sid_33", _corrupt(rec, 5 + 4 + 34, b"\x21")),
    ]
    m = rec[5:]
    p = 4 + 2 + 32 + 1 + m[4 + 34]
    p += 2 + int.from_bytes(m[p : p + 2], "big")
    p += 1 + m[p]
    ext_len = int.from_bytes(m[p : p + 2], "big")
    for delta in (-1, 1, 0x1000):
        bad = _corrupt(rec, 5 + p, ((ext_len + delta) & 0xFFFF).to_bytes(2, "big"))
        cases.append((f"ext_total{delta:+d}", bad))
    rec2 = make_hello(b"acme.my.salesforce.com", seed=2, padding=0)
    i = rec2.index(b"acme.my.salesforce.com")
    cases += [
        ("sni_entry_ff", _corrupt(rec2, i - 2, b"\x00\xff")),
        ("sni_list_ffff", _corrupt(rec2, i - 5, b"\xff\xff")),
        ("sni_entry_short", _corrupt(rec2, i - 2, b"\x00\x04")),
        ("sni_type_1", _corrupt(rec2, i - 3, b"\x01")),
    ]
    dup = [TLS_Ext_ServerName(servernames=[ServerName(servername=b"a.example")]),
           TLS_Ext_ServerName(servernames=[ServerName(servername=b"b.example")])]
    cases.append(("duplicate_sni", bytes(TLS(msg=[TLSClientHello(ciphers=[0x1301], ext=dup)]))))
    # single-byte mutations of an ECH hello: whatever user space says, the kernel says
    base = make_hello(seed=9, ech=True)
    rng = random.Random(12)
    for k in range(24):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(9, len(data))] = rng.randrange(256)
        cases.append((f"mutated{k}", bytes(data)))
    return cases


CASES = _cases()


@pytest.mark.parametrize("record", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_kernel_name_equals_user_space_name(tc: Harness, record: bytes) -> None:
    out = _run_one(tc, _v4, record)

    assert _kernel_name(out) == _user_name(record)
    assert out.retvals == [0]  # reading names never drops (no policy)
    if parse_client_hello(record) is None:
        assert all(n.outcome in ("malformed", "limit") for n in out.names), out.names


def test_named_and_unnamed_hellos_are_counted_by_reason(tc: Harness) -> None:
    out = tc.run([
        tcp4(make_hello(seed=1), sport=41001),
        tcp4(make_hello(None), sport=41002),
        tcp4(make_hello(b"bad name.example"), sport=41003),
        tcp4(_corrupt(make_hello(seed=1), 6, b"\x00\x00\x10"), sport=41004),
    ])

    changed = out.changed()
    assert changed["cnt_sni_named"] == 1
    assert changed["cnt_sni_no_name"] == 2
    assert changed["sni_malformed"] == 1
    assert sorted(n.outcome for n in out.names) == ["malformed", "named", "no_name", "no_name"]
    named = next(n for n in out.names if n.outcome == "named")
    assert (named.key.sport, named.key.dst, named.seq) == (41001, SERVER4, 1000)
    assert named.ech is False


def test_ech_flag_and_outer_name(tc: Harness) -> None:
    out = tc.run(tcp4(make_hello(b"cloudflare-ech.com", ech=True)))

    assert [(n.name, n.ech) for n in out.names] == [("cloudflare-ech.com", True)]


def test_ipv6_and_vlan_hellos_are_named(tc: Harness) -> None:
    rec = make_hello(b"Acme.Lightning.Force.com", seed=4)
    vlan = bytes(eth() / Dot1Q(vlan=7) / Dot1Q(vlan=9) / IP(src=CLIENT4, dst=SERVER4)
                 / TCP(sport=42002, dport=443, seq=1000, flags="PA") / Raw(rec))

    out = tc.run([tcp6(rec, sport=42001), vlan])

    assert sorted((n.key.family, n.name) for n in out.names) == [
        (4, "acme.lightning.force.com"), (6, "acme.lightning.force.com")]


def _split(tc: Harness, record: bytes, sizes: list[int], sport: int) -> Outcome:
    frames, pos = [], 0
    for n in [*sizes, len(record)]:
        if pos >= len(record):
            break
        frames.append(tcp4(record[pos : pos + n], sport=sport, seq=1000 + pos))
        pos += n
    return tc.run(frames)


def test_post_quantum_hello_split_at_the_mss_is_read_on_its_last_segment(tc: Harness) -> None:
    rec = make_hello(b"acme--uat.sandbox.my.salesforce.com", pq_bytes=1252, padding=380,
                     sni_last=True)
    assert rec.index(b"acme--uat") > MSS

    out = _split(tc, rec, [MSS], sport=43001)

    assert [(n.name, n.seq, n.outcome) for n in out.names] == [
        ("acme--uat.sandbox.my.salesforce.com", 1000, "named")]
    assert _user_name(rec) == "acme--uat.sandbox.my.salesforce.com"


@pytest.mark.parametrize("sizes", [[1], [5], [8]])
def test_hello_header_cut_is_not_read_and_counted(tc: Harness, sizes: list[int]) -> None:
    # the record and handshake headers are only walked, never buffered: a first segment
    # shorter than both (no real client sends one) is left to the ring
    rec = make_hello(seed=7)

    out = _split(tc, rec, sizes, sport=44100 + sum(sizes))

    assert out.names == []
    assert out.changed()["sni_giveup_records"] == 1
    assert len(out.hello_samples()) >= 2


@pytest.mark.parametrize("sizes", [[9], [10], [80, 80], [40, 1, 1, 100]])
def test_split_hello_any_cut_after_the_headers_is_read(tc: Harness, sizes: list[int]) -> None:
    rec = make_hello(seed=7)

    out = _split(tc, rec, sizes, sport=44000 + sum(sizes))

    assert [n.name for n in out.names] == ["acme.my.salesforce.com"]
    assert tc.probes.table("lt_hello_bufs").__len__() == 0  # freed on completion


def test_split_hello_with_a_retransmitted_segment(tc: Harness) -> None:
    rec = make_hello(seed=6)
    a, b, c = rec[:100], rec[100:200], rec[200:]
    out = tc.run([tcp4(a, sport=45001, seq=1000), tcp4(b, sport=45001, seq=1100),
                  tcp4(b, sport=45001, seq=1100), tcp4(c, sport=45001, seq=1200)])

    assert [n.name for n in out.names] == ["acme.my.salesforce.com"]


def test_split_hello_with_a_hole_is_not_read_and_counted(tc: Harness) -> None:
    rec = make_hello(seed=6)
    out = tc.run([tcp4(rec[:100], sport=45002, seq=1000),
                  tcp4(rec[200:], sport=45002, seq=1200)])

    assert out.names == []
    assert out.changed().get("sni_giveup_gap", 0) == 1


def test_hello_over_several_records_is_not_read_and_counted(tc: Harness) -> None:
    multi = split_records(make_hello(seed=3), [1, 3, 50, 7])
    assert _user_name(multi) == "acme.my.salesforce.com"

    out = tc.run(tcp4(multi, sport=46001))

    assert out.names == []
    assert out.changed()["sni_giveup_records"] == 1
    assert len(out.hello_samples()) >= 1  # still named by user space through the ring


def test_hello_longer_than_the_buffer_is_counted(tc: Harness) -> None:
    rec = make_hello(pq_bytes=5000, seed=2)
    assert len(rec) > 4096 + 5 and _user_name(rec) == "acme.my.salesforce.com"

    out = _split(tc, rec, [MSS, MSS, MSS], sport=46002)

    assert out.names == []
    assert out.changed()["sni_giveup_too_long"] == 1
