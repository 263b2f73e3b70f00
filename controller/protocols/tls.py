"""Bounded TLS ClientHello parsing and TCP reassembly of captured hello segments.

The kernel sends the first payload segments of a flow that start a TLS handshake
record (and the continuation segments) with their TCP sequence numbers.
`HelloReassembler` puts them back in order and `parse_client_hello` extracts the
server name. Every length field is checked against the bytes actually present:
hostile input yields ``None``, never an exception.

Wire layout of what the parser walks (RFC 8446 §4.1.2, RFC 5246 §6.2.1)::

    record:     type(1)=0x16 | version(2)=0x03xx | length(2) | fragment
    handshake:  msg_type(1)=0x01 | length(3) | ClientHello body
                (one handshake message may span several records)
    body:       legacy_version(2) random(32) session_id<0..32>
                cipher_suites<2..2^16-2> compression<1..2^8-1> extensions<0..2^16-1>
"""

from __future__ import annotations

import itertools
import logging
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

REC_HANDSHAKE = 0x16
HS_CLIENT_HELLO = 0x01
REC_HDR_LEN = 5
HS_HDR_LEN = 4
RANDOM_LEN = 32
SESSION_ID_MAX = 32
# Far above any real hello (a post-quantum Chrome hello is ~1.8 KB, ML-KEM-1024
# plus X25519 ~2.5 KB); also the reassembly bound per flow.
MAX_HELLO_BYTES = 16384
MAX_RECORD_LEN = 16384 + 2048  # RFC 8446 §5.2 TLSCiphertext bound; plaintext is 2^14

EXT_SERVER_NAME = 0x0000
EXT_ALPN = 0x0010
EXT_SUPPORTED_VERSIONS = 0x002B
EXT_ECH = 0xFE0D
SNI_HOST_NAME = 0
_U16X2 = struct.Struct("!HH").unpack_from
_PARSED_EXTS = frozenset((EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS, EXT_ECH))

# One label of a host name: LDH plus '_' (seen in real SNIs), 1..63 characters.
_HOSTNAME_RE = re.compile(
    r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
)
_HOSTNAME_MAX = 253


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What attribution needs from a ClientHello.

    sni: the host_name entry of server_name, lower case without trailing dot, or
        None when absent or not a valid host name (an IP literal such as
        "192.0.2.1" is syntactically a host name and is kept).
    sni_raw: the name as sent (non-printable bytes escaped, at most 255 bytes),
        also when `sni` is None because it was invalid; for logs and diagnosis.
    ech: an encrypted_client_hello extension is present (`sni` is the outer name).
    sslv2: an SSLv2-compatible hello (no extensions, hence never an SNI).
    """

    sni: str | None
    ech: bool
    alpn: tuple[str, ...]
    legacy_version: int
    supported_versions: tuple[int, ...]
    sni_raw: str | None = None
    sslv2: bool = False


def is_grease(value: int) -> bool:
    """RFC 8701 GREASE code points: 0x0A0A, 0x1A1A, ..., 0xFAFA."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


_HOSTNAME_BYTES_RE = re.compile(_HOSTNAME_RE.pattern.encode())


def normalize_host(raw: bytes) -> tuple[str | None, str]:
    """(valid lower-case host name or None, printable form of the raw bytes)."""
    name = raw.lower()
    if name.endswith(b"."):
        name = name[:-1]
    if 0 < len(name) <= _HOSTNAME_MAX and _HOSTNAME_BYTES_RE.fullmatch(name) is not None:
        return name.decode("ascii"), raw.decode("ascii")
    printable = "".join(chr(c) if 0x21 <= c <= 0x7E else f"\\x{c:02x}" for c in raw)
    return None, printable


# --- record layer ------------------------------------------------------------

NEED_MORE = 0
COMPLETE = 1
INVALID = 2


def _tls_record_version_ok(major: int, minor: int) -> bool:
    return major == 3 and minor <= 4


def collect_handshake(data: bytes) -> tuple[int, bytes | None, int]:
    """Gather the first handshake message from TLS records at the start of `data`.

    Returns (status, message, needed): COMPLETE with the handshake message
    (header included); NEED_MORE with the total stream length known to be needed
    so far; INVALID when the bytes are not a TLS handshake opening with a
    ClientHello. Handshake fragments may be spread over several records.
    """
    n = len(data)
    # Fast path: the whole hello in the first record (nearly every real client).
    if n >= REC_HDR_LEN + HS_HDR_LEN and data[0] == REC_HANDSHAKE and data[1] == 3 and data[2] <= 4:
        rlen = (data[3] << 8) | data[4]
        want = HS_HDR_LEN + ((data[6] << 16) | (data[7] << 8) | data[8])
        if data[5] != HS_CLIENT_HELLO or rlen == 0 or rlen > MAX_RECORD_LEN:
            return INVALID, None, 0
        if rlen >= HS_HDR_LEN and want > MAX_HELLO_BYTES:
            return INVALID, None, 0
        if HS_HDR_LEN <= want <= rlen:
            # The kernel stops capturing at the hello's end, not the record's.
            if REC_HDR_LEN + want <= n:
                return COMPLETE, data[REC_HDR_LEN : REC_HDR_LEN + want], REC_HDR_LEN + want
            return NEED_MORE, None, REC_HDR_LEN + want
    pos = 0
    msg = bytearray()
    want = -1  # handshake message length incl. header, once known
    while True:
        if pos + REC_HDR_LEN > n:
            return NEED_MORE, None, pos + REC_HDR_LEN
        ctype, major, minor = data[pos], data[pos + 1], data[pos + 2]
        rlen = (data[pos + 3] << 8) | data[pos + 4]
        if ctype != REC_HANDSHAKE or not _tls_record_version_ok(major, minor):
            return INVALID, None, 0
        if rlen == 0 or rlen > MAX_RECORD_LEN:
            return INVALID, None, 0
        if pos == 0 and rlen >= 1 and n > REC_HDR_LEN and data[REC_HDR_LEN] != HS_CLIENT_HELLO:
            return INVALID, None, 0
        end = pos + REC_HDR_LEN + rlen
        if end > n:
            # Parse what is there early so an obviously bad hello fails fast.
            return _early_check(data, pos, msg, want, end)
        msg += data[pos + REC_HDR_LEN : end]
        pos = end
        if want < 0 and len(msg) >= HS_HDR_LEN:
            if msg[0] != HS_CLIENT_HELLO:
                return INVALID, None, 0
            want = HS_HDR_LEN + ((msg[1] << 16) | (msg[2] << 8) | msg[3])
            if want > MAX_HELLO_BYTES:
                return INVALID, None, 0
        if want >= 0 and len(msg) >= want:
            # Bytes past the hello in the same record belong to later messages.
            return COMPLETE, bytes(msg[:want]), pos
        if pos > MAX_HELLO_BYTES + 64 * REC_HDR_LEN:
            return INVALID, None, 0


def _early_check(
    data: bytes, pos: int, msg: bytearray, want: int, end: int
) -> tuple[int, bytes | None, int]:
    partial = msg + data[pos + REC_HDR_LEN :]
    if want < 0 and len(partial) >= HS_HDR_LEN:
        if partial[0] != HS_CLIENT_HELLO:
            return INVALID, None, 0
        want = HS_HDR_LEN + ((partial[1] << 16) | (partial[2] << 8) | partial[3])
        if want > MAX_HELLO_BYTES:
            return INVALID, None, 0
    if 0 <= want <= len(partial):
        # The kernel stops at the message's end, also inside a longer last record
        # (a record may carry the next handshake message too).
        return COMPLETE, bytes(partial[:want]), len(data) - len(partial) + want
    if want >= 0:
        return NEED_MORE, None, min(end, pos + REC_HDR_LEN + want - len(msg))
    return NEED_MORE, None, end


# --- ClientHello body --------------------------------------------------------


def parse_handshake_message(msg: bytes) -> ClientHello | None:
    """Parse a bare handshake message (type, 3-byte length, body), as QUIC carries it."""
    try:
        return _parse_handshake(msg)
    except (IndexError, ValueError, UnicodeError):  # pragma: no cover - belt and braces
        logger.debug("ClientHello parser raised on %d bytes", len(msg), exc_info=True)
        return None


def parse_client_hello(record_bytes: bytes) -> ClientHello | None:
    """Parse a ClientHello from bytes starting with TLS record header(s).

    Also recognises an SSLv2-compatible hello (which carries no SNI). Anything
    incomplete, inconsistent or not a ClientHello gives None.
    """
    data = record_bytes if type(record_bytes) is bytes else bytes(record_bytes)
    if len(data) >= 3 and data[0] & 0x80 and data[2] == HS_CLIENT_HELLO:
        return _parse_sslv2(data)
    status, msg, _ = collect_handshake(data)
    if status != COMPLETE or msg is None:
        return None
    return parse_handshake_message(msg)


DTLS_REC_HDR_LEN = 13
DTLS_HS_HDR_LEN = 12


def parse_dtls_client_hello(datagrams: Iterable[bytes], max_bytes: int = MAX_HELLO_BYTES
                            ) -> ClientHello | None:
    """The first complete ClientHello in a flow's DTLS 1.0/1.2/1.3 datagrams.

    DTLS adds epoch/sequence to the record header, message_seq and fragment
    fields to the handshake header (a hello may be fragmented over datagrams),
    and a cookie after the session id (RFC 6347 §4.2.2, RFC 9147 §5.2); the
    reassembled body is then parsed as TLS.
    """
    frags: dict[int, tuple[int, dict[int, bytes]]] = {}  # message_seq -> (length, off -> data)
    for datagram in itertools.islice(datagrams, 32):
        d = bytes(datagram)
        pos = 0
        while pos + DTLS_REC_HDR_LEN <= len(d) and d[pos] == REC_HANDSHAKE and d[pos + 1] == 0xFE:
            rlen = int.from_bytes(d[pos + 11 : pos + 13], "big")
            rec = d[pos + DTLS_REC_HDR_LEN : pos + DTLS_REC_HDR_LEN + rlen]
            pos += DTLS_REC_HDR_LEN + rlen
            if len(rec) != rlen or rlen < DTLS_HS_HDR_LEN or rec[0] != HS_CLIENT_HELLO:
                continue
            length = int.from_bytes(rec[1:4], "big")
            mseq = int.from_bytes(rec[4:6], "big")
            off = int.from_bytes(rec[6:9], "big")
            flen = int.from_bytes(rec[9:12], "big")
            if length > max_bytes or off + flen > length or DTLS_HS_HDR_LEN + flen > rlen:
                continue
            known = frags.setdefault(mseq, (length, {}))
            if known[0] != length or len(frags) > 4:
                continue
            known[1].setdefault(off, rec[DTLS_HS_HDR_LEN : DTLS_HS_HDR_LEN + flen])
            body = _join_fragments(known[1])
            if len(body) >= length:
                return _parse_dtls_body(body[:length])
    return None


def _join_fragments(parts: dict[int, bytes]) -> bytes:
    out = bytearray()
    for off in sorted(parts):
        if off > len(out):
            break
        out += parts[off][len(out) - off :]
    return bytes(out)


def _parse_dtls_body(body: bytes) -> ClientHello | None:
    p = 2 + RANDOM_LEN
    if p + 1 > len(body):
        return None
    p += 1 + body[p]  # session id
    if p + 1 > len(body):
        return None
    body = body[:p] + body[p + 1 + body[p] :]  # drop the cookie: the rest is TLS
    return _parse_handshake(bytes([HS_CLIENT_HELLO]) + len(body).to_bytes(3, "big") + body, True)


def _parse_sslv2(data: bytes) -> ClientHello | None:
    """SSLv2 CLIENT-HELLO with a 2-byte header (RFC 6101 appendix E.2)."""
    length = ((data[0] & 0x7F) << 8) | data[1]
    if length < 9 or len(data) < 2 + length:
        return None
    version = (data[3] << 8) | data[4]
    cs_len = (data[5] << 8) | data[6]
    sid_len = (data[7] << 8) | data[8]
    ch_len = (data[9] << 8) | data[10] if length >= 11 else -1
    if ch_len < 0 or cs_len % 3 or 9 + cs_len + sid_len + ch_len != length:
        return None
    if data[3] not in (0, 2, 3):
        return None
    return ClientHello(
        sni=None, ech=False, alpn=(), legacy_version=version, supported_versions=(), sslv2=True
    )


def _parse_handshake(msg: bytes, dtls: bool = False) -> ClientHello | None:
    n = len(msg)
    if n < HS_HDR_LEN or msg[0] != HS_CLIENT_HELLO:
        return None
    body_len = (msg[1] << 16) | (msg[2] << 8) | msg[3]
    if body_len + HS_HDR_LEN != n or body_len > MAX_HELLO_BYTES:
        return None
    p = HS_HDR_LEN
    if p + 2 + RANDOM_LEN + 1 > n:
        return None
    legacy_version = (msg[p] << 8) | msg[p + 1]
    if msg[p] != (0xFE if dtls else 3):
        return None
    p += 2 + RANDOM_LEN
    sid_len = msg[p]
    if sid_len > SESSION_ID_MAX:
        return None
    p += 1 + sid_len
    if p + 2 > n:
        return None
    cs_len = (msg[p] << 8) | msg[p + 1]
    if cs_len < 2 or cs_len % 2:
        return None
    p += 2 + cs_len
    if p + 1 > n:
        return None
    comp_len = msg[p]
    if comp_len < 1:
        return None
    p += 1 + comp_len
    if p > n:
        return None
    if p == n:  # no extensions (SSLv3, early TLS)
        return ClientHello(None, False, (), legacy_version, ())
    if p + 2 > n:
        return None
    ext_total = (msg[p] << 8) | msg[p + 1]
    p += 2
    if p + ext_total != n:
        return None
    sni: str | None = None
    sni_raw: str | None = None
    ech = False
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    seen: set[int] = set()
    while p < n:
        if p + 4 > n:
            return None
        etype, elen = _U16X2(msg, p)
        p += 4
        end = p + elen
        if end > n:
            return None
        if etype not in _PARSED_EXTS:
            p = end
            continue
        if etype in seen:
            return None  # duplicate extension: servers reject such a hello
        seen.add(etype)
        if etype == EXT_SERVER_NAME:
            parsed = _parse_sni(msg, p, end)
            if parsed is None:
                return None
            sni, sni_raw = parsed
        elif etype == EXT_ALPN:
            alpn_parsed = _parse_alpn(msg, p, end)
            if alpn_parsed is None:
                return None
            alpn = alpn_parsed
        elif etype == EXT_SUPPORTED_VERSIONS:
            sv = _parse_versions(msg, p, end)
            if sv is None:
                return None
            versions = sv
        elif etype == EXT_ECH:
            ech = True
        p = end
    return ClientHello(sni, ech, alpn, legacy_version, versions, sni_raw)


def _parse_sni(msg: bytes, p: int, end: int) -> tuple[str | None, str | None] | None:
    """server_name extension body; None = malformed."""
    if end - p == 0:
        return None, None  # empty extension: what a server echoes, tolerated
    if p + 2 > end:
        return None
    list_len = (msg[p] << 8) | msg[p + 1]
    p += 2
    if p + list_len != end:
        return None
    name: str | None = None
    raw: str | None = None
    while p < end:
        if p + 3 > end:
            return None
        ntype = msg[p]
        nlen = (msg[p + 1] << 8) | msg[p + 2]
        p += 3
        if p + nlen > end:
            return None
        if ntype == SNI_HOST_NAME and raw is None:
            name, raw = normalize_host(msg[p : p + nlen][:255])
        p += nlen
    return name, raw


def _parse_alpn(msg: bytes, p: int, end: int) -> tuple[str, ...] | None:
    if p + 2 > end:
        return None
    list_len = (msg[p] << 8) | msg[p + 1]
    p += 2
    if p + list_len != end:
        return None
    out: list[str] = []
    while p < end:
        plen = msg[p]
        p += 1
        if plen == 0 or p + plen > end:
            return None
        out.append(msg[p : p + plen].decode("ascii", "backslashreplace"))
        p += plen
    return tuple(out)


def _parse_versions(msg: bytes, p: int, end: int) -> tuple[int, ...] | None:
    if p + 1 > end:
        return None
    vlen = msg[p]
    p += 1
    if p + vlen != end or vlen % 2:
        return None
    vals = [(msg[i] << 8) | msg[i + 1] for i in range(p, end, 2)]
    return tuple(v for v in vals if not is_grease(v))


def looks_like_tls_handshake(payload: bytes) -> bool:
    """The kernel's capture trigger: a handshake record header (0x16 0x03)."""
    return len(payload) >= 2 and payload[0] == REC_HANDSHAKE and payload[1] == 0x03


def looks_like_sslv2_hello(payload: bytes) -> bool:
    """An SSLv2-compatible CLIENT-HELLO: 2-byte header with the high bit, msg type 1,
    version 0x0002 or 0x03xx (RFC 5246 appendix E.2)."""
    return (
        len(payload) >= 5
        and payload[0] & 0x80 != 0
        and payload[2] == HS_CLIENT_HELLO
        and (payload[3] == 3 or (payload[3] == 0 and payload[4] == 2))
    )


def hello_status(stream: bytes) -> tuple[int, ClientHello | None, int]:
    """(NEED_MORE | COMPLETE | INVALID, hello, bytes known to be needed) for a
    stream that starts a hello."""
    if looks_like_sslv2_hello(stream):
        need = 2 + (((stream[0] & 0x7F) << 8) | stream[1])
        if len(stream) < need:
            return NEED_MORE, None, need
        hello = _parse_sslv2(stream[:need])
        return (COMPLETE, hello, need) if hello is not None else (INVALID, None, 0)
    status, msg, needed = collect_handshake(stream)
    if status == COMPLETE and msg is not None:
        hello = parse_handshake_message(msg)
        return (COMPLETE, hello, needed) if hello is not None else (INVALID, None, 0)
    return status, None, needed


# --- TCP reassembly -----------------------------------------------------------

SEQ_MOD = 1 << 32


@dataclass(slots=True)
class ReassemblyStats:
    """Monotonic counters; the controller exports them and logs deltas."""

    completed: int = 0
    not_tls: int = 0  # stream is not a TLS ClientHello (or malformed)
    gave_up_bytes: int = 0  # hello larger than max_bytes
    gave_up_segments: int = 0  # more than max_segments without completing
    evicted: int = 0  # pending flow pushed out by max_flows (LRU)
    expired: int = 0  # pending flow older than max_age
    ignored: int = 0  # segment for a flow already finished


@dataclass(slots=True)
class _Pending:
    created: float
    base: int | None = None  # stream offset 0 = this sequence number
    segs: list[tuple[int, bytes]] = field(default_factory=list)  # (seq, data)
    nsegs: int = 0
    buf: bytes = b""  # contiguous bytes from base
    need: int = 0  # stream length known to be needed before a parse can succeed


class HelloReassembler:
    """Reassemble a ClientHello from captured TCP segments, bounded per flow and overall.

    `feed` takes segments as the kernel captured them, in any order, with
    retransmissions and overlaps. A SYN carrying data (TCP Fast Open) has
    sequence number ISN and its data starts at ISN+1. The stream starts at the
    lowest-sequence segment that opens a TLS handshake record, which is also how
    STARTTLS-style upgrades are captured (the hello follows plaintext).
    """

    def __init__(
        self,
        max_bytes: int = MAX_HELLO_BYTES,
        max_segments: int = 32,
        max_flows: int = 4096,
        max_age: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < REC_HDR_LEN or max_segments < 1 or max_flows < 1 or max_age <= 0:
            raise ValueError("HelloReassembler bounds must be positive")
        self.max_bytes = max_bytes
        self.max_segments = max_segments
        self.max_flows = max_flows
        self.max_age = max_age
        self._clock = clock
        self._pending: OrderedDict[Hashable, _Pending] = OrderedDict()
        self._done: OrderedDict[Hashable, None] = OrderedDict()
        self.stats = ReassemblyStats()

    def __len__(self) -> int:
        return len(self._pending)

    def feed(self, flow_key: Hashable, tcp_seq: int, payload: bytes, syn: bool = False
             ) -> ClientHello | None:
        """Add one segment; returns the ClientHello when it becomes complete, once per flow."""
        if not payload:
            return None
        if flow_key in self._done:
            self.stats.ignored += 1
            return None
        seq = (tcp_seq + 1 if syn else tcp_seq) % SEQ_MOD
        now = self._clock()
        self._expire(now)
        st = self._pending.get(flow_key)
        if st is None:
            st = _Pending(created=now)
            self._pending[flow_key] = st
            while len(self._pending) > self.max_flows:
                self._pending.popitem(last=False)
                self.stats.evicted += 1
        st.nsegs += 1
        if st.nsegs > self.max_segments:
            self._finish(flow_key, "gave_up_segments")
            return None
        data = bytes(payload[: self.max_bytes])
        if _may_start_hello(data) and (st.base is None or _seq_before(seq, st.base)):
            st.base = seq
            st.buf = b""
            st.need = 0
        st.segs.append((seq, data))
        if st.base is None:
            return None
        st.buf = self._contiguous(st)
        if len(st.buf) < st.need:
            return None  # known to be incomplete: skip the parse
        status, hello, st.need = hello_status(st.buf)
        if status == COMPLETE and hello is not None:
            self._finish(flow_key, "completed")
            return hello
        if status == INVALID:
            self._finish(flow_key, "not_tls")
            return None
        if len(st.buf) >= self.max_bytes:
            self._finish(flow_key, "gave_up_bytes")
            return None
        return None

    def _contiguous(self, st: _Pending) -> bytes:
        """Bytes from base up to the first gap; earlier data wins on overlap."""
        assert st.base is not None
        base = st.base
        if len(st.segs) == 1 and st.segs[0][0] == base:
            return st.segs[0][1]
        pieces: list[tuple[int, bytes]] = []
        for seq, data in st.segs:
            off = (seq - base) % SEQ_MOD
            if off >= SEQ_MOD // 2:  # before the stream start (plaintext, SYN)
                cut = SEQ_MOD - off
                if cut >= len(data):
                    continue
                data, off = data[cut:], 0
            if off < self.max_bytes:
                pieces.append((off, data))
        pieces.sort(key=lambda x: x[0])
        out = bytearray()
        for off, data in pieces:
            if off > len(out):
                break
            if off + len(data) > len(out):
                out += data[len(out) - off :]
            if len(out) >= self.max_bytes:
                break
        return bytes(out[: self.max_bytes])

    def _finish(self, flow_key: Hashable, outcome: str) -> None:
        self._pending.pop(flow_key, None)
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        if outcome != "completed":
            logger.debug("ClientHello reassembly for %r ended: %s", flow_key, outcome)
        self._done[flow_key] = None
        while len(self._done) > self.max_flows:
            self._done.popitem(last=False)

    def _expire(self, now: float) -> None:
        while self._pending:
            key, st = next(iter(self._pending.items()))
            if now - st.created < self.max_age:
                break
            self._pending.popitem(last=False)
            self.stats.expired += 1

    def forget(self, flow_key: Hashable) -> None:
        """Drop all state for a flow (e.g. when the kernel reports it closed)."""
        self._pending.pop(flow_key, None)
        self._done.pop(flow_key, None)


def _may_start_hello(data: bytes) -> bool:
    # A first segment cut after the content type cannot show the version byte.
    return (
        looks_like_tls_handshake(data)
        or (len(data) == 1 and data[0] == REC_HANDSHAKE)
        or looks_like_sslv2_hello(data)
    )


def _seq_before(a: int, b: int) -> bool:
    """RFC 1982 serial comparison: a precedes b."""
    return a != b and ((b - a) % SEQ_MOD) < SEQ_MOD // 2
