"""Every decoded form of a message body that a value could hide in.

`decoded_views(body, headers)` returns the body as sent plus each decoding that
applies: Content-Encoding (gzip, deflate, br, zstd; also recognised by magic
bytes when the header is unknown), multipart parts (with their own transfer
encodings), nested URL-encoding, JSON string unescaping (\\uXXXX included), hex,
UTF-16, and base64 whose lines are broken. Canary and fingerprint matchers run
over every view. Everything is bounded: decompression stops at an absolute size
and at a ratio to its input (a decompression bomb is reported, never expanded),
transforms nest at most `DecodeLimits.depth` deep and the views together hold at
most `DecodeLimits.total_bytes`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import quopri
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

import brotli
import zstandard

_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# runs are found with translate + find (memmem): a character-class regex costs
# ~25x more per byte of ordinary text
_HEX_CHARS = b"0123456789abcdefABCDEF"
_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-"
RUN_MIN = 24
_JSON_STRING = re.compile(rb'"((?:[^"\\\r\n]|\\.){0,65536})"')
_BOUNDARY = re.compile(r'boundary="?([^";,]{1,200})"?', re.I)
_URL_ESCAPE = re.compile(rb"%[0-9a-fA-F]{2}")
URL_DEPTH = 3


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Bounds of one body's decoding (plaintext.decode_* in the config)."""

    max_output_bytes: int = 8 << 20  # one decompression, absolute
    max_ratio: int = 200  # one decompression, output / input
    total_bytes: int = 16 << 20  # all views of one body together
    depth: int = 3  # transforms applied on top of each other


@dataclass(frozen=True, slots=True)
class View:
    name: str  # how it was reached, e.g. "gzip>json" (never content)
    data: bytes


@dataclass(slots=True)
class Views:
    """The views of one body and what could not be decoded (by reason, no content)."""

    views: list[View] = field(default_factory=list)
    content: bytes | None = None  # the body with Content-Encoding undone (None: could not)
    bombs: list[str] = field(default_factory=list)  # codings that hit a limit
    errors: list[str] = field(default_factory=list)  # codings that failed to decode
    total_bytes: int = 0
    truncated: bool = False  # total_bytes reached: later views were not made

    def __iter__(self) -> Iterator[View]:
        return iter(self.views)


class Bomb(Exception):
    """A decompression past the limits."""


def _cap(n_in: int, limits: DecodeLimits) -> int:
    return min(limits.max_output_bytes, max(n_in, 1024) * limits.max_ratio)


def _zlib(data: bytes, wbits: int, cap: int) -> bytes:
    d = zlib.decompressobj(wbits)
    out = d.decompress(data, cap + 1)
    if len(out) > cap or (d.unconsumed_tail and len(out) >= cap):
        raise Bomb
    return out


def _brotli(data: bytes, cap: int) -> bytes:
    d = brotli.Decompressor()
    out: bytes = d.process(data, output_buffer_limit=cap + 1)
    if len(out) > cap or (not d.is_finished() and not d.can_accept_more_data()):
        raise Bomb
    return out


def _zstd(data: bytes, cap: int) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    out: bytes = reader.read(cap + 1)
    if len(out) > cap:
        raise Bomb
    return out


def decompress(coding: str, data: bytes, limits: DecodeLimits) -> bytes:
    """One Content-Encoding undone; raises Bomb past the limits, ValueError when broken."""
    cap = _cap(len(data), limits)
    try:
        if coding in ("gzip", "x-gzip"):
            return _zlib(data, 16 + zlib.MAX_WBITS, cap)
        if coding == "deflate":  # RFC 9110: zlib-wrapped; raw deflate is common too
            try:
                return _zlib(data, zlib.MAX_WBITS, cap)
            except zlib.error:
                return _zlib(data, -zlib.MAX_WBITS, cap)
        if coding == "br":
            return _brotli(data, cap)
        if coding == "zstd":
            return _zstd(data, cap)
    except Bomb:
        raise
    except Exception as e:  # noqa: BLE001 - each codec raises its own error type
        raise ValueError(f"{coding}: {type(e).__name__}") from e
    raise ValueError(f"{coding}: unsupported")


ZSTD_SLICE = 64  # zstd input fed per call: bounds what one call can expand to


class StreamDecoder:
    """One Content-Encoding undone across a body's windows, in order.

    Bounded by the ratio only (a long legitimate upload may decompress to more
    than `max_output_bytes` in total); each call's output is capped by it.
    """

    def __init__(self, coding: str, limits: DecodeLimits) -> None:
        if coding not in ("gzip", "x-gzip", "deflate", "br", "zstd"):
            raise ValueError(f"{coding}: unsupported")
        self.coding = coding
        self.limits = limits
        self.n_in = self.n_out = 0
        self._zlib: Any = None
        self._br: Any = brotli.Decompressor() if coding == "br" else None
        self._zstd: Any = (zstandard.ZstdDecompressor().decompressobj()
                           if coding == "zstd" else None)
        if coding in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> bytes:
        """Decoded bytes for the next raw bytes; raises Bomb past the ratio, ValueError
        when the stream is broken."""
        self.n_in += len(data)
        cap = min(max(self.n_in, 1024) * self.limits.max_ratio - self.n_out,
                  self.limits.max_output_bytes)
        if cap <= 0:
            raise Bomb
        try:
            out = self._feed(data, cap)
        except Bomb:
            raise
        except Exception as e:  # noqa: BLE001 - each codec raises its own error type
            raise ValueError(f"{self.coding}: {type(e).__name__}") from e
        self.n_out += len(out)
        return out

    def _feed(self, data: bytes, cap: int) -> bytes:
        if self.coding == "deflate" and self._zlib is None and data:
            zlib_header = len(data) > 1 and data[0] & 0x0F == 8 and (
                (data[0] << 8) | data[1]) % 31 == 0
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
        if self._zlib is not None:
            out: bytes = self._zlib.decompress(data, cap + 1)
            if len(out) > cap or self._zlib.unconsumed_tail:
                raise Bomb
            return out
        if self._br is not None:
            out = self._br.process(data, output_buffer_limit=cap + 1)
            if len(out) > cap:
                raise Bomb
            return out
        parts: list[bytes] = []
        total = 0
        for i in range(0, len(data), ZSTD_SLICE):
            part: bytes = self._zstd.decompress(data[i : i + ZSTD_SLICE])
            total += len(part)
            if total > cap:
                raise Bomb
            parts.append(part)
        return b"".join(parts)


def _header(headers: Iterable[tuple[str, str]], name: str) -> str:
    """The first value of `name` (lower case); the parsers give lower-case names."""
    headers = headers if isinstance(headers, list | tuple) else list(headers)
    for k, v in headers:
        if k == name:
            return v
    for k, v in headers:
        if k.lower() == name:
            return v
    return ""


def _sniffed_coding(data: bytes) -> str | None:
    if data.startswith(_GZIP_MAGIC):
        return "gzip"
    if data.startswith(_ZSTD_MAGIC):
        return "zstd"
    return None


def multipart_parts(data: bytes, content_type: str) -> list[tuple[bytes, list[tuple[str, str]]]]:
    """(body, lower-case headers) of each part of a multipart body."""
    m = _BOUNDARY.search(content_type)
    if m is None:
        return []
    delimiter = b"--" + m.group(1).encode("latin-1")
    parts = []
    for raw in data.split(delimiter)[1:]:
        if raw.startswith(b"--"):
            break
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not sep:
            head, sep, body = raw.partition(b"\n\n")
        headers = []
        for line in head.splitlines():
            name, colon, value = line.partition(b":")
            if colon:
                headers.append((name.strip().decode("latin-1").lower(),
                                value.strip().decode("latin-1")))
        parts.append((body.removesuffix(b"\r\n").removesuffix(b"\n"), headers))
    return parts


def _url(data: bytes) -> Iterator[tuple[str, bytes]]:
    current, name = data, "url"
    for _ in range(URL_DEPTH):
        if not _URL_ESCAPE.search(current):
            return
        current = unquote_to_bytes(current.replace(b"+", b" "))
        yield name, current
        name += "+url"


def _json_strings(data: bytes) -> bytes | None:
    if b"\\" not in data:
        return None
    out = []
    for m in _JSON_STRING.finditer(data):
        if b"\\" not in m.group(1):
            continue
        try:
            out.append(json.loads(m.group(0)).encode("utf-8", "surrogatepass"))
        except ValueError:
            continue
    return b"\n".join(out) or None


def _class_table(chars: bytes) -> bytes:
    return bytes(0x61 if i in chars else 0x20 for i in range(256))


_B64_TABLE = _class_table(_B64_CHARS)
_RUN = b"a" * RUN_MIN


def _runs(data: bytes, table: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of at least RUN_MIN characters of the table's class."""
    mapped = data.translate(table)
    at = mapped.find(_RUN)
    while at >= 0:
        end = mapped.find(b" ", at + RUN_MIN)
        if end < 0:
            end = len(mapped)
        yield at, end
        at = mapped.find(_RUN, end)


def _hex_and_base64(data: bytes) -> tuple[bytes | None, bytes | None]:
    """Long hex runs decoded, long base64 runs decoded (one pass: hex is a subset)."""
    hexes, b64s = [], []
    for start, end in _runs(data, _B64_TABLE):
        run = data[start:end]
        if not run.translate(None, _HEX_CHARS):
            hexes.append(binascii.unhexlify(run[: len(run) & ~1]))
        alt = b"-_" if (b"-" in run or b"_" in run) else None
        try:
            b64s.append(base64.b64decode(run + b"=" * (-len(run) % 4), altchars=alt))
        except (binascii.Error, ValueError):
            continue
    return b"\n".join(hexes) or None, b"\n".join(b64s) or None


def _utf16(data: bytes) -> list[tuple[str, bytes]]:
    if data.count(b"\x00") * 4 < len(data):
        return []
    out = []
    for codec, start in (("utf-16-le", 0), ("utf-16-be", 1)):
        body = data[2:] if data[:2] in (b"\xff\xfe", b"\xfe\xff") else data
        # the NULs of ASCII text sit on odd offsets in LE, even ones in BE
        nul_odd = body[1::2].count(b"\x00") >= body[0::2].count(b"\x00")
        if nul_odd != (start == 0):
            continue
        text = body[: len(body) & ~1].decode(codec, "replace")
        out.append((codec, text.encode("utf-8", "replace")))
    return out


def _line_joined(data: bytes) -> bytes | None:
    # base64 (MIME, PEM) broken into lines, also as JSON-escaped "\n" inside strings
    if b"\n" in data:
        return data.translate(None, b"\r\n")
    if b"\\n" in data:
        return data.replace(b"\\r", b"").replace(b"\\n", b"")
    return None


class _Builder:
    def __init__(self, limits: DecodeLimits) -> None:
        self.limits = limits
        self.out = Views()
        self._seen: set[int] = set()

    def add(self, name: str, data: bytes) -> bool:
        if not data:
            return False
        key = hash(data)
        if key in self._seen:
            return False
        if self.out.total_bytes + len(data) > self.limits.total_bytes:
            self.out.truncated = True
            return False
        self._seen.add(key)
        self.out.total_bytes += len(data)
        self.out.views.append(View(name, data))
        return True

    def content_decode(self, name: str, data: bytes, codings: Sequence[str]) -> bytes | None:
        for coding in codings:
            try:
                data = decompress(coding, data, self.limits)
            except Bomb:
                self.out.bombs.append(coding)
                return None
            except ValueError as e:
                self.out.errors.append(str(e))
                return None
            name = f"{name}>{coding}" if name else coding
        return data

    def transforms(self, name: str, data: bytes, depth: int) -> None:
        if depth >= self.limits.depth:
            return
        # each transform is tried only when its marker byte is there (memchr, cheap)
        derived: list[tuple[str, bytes | None]] = []
        if b"%" in data:
            derived.extend(_url(data))
        if b"\\" in data:
            derived.append(("json", _json_strings(data)))
        joined = _line_joined(data)
        if joined is not None:
            derived.append(("lines", joined))  # runs are looked for in the joined text
        else:
            hexes, b64s = _hex_and_base64(data)
            derived.extend((("hex", hexes), ("base64", b64s)))
        if b"\x00" in data:
            derived.extend(_utf16(data))
        coding = _sniffed_coding(data)
        if coding is not None:
            derived.append((coding, self.content_decode("", data, [coding])))
        for sub, value in derived:
            if value is not None:
                full = f"{name}>{sub}"
                if self.add(full, value):
                    self.transforms(full, value, depth + 1)


def content_codings(headers: Iterable[tuple[str, str]]) -> list[str]:
    """Content-Encoding codings in the order to undo them (last applied first)."""
    value = _header(headers, "content-encoding").lower()
    codings = [c.strip() for c in value.split(",") if c.strip() and c.strip() != "identity"]
    return codings[::-1]


def decoded_views(body: bytes, headers: Iterable[tuple[str, str]] = (),
                  limits: DecodeLimits | None = None) -> Views:
    """The body as sent, then every decoding of it (see the module docstring)."""
    headers = headers if isinstance(headers, list) else list(headers)
    b = _Builder(limits or DecodeLimits())
    b.add("body", body)
    codings = content_codings(headers)
    base_name, base = "body", body
    b.out.content = body
    if codings:
        b.out.content = None
        decoded = b.content_decode("body", body, codings)
        if decoded is None:
            return b.out
        base_name = "body>" + ">".join(codings)
        b.add(base_name, decoded)
        base = b.out.content = decoded
    content_type = _header(headers, "content-type")
    if content_type.lower().startswith("multipart/"):
        for i, (part, part_headers) in enumerate(multipart_parts(base, content_type)):
            name = f"{base_name}>part{i}"
            cte = _header(part_headers, "content-transfer-encoding").lower()
            if cte == "base64":
                try:
                    part = base64.b64decode(part.translate(None, b"\r\n \t"))
                except (binascii.Error, ValueError):
                    b.out.errors.append("multipart: base64")
            elif cte == "quoted-printable":
                part = quopri.decodestring(part)
            part_codings = content_codings(part_headers)
            if part_codings:
                decoded = b.content_decode(name, part, part_codings)
                if decoded is None:
                    continue
                part = decoded
            if b.add(name, part):
                b.transforms(name, part, 1)
    b.transforms(base_name, base, 0)
    return b.out
