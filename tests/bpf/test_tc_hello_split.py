"""A ClientHello split anywhere is still read (issue 11.3), through the real kernel program.

Splitting the hello into tiny TCP segments, or its handshake message over many
TLS records, is a known evasion of SNI inspection. Every frame goes through the
compiled TC (and XDP) program with BPF_PROG_TEST_RUN; the samples it delivers
are reassembled by the controller's HelloReassembler and must give the SNI,
with the kernel stopping exactly at the hello's end (nothing left pending,
the next segment not captured) and every give-up counted by reason.
"""

from __future__ import annotations

import random

import pytest

from leaktap.controller.kernel import abi
from leaktap.controller.kernel.ringbuf import Sample
from leaktap.controller.protocols.tls import HelloReassembler
from tests.bpf.harness import Harness
from tests.bpf.lt_frames import SNI, client_hello, segments, tcp4, tcp6

pytestmark = pytest.mark.kernel


@pytest.fixture
def tc(tc_ring: Harness) -> Harness:
    """Capture tests read the hello bytes from the ring: the build whose ring also
    carries the single-segment hellos the kernel names (tests/bpf/test_tc_hello_names.py
    covers the default build, which leaves those to lt_names)."""
    return tc_ring

LIMITS = abi.defines()
SEGS_MAX = LIMITS["LT_HELLO_SEGS_MAX"]
SEQ_MOD = 1 << 32
HELLO = client_hello(size=517)  # the size of a common browser hello
MSG = HELLO[5:]  # the handshake message alone
SECOND_FLIGHT = b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x20" + b"\xaa" * 32
SEEDS = [1, 7, 2026, 31337]


def records(msg: bytes, sizes: list[int]) -> bytes:
    """The handshake message over TLS records of the given sizes (the last takes the rest)."""
    return b"".join(
        b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece for _, piece in segments(msg, sizes)
    )


def sni_of(samples: list[Sample]) -> str | None:
    reassembler = HelloReassembler()
    found = None
    for s in samples:
        hello = reassembler.feed((s.src, s.sport, s.dst, s.dport), s.seq, s.data)
        if hello is not None:
            found = hello.sni
    return found


def send(h: Harness, stream: bytes, sizes: list[int], sport: int, isn: int = 1000,
         v6: bool = False) -> tuple[list[Sample], dict[str, int]]:
    """Send `stream` in segments of `sizes`, then the client's second flight."""
    frame = tcp6 if v6 else tcp4
    frames = [frame(piece, sport=sport, seq=(isn + off) % SEQ_MOD)
              for off, piece in segments(stream, sizes)]
    frames.append(frame(SECOND_FLIGHT, sport=sport, seq=(isn + len(stream)) % SEQ_MOD))
    out = h.run(frames)
    return out.hello_samples(), {k: v for k, v in out.stats.items() if v}


def covered(samples: list[Sample], isn: int) -> bytes:
    """The bytes the samples cover, from `isn` (gaps would raise)."""
    out = bytearray()
    for s in sorted(samples, key=lambda s: (s.seq - isn) % SEQ_MOD):
        off = (s.seq - isn) % SEQ_MOD
        assert off <= len(out), f"gap before offset {off}"
        out[off : off + len(s.data)] = s.data
    return bytes(out)


def assert_exact(h: Harness, samples: list[Sample], stream: bytes, stats: dict[str, int],
                 isn: int = 1000) -> None:
    """The SNI comes out, the kernel captured the hello and nothing after it, counted nothing."""
    assert sni_of(samples) == SNI
    assert covered(samples, isn) == stream
    assert not [k for k in stats if k.startswith("loss_")], stats
    assert len(h.probes.table("lt_hello").items()) == 0  # the end was known: nothing pending


def random_sizes(rng: random.Random, total: int, pieces: int) -> list[int]:
    cuts = sorted(rng.sample(range(1, total), pieces - 1))
    return [b - a for a, b in zip([0, *cuts], cuts, strict=False)]


@pytest.mark.parametrize("first", range(1, 65))
def test_every_first_segment_size_is_captured(tc, first):
    samples, stats = send(tc, HELLO, [first], sport=43000 + first)

    assert_exact(tc, samples, HELLO, stats)


@pytest.mark.parametrize("first", [1, 2, 3, 4, 5, 6, 7, 8])
def test_tiny_first_segment_then_tiny_segments(tc, first):
    # every header byte in its own segment, then the body in a few pieces
    sizes = [first] + [1] * (9 - first) + [100, 200]

    samples, stats = send(tc, HELLO, sizes, sport=43100 + first)

    assert_exact(tc, samples, HELLO, stats)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_segment_splits(tc, seed):
    rng = random.Random(seed)
    for i in range(24):
        pieces = rng.randint(2, SEGS_MAX)
        sizes = random_sizes(rng, len(HELLO), pieces)
        isn = rng.randrange(SEQ_MOD)  # crosses the sequence wrap now and then

        samples, stats = send(tc, HELLO, sizes, sport=44000 + seed % 500 * 24 + i, isn=isn)

        assert sni_of(samples) == SNI, (seed, sizes)
        assert_exact(tc, samples, HELLO, stats, isn=isn)


@pytest.mark.parametrize(
    "record_sizes",
    [[1], [2], [3], [4], [1, 1, 1, 1], [1, 2, 1], [3, 60], [40, 40, 40, 40, 40, 40], [100] * 5],
    ids=lambda s: "+".join(map(str, s)) + "+rest",
)
def test_record_layer_fragmentation_in_one_segment(tc, record_sizes):
    # the handshake header itself may be cut by record boundaries
    stream = records(MSG, record_sizes)

    samples, stats = send(tc, stream, [], sport=45000 + sum(record_sizes) + len(record_sizes))

    assert_exact(tc, samples, stream, stats)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_record_and_segment_splits(tc, seed):
    rng = random.Random(seed)
    for i in range(16):
        nrec = rng.randint(2, 12)
        stream = records(MSG, random_sizes(rng, len(MSG), nrec)[:-1])
        sizes = random_sizes(rng, len(stream), rng.randint(1, SEGS_MAX))[:-1]
        isn = rng.randrange(SEQ_MOD)

        samples, stats = send(tc, stream, sizes, sport=46000 + seed % 500 * 16 + i, isn=isn)

        assert sni_of(samples) == SNI, (seed, sizes)
        assert_exact(tc, samples, stream, stats, isn=isn)


def test_continuation_that_looks_like_a_hello_start_is_followed_not_restarted(tc):
    # A record boundary placed before a 0x01 byte makes a continuation segment open
    # with "16 03 01 LL LL 01 ..": it must be read as the next record, not a new hello.
    at = MSG.index(b"\x01", 10)
    stream = records(MSG, [at])
    sizes = [5 + at]  # the second segment starts exactly at the second record

    samples, stats = send(tc, stream, sizes, sport=45500)

    assert stream[5 + at : 5 + at + 6][5] == 1
    assert_exact(tc, samples, stream, stats)


def test_ipv6_split_hello(tc):
    samples, stats = send(tc, HELLO, [1, 6, 30], sport=45600, v6=True)

    assert_exact(tc, samples, HELLO, stats)


def test_too_many_records_in_one_segment_is_counted_and_still_read(tc):
    # more records in one segment than the kernel walks: the end is not known any
    # more, so the kernel keeps capturing up to its segment bound and counts why
    steps = LIMITS["LT_HELLO_WALK_STEPS"]
    stream = records(MSG, [2] * steps)
    assert len(stream) < 1400

    samples, stats = send(tc, stream, [], sport=45700)

    assert sni_of(samples) == SNI
    assert covered(samples, 1000)[: len(stream)] == stream
    assert stats.get("loss_hello_walk") == 1
    assert "loss_hello_segs" not in stats  # one give-up, counted once


def test_a_gap_in_the_hello_is_counted(tc):
    # a segment arrives past bytes the kernel never saw (lost or reordered)
    pieces = segments(HELLO, [3, 100])
    frames = [tcp4(p, sport=45800, seq=1000 + off) for off, p in pieces]

    out = tc.run([frames[0], frames[2], frames[1]])

    assert out.stats["loss_hello_gap"] == 1
    assert sni_of(out.hello_samples()) == SNI  # blind capture still took every segment


def test_first_byte_not_followed_by_tls_is_dropped_without_loss(tc):
    out = tc.run([tcp4(b"\x16", sport=45900, seq=1), tcp4(b"GET / HTTP/1.1\r\n", sport=45900,
                                                         seq=2)])

    assert [s.data for s in out.hello_samples()] == [b"\x16"]
    assert not [k for k, v in out.stats.items() if k.startswith("loss_") and v]
    assert len(tc.probes.table("lt_hello").items()) == 0


@pytest.mark.parametrize("first", range(1, 65))
def test_xdp_reads_the_split_hello_like_tc(xdp, first):
    samples, stats = send(xdp, HELLO, [first, 50], sport=47000 + first)

    assert_exact(xdp, samples, HELLO, stats)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_xdp_random_record_and_segment_splits(xdp, seed):
    rng = random.Random(seed)
    for i in range(8):
        stream = records(MSG, random_sizes(rng, len(MSG), rng.randint(2, 12))[:-1])
        sizes = random_sizes(rng, len(stream), rng.randint(1, SEGS_MAX))[:-1]

        samples, stats = send(xdp, stream, sizes, sport=47200 + seed % 100 * 8 + i)

        assert_exact(xdp, samples, stream, stats)


def test_xdp_reads_record_fragmentation(xdp):
    stream = records(MSG, [1, 2, 30])

    samples, stats = send(xdp, stream, [4, 9], sport=47100)

    assert_exact(xdp, samples, stream, stats)


def test_last_record_longer_than_the_hello_ends_at_the_message(tc):
    # the last record also carries the start of another handshake message: the
    # kernel stops at the hello's end, and user space completes it from there
    stream = records(MSG + b"\x0b\x00\x00\x02\xab\xcd", [200])
    hello_end = len(stream) - 6

    samples, stats = send(tc, stream, [150, 150], sport=45650)

    assert sni_of(samples) == SNI
    assert covered(samples, 1000) == stream[:hello_end]
    assert len(tc.probes.table("lt_hello").items()) == 0


def test_continuation_that_looks_like_a_whole_hello_is_not_taken_for_one(tc):
    # A record boundary right before the compression methods ("01 00" + the
    # extensions' length) makes the rest read like a whole, short ClientHello.
    sid_len = MSG[4 + 2 + 32]
    at = 4 + 2 + 32 + 1 + sid_len
    at += 2 + int.from_bytes(MSG[at : at + 2], "big")  # past the cipher suites
    assert MSG[at : at + 2] == b"\x01\x00"
    stream = records(MSG, [at])

    samples, stats = send(tc, stream, [5 + at], sport=45550)

    assert_exact(tc, samples, stream, stats)
