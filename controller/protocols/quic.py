"""ClientHello from QUIC v1/v2 client Initial packets (RFC 9000, 9001, 9369).

Initial packets are encrypted with keys anyone can derive from the Destination
Connection ID of the client's first Initial, so user space can read the TLS
ClientHello carried in their CRYPTO frames and name HTTP/3 egress like TCP TLS.

Long header Initial (RFC 9000 §17.2.2)::

    flags(1) | version(4) | dcid_len(1) dcid | scid_len(1) scid |
    token_len(varint) token | length(varint) | packet_number(1..4) | payload
    (`length` covers packet number and payload; header protection hides the low
    flag bits and the packet number; several packets may share one datagram)

Bounded throughout: no field is trusted, hostile datagrams give None.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from leaktap.controller.protocols.initial_aead import aes128_encrypt_block, aes128_gcm_open
from leaktap.controller.protocols.tls import (
    HS_CLIENT_HELLO,
    HS_HDR_LEN,
    ClientHello,
    normalize_host,
    parse_handshake_message,
)

logger = logging.getLogger(__name__)

QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF
MAX_CID_LEN = 20
MAX_CRYPTO_BYTES = 16384
AEAD_TAG_LEN = 16
SAMPLE_LEN = 16
_NONZERO = re.compile(rb"[^\x00]")


@dataclass(frozen=True, slots=True)
class _VersionParams:
    salt: bytes
    key_label: bytes
    iv_label: bytes
    hp_label: bytes
    initial_type: int  # long-header packet type bits of Initial


_V1_LABELS = (b"quic key", b"quic iv", b"quic hp")
_V2_LABELS = (b"quicv2 key", b"quicv2 iv", b"quicv2 hp")
_SALT_V1 = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")
_SALT_V2 = bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9")
_SALT_D29 = bytes.fromhex("afbfec289993d24c9e9786f19c6111e04390a899")  # drafts 29-32
_SALT_D23 = bytes.fromhex("c3eef712c72ebb5a11a7d2432bb46365bef9f502")  # drafts 23-28


def _version_params(version: int) -> _VersionParams | None:
    if version == QUIC_V1:
        return _VersionParams(_SALT_V1, *_V1_LABELS, initial_type=0)
    if version == QUIC_V2:
        return _VersionParams(_SALT_V2, *_V2_LABELS, initial_type=1)
    if version >> 8 == 0xFF0000:  # IETF drafts, still seen from old stacks
        draft = version & 0xFF
        if 29 <= draft <= 32:
            return _VersionParams(_SALT_D29, *_V1_LABELS, initial_type=0)
        if 23 <= draft <= 28:
            return _VersionParams(_SALT_D23, *_V1_LABELS, initial_type=0)
    return None


_PARAMS = {v: p for v in (QUIC_V1, QUIC_V2, *range(0xFF000017, 0xFF000021))
           if (p := _version_params(v)) is not None}


def _hkdf_expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """TLS 1.3 HKDF-Expand-Label with an empty context (length <= 32: one HMAC block)."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return hmac.new(secret, info + b"\x01", hashlib.sha256).digest()[:length]


@dataclass(frozen=True, slots=True)
class InitialKeys:
    """Client Initial packet protection keys (AES-128-GCM)."""

    key: bytes
    iv: bytes
    hp_key: bytes


def client_initial_keys(dcid: bytes, version: int) -> InitialKeys | None:
    """Derive the client's Initial keys from the first Initial's DCID (RFC 9001 §5.2)."""
    params = _PARAMS.get(version)
    if params is None:
        return None
    initial_secret = hmac.new(params.salt, dcid, hashlib.sha256).digest()
    client_secret = _hkdf_expand_label(initial_secret, b"client in", 32)
    key = _hkdf_expand_label(client_secret, params.key_label, 16)
    iv = _hkdf_expand_label(client_secret, params.iv_label, 12)
    hp = _hkdf_expand_label(client_secret, params.hp_label, 16)
    return InitialKeys(key, iv, hp)


def _varint(buf: bytes, p: int, end: int) -> tuple[int, int] | None:
    """RFC 9000 §16 variable-length integer at p -> (value, next offset)."""
    if p >= end:
        return None
    first = buf[p]
    n = 1 << (first >> 6)
    if p + n > end:
        return None
    v = first & 0x3F
    for i in range(1, n):
        v = (v << 8) | buf[p + i]
    return v, p + n


@dataclass(frozen=True, slots=True)
class InitialPacket:
    """A long-header packet's outer fields; `end` is where the next coalesced packet starts."""

    start: int
    version: int
    dcid: bytes
    scid: bytes
    is_initial: bool
    pn_offset: int
    end: int


def parse_long_header(dgram: bytes, start: int = 0) -> InitialPacket | None:
    """Outer (unprotected) fields of the long-header packet at `start`, or None."""
    n = len(dgram)
    p = start
    if p + 7 > n or not dgram[p] & 0x80:
        return None
    first = dgram[p]
    version = int.from_bytes(dgram[p + 1 : p + 5], "big")
    p += 5
    dlen = dgram[p]
    if dlen > MAX_CID_LEN or p + 1 + dlen + 1 > n:
        return None
    dcid = dgram[p + 1 : p + 1 + dlen]
    p += 1 + dlen
    slen = dgram[p]
    if slen > MAX_CID_LEN or p + 1 + slen > n:
        return None
    scid = dgram[p + 1 : p + 1 + slen]
    p += 1 + slen
    params = _PARAMS.get(version)
    if params is None:
        return None  # version negotiation or unknown version: not decodable
    ptype = (first >> 4) & 0x03
    is_initial = ptype == params.initial_type
    retry_type = 0 if version == QUIC_V2 else 3
    if ptype == retry_type:
        return None  # Retry has no length field; it also ends the datagram
    if is_initial:
        tok = _varint(dgram, p, n)
        if tok is None or tok[1] + tok[0] > n:
            return None
        p = tok[1] + tok[0]
    ln = _varint(dgram, p, n)
    if ln is None:
        return None
    length, p = ln
    if p + length > n or length < 4 + SAMPLE_LEN:
        return None
    return InitialPacket(start, version, dcid, scid, is_initial, p, p + length)


def iter_crypto_frames(payload: bytes) -> list[tuple[int, bytes]] | None:
    """CRYPTO frames (offset, data) of a decrypted Initial payload.

    Only frames allowed in an Initial (PADDING, PING, ACK, CRYPTO,
    CONNECTION_CLOSE) are expected; anything else makes the payload invalid.
    """
    out: list[tuple[int, bytes]] = []
    n = len(payload)
    p = 0
    while p < n:
        ftype = payload[p]
        if ftype == 0x00:  # PADDING: skip the run at once
            m = _NONZERO.search(payload, p)
            p = m.start() if m is not None else n
            continue
        p += 1
        if ftype == 0x01:  # PING
            continue
        if ftype in (0x02, 0x03):  # ACK, ACK_ECN
            p = _skip_ack(payload, p, n, ftype == 0x03)
            if p < 0:
                return None
            continue
        if ftype == 0x06:  # CRYPTO
            off = _varint(payload, p, n)
            if off is None:
                return None
            ln = _varint(payload, off[1], n)
            if ln is None or ln[1] + ln[0] > n:
                return None
            out.append((off[0], payload[ln[1] : ln[1] + ln[0]]))
            p = ln[1] + ln[0]
            continue
        if ftype == 0x1C:  # CONNECTION_CLOSE (transport): code, frame type, reason
            vals: list[int] = []
            for _ in range(3):
                v = _varint(payload, p, n)
                if v is None:
                    return None
                vals.append(v[0])
                p = v[1]
            if p + vals[2] > n:
                return None
            p += vals[2]
            continue
        return None
    return out


def _skip_ack(buf: bytes, p: int, n: int, ecn: bool) -> int:
    fields = 4  # largest, delay, range count, first range
    vals: list[int] = []
    for _ in range(fields):
        v = _varint(buf, p, n)
        if v is None:
            return -1
        vals.append(v[0])
        p = v[1]
    count = vals[2]
    if count > n:  # each range needs at least two bytes
        return -1
    for _ in range(2 * count + (3 if ecn else 0)):
        v = _varint(buf, p, n)
        if v is None:
            return -1
        p = v[1]
    return p


def parse_gquic_chlo(dgram: bytes) -> ClientHello | None:
    """SNI of a Google QUIC (Q043..Q050) client hello, sent in plaintext as a CHLO message.

    CHLO: tag "CHLO" | num_entries(2, LE) | pad(2) | num_entries x (tag(4), end(4, LE)) | values
    """
    if len(dgram) < 9 or dgram[1:3] != b"Q0" or not dgram[0] & 0x80:
        return None
    i = dgram.find(b"CHLO", 5, 160)  # within the first frame of the first packet
    if i < 0 or i + 8 > len(dgram):
        return None
    count = int.from_bytes(dgram[i + 4 : i + 6], "little")
    table = i + 8
    values = table + 8 * count
    if count > 64 or values > len(dgram):
        return None
    prev = 0
    sni: str | None = None
    raw: str | None = None
    for k in range(count):
        tag = dgram[table + 8 * k : table + 8 * k + 4]
        end = int.from_bytes(dgram[table + 8 * k + 4 : table + 8 * k + 8], "little")
        if end < prev or values + end > len(dgram):
            return None
        if tag == b"SNI\x00":
            sni, raw = normalize_host(dgram[values + prev : values + end][:255])
        prev = end
    version = int(dgram[3:5].decode("ascii")) if dgram[3:5].isdigit() else 0
    return ClientHello(sni, False, (), version, (), raw)


@dataclass(slots=True)
class QuicStats:
    """Monotonic counters; the controller exports them and logs deltas."""

    completed: int = 0
    gquic: int = 0  # of which Google QUIC CHLOs
    not_initial: int = 0  # datagram without a decodable client Initial
    decrypt_failed: int = 0
    bad_frames: int = 0
    not_client_hello: int = 0  # CRYPTO stream is not a ClientHello
    gave_up_bytes: int = 0
    gave_up_datagrams: int = 0
    evicted: int = 0
    expired: int = 0
    ignored: int = 0


@dataclass(slots=True)
class _Flow:
    created: float
    first_dcid: bytes | None = None
    version: int = 0
    chunks: dict[int, bytes] = field(default_factory=dict)
    datagrams: int = 0


class QuicHelloAssembler:
    """Collect CRYPTO data from a flow's client Initials until the ClientHello is complete."""

    def __init__(
        self,
        max_bytes: int = MAX_CRYPTO_BYTES,
        max_datagrams: int = 16,
        max_flows: int = 4096,
        max_age: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        key_cache: int = 256,
    ) -> None:
        if max_bytes < HS_HDR_LEN or max_datagrams < 1 or max_flows < 1 or max_age <= 0:
            raise ValueError("QuicHelloAssembler bounds must be positive")
        self.max_bytes = max_bytes
        self.max_datagrams = max_datagrams
        self.max_flows = max_flows
        self.max_age = max_age
        self._clock = clock
        self._flows: OrderedDict[Hashable, _Flow] = OrderedDict()
        self._done: OrderedDict[Hashable, None] = OrderedDict()
        self._keys: OrderedDict[tuple[bytes, int], InitialKeys | None] = OrderedDict()
        self._key_cache = key_cache
        self.stats = QuicStats()

    def __len__(self) -> int:
        return len(self._flows)

    def feed(self, flow_key: Hashable, udp_payload: bytes) -> ClientHello | None:
        """Add one client datagram; returns the ClientHello once it is complete."""
        if flow_key in self._done:
            self.stats.ignored += 1
            return None
        data = bytes(udp_payload)
        pkts = self._initials(data)
        if not pkts:
            chlo = parse_gquic_chlo(data) if data[1:3] == b"Q0" else None
            if chlo is not None:
                self.stats.gquic += 1
                self._finish(flow_key, "completed")
                return chlo
            self.stats.not_initial += 1
            return None
        now = self._clock()
        self._expire(now)
        fl = self._flows.get(flow_key)
        if fl is None:
            fl = _Flow(created=now)
            self._flows[flow_key] = fl
            while len(self._flows) > self.max_flows:
                self._flows.popitem(last=False)
                self.stats.evicted += 1
        fl.datagrams += 1
        if fl.datagrams > self.max_datagrams:
            self._finish(flow_key, "gave_up_datagrams")
            return None
        for pkt in pkts:
            payload = self._decrypt(fl, data, pkt)
            if payload is None:
                self.stats.decrypt_failed += 1
                continue
            frames = iter_crypto_frames(payload)
            if frames is None:
                self.stats.bad_frames += 1
                continue
            for off, chunk in frames:
                if off + len(chunk) > self.max_bytes:
                    self._finish(flow_key, "gave_up_bytes")
                    return None
                prev = fl.chunks.get(off)
                if prev is None or len(chunk) > len(prev):
                    fl.chunks[off] = chunk
        return self._try_complete(flow_key, fl)

    def _initials(self, data: bytes) -> list[InitialPacket]:
        out: list[InitialPacket] = []
        start = 0
        while start < len(data) and len(out) < 8:
            pkt = parse_long_header(data, start)
            if pkt is None:
                break
            if pkt.is_initial:
                out.append(pkt)
            start = pkt.end
        return out

    def _keys_for(self, dcid: bytes, version: int) -> InitialKeys | None:
        k = (dcid, version)
        if k in self._keys:
            self._keys.move_to_end(k)
            return self._keys[k]
        keys = client_initial_keys(dcid, version)
        self._keys[k] = keys
        while len(self._keys) > self._key_cache:
            self._keys.popitem(last=False)
        return keys

    def _decrypt(self, fl: _Flow, data: bytes, pkt: InitialPacket) -> bytes | None:
        # Keys come from the DCID of the client's first Initial (after a Retry,
        # from the new one): try the packet's own DCID, then the flow's first.
        candidates = [pkt.dcid]
        if fl.first_dcid is not None and fl.first_dcid != pkt.dcid:
            candidates.append(fl.first_dcid)
        for dcid in candidates:
            keys = self._keys_for(dcid, pkt.version)
            if keys is None:
                return None
            plain = decrypt_initial(data, pkt, keys)
            if plain is not None:
                if fl.first_dcid is None:
                    fl.first_dcid = dcid
                    fl.version = pkt.version
                return plain
        return None

    def _try_complete(self, flow_key: Hashable, fl: _Flow) -> ClientHello | None:
        buf = _contiguous(fl.chunks, self.max_bytes)
        if len(buf) >= 1 and buf[0] != HS_CLIENT_HELLO:
            self._finish(flow_key, "not_client_hello")
            return None
        if len(buf) < HS_HDR_LEN:
            return None
        want = HS_HDR_LEN + int.from_bytes(buf[1:4], "big")
        if want > self.max_bytes:
            self._finish(flow_key, "gave_up_bytes")
            return None
        if len(buf) < want:
            return None
        hello = parse_handshake_message(buf[:want])
        if hello is None:
            self._finish(flow_key, "not_client_hello")
            return None
        self._finish(flow_key, "completed")
        return hello

    def _finish(self, flow_key: Hashable, outcome: str) -> None:
        self._flows.pop(flow_key, None)
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        if outcome != "completed":
            logger.debug("QUIC ClientHello for %r ended: %s", flow_key, outcome)
        self._done[flow_key] = None
        while len(self._done) > self.max_flows:
            self._done.popitem(last=False)

    def _expire(self, now: float) -> None:
        while self._flows:
            _key, fl = next(iter(self._flows.items()))
            if now - fl.created < self.max_age:
                break
            self._flows.popitem(last=False)
            self.stats.expired += 1

    def forget(self, flow_key: Hashable) -> None:
        """Drop all state for a flow."""
        self._flows.pop(flow_key, None)
        self._done.pop(flow_key, None)


def _contiguous(chunks: dict[int, bytes], limit: int) -> bytes:
    out = bytearray()
    for off in sorted(chunks):
        if off > len(out):
            break
        data = chunks[off]
        if off + len(data) > len(out):
            out += data[len(out) - off :]
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def decrypt_initial(dgram: bytes, pkt: InitialPacket, keys: InitialKeys) -> bytes | None:
    """Remove header protection and decrypt the payload; None when the keys do not fit."""
    start = pkt.start
    pn_off = pkt.pn_offset
    sample = dgram[pn_off + 4 : pn_off + 4 + SAMPLE_LEN]
    if len(sample) < SAMPLE_LEN:
        return None
    mask = aes128_encrypt_block(keys.hp_key, sample)
    first = dgram[start] ^ (mask[0] & 0x0F)
    pn_len = (first & 0x03) + 1
    rel = pn_off - start
    header = bytearray(dgram[start : pn_off + pn_len])
    header[0] = first
    pn = 0
    for i in range(pn_len):
        header[rel + i] ^= mask[1 + i]
        pn = (pn << 8) | header[rel + i]
    nonce = (int.from_bytes(keys.iv, "big") ^ pn).to_bytes(12, "big")
    ciphertext = dgram[pn_off + pn_len : pkt.end]
    if len(ciphertext) < AEAD_TAG_LEN:
        return None
    return aes128_gcm_open(keys.key, nonce, ciphertext, bytes(header))
