"""Exact data match: a tenant's records recognised in a write by keyed hashes only.

A fingerprint set is built from a tenant's export (see controller/fingerprint_store):
each selected value is normalised (`normalise`: Unicode NFKC, casefold, words of
letters and digits joined by one space; a phone-like value becomes "+" and its
digits) and reduced to a 64-bit keyed hash with its row and column. The set keeps
those hashes, never a value, plus the keyed hash of the first word of every
multi-word value (with the word counts that follow it), so free text is searched
for names and addresses without hashing every n-gram.

The keyed hash is BLAKE2s in its keyed (MAC) mode under a subkey derived by
HMAC-SHA256 from the per-install secret: a PRF like HMAC, at a third of its cost,
which is what makes the inline path affordable. One 16-byte digest of a token gives
both its value key (bytes 0-8) and its first-word key (bytes 8-16).

A write is tokenised once per decoded view: its words (JSON values, form fields,
CSV cells and free text all reduce to words), digit runs of phone numbers, and the
n-grams that start at a word known to start a multi-word value. Hashing every token
with BLAKE2s (~1 us each, hundreds per 4 KiB, most of them new: names, e-mails)
would cost more than the rest of inspection, so a prefilter answers first, for all
tokens of a view at once: each token's first 16 bytes (zero-padded) are encrypted
with AES-128 in one ECB call (a keyed permutation, under a second subkey) and
probed in a bit filter that the set's builder filled from the same blocks of every
token a lookup can hit (values and first words). The filter never says no to a set
token, so no value becomes unfindable; it passes ~0.5% of other tokens, which are
then hashed with BLAKE2s and looked up one by one through a directory of the sorted
keys (one cache line a lookup, not a binary search's twenty). The n-grams of a first
word found go through the prefilter too (one AES call for all of them, probed one by
one). The tokens are found with bytes.translate and numpy over the whole view, never
one Python object per token, and nothing is cached between writes: a token seen for
the first time costs what a recurring one does. When the compiled accelerator
(_prefilter.c, built by `pip install -e .` with gcc and libssl-dev) is there, an ASCII
view's tokens, blocks, AES call and probes are one C call that returns the runs that
passed, exactly what the numpy path finds (tests/analytics/test_fingerprint_prefilter);
without it (said once in the log) the numpy path does the same work. Sets built
before the prefilter load without it (every token is then hashed, counted as
fingerprint_tokens_unfiltered): build them again.
A set matches when a write holds `min_matches` of its distinct values, or two
columns of one of its rows. Values shared by more than COMMON_VALUE_ROWS rows are
dropped at build time: they cannot tell one record from another.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
import threading
import unicodedata
from array import array
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from leaktap.analytics.allowlist import allows
from leaktap.analytics.plaintext.redact import KeyedHasher

if TYPE_CHECKING:  # imported at the first numpy-path prefilter: ~7 MB resident otherwise
    from cryptography.hazmat.primitives.ciphers import CipherContext

try:  # the compiled prefilter (optional: setup.py builds it where gcc and libssl-dev are)
    from leaktap.analytics.plaintext import _prefilter as _accelerator
except ImportError:  # pragma: no cover - exercised by the fallback test with it hidden
    _accelerator = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)
_fallback_said = False

KEY_LABEL = b"leaktap fingerprints v1"
PREFILTER_LABEL = b"leaktap fingerprints prefilter v1"
DIGEST_BYTES = 16
BLOCK = 16  # a token's prefilter block: its first 16 bytes, zero-padded (one AES block)
NGRAM_MAX = 16  # words of a value that free text can match (longer values are skipped)
MIN_VALUE_CHARS = 3
COMMON_VALUE_ROWS = 10  # a value in more rows than this is not evidence of a record
PHONE_DIGITS_MIN, PHONE_DIGITS_MAX = 7, 15  # E.164 allows at most 15 digits
# two bits per token in one 32-bit word of the filter: ~0.5% of other tokens pass
PREFILTER_BITS_PER_KEY = 32
PREFILTER_CHUNK = 1 << 18  # keys added to a prefilter at once while it is built
GRAMS_MAX = 4096  # n-grams tried per view (a word repeated very often is bounded)
GRAM_SPAN = 16  # bytes a word of an n-gram takes, at first (more when it does not do)
GRAMS_SCALAR = 64  # up to this many n-grams are probed one by one, more in one numpy pass
BUILD_BLOCKS = 1 << 16  # prefilter blocks encrypted at once while a set is built

U64 = npt.NDArray[np.uint64]
Positions = npt.NDArray[np.intp]
_WORD = re.compile(r"[^\W_]+")
_PHONE_VALUE = re.compile(r"\+?[\d\s().\-/]+")
# Tokens are runs between separators in one buffer: the words, then (when the view has
# enough digits) the phone texts. A byte <= "+" separates (digits and letters are
# above): space between words (so that bytes.split() finds them), "+" elsewhere.
_SEP = 0x2B  # "+"
_SEP_BYTE = np.uint8(_SEP)
_TWO_KEYS = struct.Struct("<QQ").unpack  # a digest: (value key, first-word key)
_PHONE_MARK = ord("+")  # a phone candidate's token is "+" and its digits
# ASCII words: lower case, letters and digits kept, everything else separates
_WORD_TABLE = bytes(
    (c + 32) if 65 <= c <= 90 else c if (48 <= c <= 57 or 97 <= c <= 122) else 0x20
    for c in range(256))
# phone runs: punctuation inside a number is deleted, spaces are kept (a separator, or
# deleted in the text's second copy: "+1 555 010 2345"), anything else separates
_PHONE_PUNCT = b"()-.+/"
_PHONE_TABLE = bytes(c if (48 <= c <= 57 or c == 32) else _SEP for c in range(256))
_TAIL = bytes([_SEP]) * (2 * BLOCK)  # ends the last run; 16-byte reads stay in the buffer
# row n: the mask of a block that keeps the first n bytes of a run (n <= 16)
_BLOCK_MASKS = np.array([[(1 << (8 * min(n, 8))) - 1, (1 << (8 * max(n - 8, 0))) - 1]
                         for n in range(BLOCK + 1)], "<u8").view(f"V{BLOCK}").ravel()


def normalise(value: str) -> tuple[bytes, int] | None:
    """(token, words) for a value as it is hashed; words 0 for a phone number;
    None for a value too short to be evidence."""
    s = unicodedata.normalize("NFKC", value).casefold().strip()
    if not s:
        return None
    if _PHONE_VALUE.fullmatch(s):
        digits = "".join(ch for ch in s if "0" <= ch <= "9")
        if PHONE_DIGITS_MIN <= len(digits) <= PHONE_DIGITS_MAX:
            return ("+" + digits).encode(), 0
    words = _WORD.findall(s)
    token = " ".join(words).encode()
    if len(token) < MIN_VALUE_CHARS:
        return None
    return token, len(words)


def block(token: bytes) -> bytes:
    """A token's prefilter block: its first 16 bytes (a phone candidate's digits),
    zero-padded; what `Tokens.blocks` reads from the run buffer."""
    if token[:1] == b"+":
        token = token[1:]
    return token[:BLOCK].ljust(BLOCK, b"\0")


@dataclass(slots=True)
class Tokens:
    """The runs of one decoded view's buffer: run i is buf[starts[i] + 1:starts[i] +
    1 + lens[i]] (starts[i] is the separator in front of it). The runs before offset
    `words_end` are the view's words, in order; the rest are digit runs, whose token
    is "+digits" (phone candidates when 7 to 15 digits long)."""

    buf: bytes
    starts: Positions
    lens: Positions
    words_end: int

    def __len__(self) -> int:
        return len(self.starts)

    def is_word(self, i: int) -> bool:
        return int(self.starts[i]) < self.words_end

    def token(self, i: int) -> bytes | None:
        """Run i as a token (None: a digit run too short or too long to be a phone)."""
        return run_token(self.buf, self.words_end, int(self.starts[i]), int(self.lens[i]))

    def blocks(self) -> npt.NDArray[np.uint64]:
        """Every run's prefilter block (two little-endian words each, in one array): one
        gather of the 16 bytes at each run (unaligned), masked to the run's length."""
        buf = self.buf
        reads = np.ndarray((len(buf) - BLOCK - 1,), dtype=f"V{BLOCK}", buffer=buf, offset=1,
                           strides=(1,))
        out: npt.NDArray[np.uint64] = reads[self.starts].view("<u8")
        # "clip": a run longer than a block takes the last mask (all 16 bytes)
        out &= _BLOCK_MASKS.take(self.lens, mode="clip").view("<u8")
        return out


def run_token(buf: bytes, words_end: int, start: int, n: int) -> bytes | None:
    """The token of the run of `n` bytes after the separator at `start` (None: a digit
    run too short or too long to be a phone)."""
    start += 1
    if start <= words_end:
        return buf[start:start + n]
    if PHONE_DIGITS_MIN <= n <= PHONE_DIGITS_MAX:
        return b"+" + buf[start:start + n]
    return None


def tokenise_view(data: bytes) -> Tokens:
    """The words and digit runs of one decoded view."""
    if data.isascii():
        text = data
        words = data.translate(_WORD_TABLE)
    else:
        s = unicodedata.normalize("NFKC", data.decode("utf-8", "replace")).casefold()
        words = " ".join(_WORD.findall(s)).encode()
        text = s.encode()
    phones = text.translate(_PHONE_TABLE, _PHONE_PUNCT)
    buf = b"".join((b"+", words, b"+", phones.translate(None, b" "), b"+", phones, _TAIL))
    sep = np.less_equal(np.frombuffer(buf, np.uint8), _SEP_BYTE)
    edges = (sep[1:] != sep[:-1]).nonzero()[0]  # a run's separator, its last byte, ...
    starts = edges[0::2]
    # the words end at offset len(words) + 1, a separator: a word's run starts before it
    return Tokens(buf, starts, edges[1::2] - starts, len(words) + 1)


def tokenise(data: bytes) -> tuple[list[bytes], list[bytes]]:
    """(words in order, phone candidates "+digits") of one decoded view."""
    t = tokenise_view(data)
    words: list[bytes] = []
    phones: list[bytes] = []
    for i in range(len(t)):
        token = t.token(i)
        if token is not None:
            (words if t.is_word(i) else phones).append(token)
    return words, phones


def fingerprint_key(hasher: KeyedHasher) -> bytes:
    """The fingerprints' subkey: HMAC-SHA256(secret, KEY_LABEL), 128 bits."""
    return bytes.fromhex(hasher.hash(KEY_LABEL))


class ValueHasher:
    """The keyed 16-byte digest of a normalised token (see the module docstring), and
    the prefilter keys of token blocks."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the fingerprint key must be at least 16 bytes")
        self._digest = partial(hashlib.blake2s, key=key[:32], digest_size=DIGEST_BYTES)
        self.key_id = hashlib.blake2s(b"key id", key=key[:32], digest_size=8).hexdigest()
        self._prefilter_key = self.digest(PREFILTER_LABEL)
        self._local = threading.local()  # a cipher context is not shared between threads
        # the compiled prefilter under the same key (it holds the GIL while it runs)
        self.scanner: _accelerator.Scanner | None = (
            _accelerator.Scanner(self._prefilter_key) if _accelerator is not None else None)

    def digest(self, token: bytes) -> bytes:
        return self._digest(token).digest()

    def value_key(self, token: bytes) -> int:
        return int.from_bytes(self.digest(token)[:8], "little")

    def first_key(self, word: bytes) -> int:
        return int.from_bytes(self.digest(word)[8:], "little")

    def prefilter_keys(self, blocks: Any) -> U64:
        """The 64-bit prefilter key of each 16-byte block (bytes or a buffer), in order:
        the first half of its AES-128 encryption under the prefilter subkey."""
        cipher: CipherContext | None = getattr(self._local, "cipher", None)
        if cipher is None:
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

            cipher = self._local.cipher = Cipher(algorithms.AES(self._prefilter_key),
                                                 modes.ECB()).encryptor()
        return np.frombuffer(cipher.update(blocks), dtype="<u8")[0::2]


@dataclass(slots=True)
class SetArrays:
    """One set's hashes: value keys sorted with their row and column, the first-word
    keys of multi-word values with a bit mask of their word counts, and the prefilter
    keys of every token a lookup can hit (None: a set built before the prefilter)."""

    keys: U64
    rows: npt.NDArray[np.uint32]
    cols: npt.NDArray[np.uint8]
    first_keys: U64
    first_masks: npt.NDArray[np.uint32]
    prefilter_keys: U64 | None = None

    def as_dict(self) -> dict[str, np.ndarray[Any, Any]]:
        out: dict[str, np.ndarray[Any, Any]] = {
            "keys": self.keys, "rows": self.rows, "cols": self.cols,
            "first_keys": self.first_keys, "first_masks": self.first_masks}
        if self.prefilter_keys is not None:
            out["prefilter_keys"] = self.prefilter_keys
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, np.ndarray[Any, Any]]) -> SetArrays:
        pre = d.get("prefilter_keys")
        return cls(d["keys"].astype(np.uint64, copy=False),
                   d["rows"].astype(np.uint32, copy=False),
                   d["cols"].astype(np.uint8, copy=False),
                   d["first_keys"].astype(np.uint64, copy=False),
                   d["first_masks"].astype(np.uint32, copy=False),
                   pre.astype(np.uint64, copy=False) if pre is not None else None)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.as_dict().values())


@dataclass(slots=True)
class BuildStats:
    rows: int = 0
    values: int = 0  # distinct (value, row) pairs kept
    skipped: Counter[str] = field(default_factory=Counter)  # values not kept, by reason
    common_values: int = 0  # distinct values dropped for being in too many rows


class SetBuilder:
    """Feeds rows in, gives SetArrays out; holds hashes only (and, until they are
    encrypted in a batch, the prefilter blocks of at most BUILD_BLOCKS tokens)."""

    def __init__(self, hasher: ValueHasher, columns: Sequence[str]) -> None:
        if not 1 <= len(columns) <= 255:
            raise ValueError("a fingerprint set has 1 to 255 columns")
        self.hasher = hasher
        self.columns = list(columns)
        self.stats = BuildStats()
        self._keys = array("Q")
        self._rows = array("I")
        self._cols = array("B")
        self._first_keys = array("Q")
        self._first_masks = array("I")
        self._blocks: list[bytes] = []
        self._prefilter_keys: list[U64] = []

    def add_row(self, values: Sequence[str | None]) -> None:
        row = self.stats.rows
        self.stats.rows += 1
        digest = self.hasher.digest
        for col, value in enumerate(values):
            if value is None:
                self.stats.skipped["empty"] += 1
                continue
            norm = normalise(value)
            if norm is None:
                self.stats.skipped["too_short"] += 1
                continue
            token, nwords = norm
            if nwords > NGRAM_MAX:
                self.stats.skipped["too_many_words"] += 1
                continue
            self._keys.append(int.from_bytes(digest(token)[:8], "little"))
            self._rows.append(row)
            self._cols.append(col)
            self._blocks.append(block(token))
            if nwords >= 2:
                first = token.split(b" ", 1)[0]
                self._first_keys.append(int.from_bytes(digest(first)[8:], "little"))
                self._first_masks.append(1 << nwords)
                self._blocks.append(block(first))
        if len(self._blocks) >= BUILD_BLOCKS:
            self._encrypt_blocks()

    def _encrypt_blocks(self) -> None:
        if self._blocks:
            self._prefilter_keys.append(self.hasher.prefilter_keys(b"".join(self._blocks)))
            self._blocks = []

    def finish(self) -> SetArrays:
        keys = np.frombuffer(self._keys, dtype=np.uint64)
        rows = np.frombuffer(self._rows, dtype=np.uint32)
        cols = np.frombuffer(self._cols, dtype=np.uint8)
        order = np.lexsort((cols, rows, keys))
        keys, rows, cols = keys[order], rows[order], cols[order]
        if len(keys):  # one entry per (value, row): a value twice in a row counts once
            keep = np.ones(len(keys), dtype=bool)
            keep[1:] = (keys[1:] != keys[:-1]) | (rows[1:] != rows[:-1])
            keys, rows, cols = keys[keep], rows[keep], cols[keep]
        distinct, starts, counts = np.unique(keys, return_index=True, return_counts=True)
        common = counts > COMMON_VALUE_ROWS
        self.stats.common_values = int(common.sum())
        if self.stats.common_values:
            drop = np.isin(keys, distinct[common])
            keys, rows, cols = keys[~drop], rows[~drop], cols[~drop]
        self.stats.values = len(keys)
        fk = np.frombuffer(self._first_keys, dtype=np.uint64)
        fm = np.frombuffer(self._first_masks, dtype=np.uint32)
        first_keys, inverse = np.unique(fk, return_inverse=True)
        first_masks = np.zeros(len(first_keys), dtype=np.uint32)
        np.bitwise_or.at(first_masks, inverse, fm)
        self._encrypt_blocks()
        prefilter = np.unique(np.concatenate(self._prefilter_keys) if self._prefilter_keys
                              else np.zeros(0, np.uint64))
        self._prefilter_keys = []
        return SetArrays(np.ascontiguousarray(keys), np.ascontiguousarray(rows),
                         np.ascontiguousarray(cols), first_keys, first_masks, prefilter)


@dataclass(frozen=True, slots=True)
class SetInfo:
    """What the matcher says about a set (names, no values)."""

    tenant: str
    name: str
    columns: tuple[str, ...]
    min_matches: int = 3


@dataclass(slots=True)
class SetMatch:
    """What one write held of one set: counts and column names, never values."""

    info: SetInfo
    values: int  # distinct values matched
    rows: int  # rows with at least one value matched
    rows_several: int  # rows with values of two or more columns matched
    columns: list[str]

    @property
    def alerting(self) -> bool:
        return self.values >= self.info.min_matches or self.rows_several > 0


class FingerprintIndex:
    """Every loaded set in one sorted table: a value key -> (set, row, column)."""

    def __init__(self, sets: Sequence[tuple[SetInfo, SetArrays]] = (), generation: int = 0):
        self.sets = [info for info, _ in sets]
        self.generation = generation
        parts = [a for _, a in sets]
        keys = np.concatenate([a.keys for a in parts]) if parts else np.zeros(0, np.uint64)
        set_ids = (np.concatenate([np.full(len(a.keys), i, np.uint16)
                                   for i, a in enumerate(parts)])
                   if parts else np.zeros(0, np.uint16))
        if len(parts) > 1:
            order = np.argsort(keys, kind="stable")
            self.keys: U64 = keys[order]
            self.set_ids = set_ids[order]
            self.rows = np.concatenate([a.rows for a in parts])[order]
            self.cols = np.concatenate([a.cols for a in parts])[order]
            fk = np.concatenate([a.first_keys for a in parts])
            fm = np.concatenate([a.first_masks for a in parts])
            self.first_keys, inverse = np.unique(fk, return_inverse=True)
            self.first_masks = np.zeros(len(self.first_keys), np.uint32)
            np.bitwise_or.at(self.first_masks, inverse, fm)
        else:
            self.keys, self.set_ids = keys, set_ids
            self.rows = parts[0].rows if parts else np.zeros(0, np.uint32)
            self.cols = parts[0].cols if parts else np.zeros(0, np.uint8)
            self.first_keys = parts[0].first_keys if parts else np.zeros(0, np.uint64)
            self.first_masks = parts[0].first_masks if parts else np.zeros(0, np.uint32)

        # scalar lookups, for the few tokens of a write that pass the prefilter
        self._values = KeyDirectory(self.keys)
        self._firsts = KeyDirectory(self.first_keys)
        self._first_masks_view = self.first_masks.data
        pre = [a.prefilter_keys for a in parts]
        # every set must have its prefilter keys: one without them could not answer "no"
        self.prefilter = (Prefilter([k for k in pre if k is not None])
                          if parts and all(k is not None for k in pre) else None)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.set_ids.nbytes + self.rows.nbytes + self.cols.nbytes
                   + self.first_keys.nbytes + self.first_masks.nbytes
                   + self._values.nbytes + self._firsts.nbytes
                   + (self.prefilter.nbytes if self.prefilter is not None else 0))

    def has_value(self, key: int) -> bool:
        """A value key is in some set."""
        return self._values.find(key) >= 0

    def token(self, digest: bytes, word: bool) -> tuple[int | None, int]:
        """For a token's digest: its value key if that is in some set (else None), and
        the word counts (bit n: n words) of the values its first-word key starts (0:
        none; always 0 for a phone candidate, which starts no multi-word value)."""
        value, first = _TWO_KEYS(digest)
        found = value if self._values.find(value) >= 0 else None
        if not word:
            return found, 0
        at = self._firsts.find(first)
        return found, self._first_masks_view[at] if at >= 0 else 0


class KeyDirectory:
    """Scalar lookups in a sorted array of 64-bit keys: a directory of bucket starts
    (by the keys' top bits, two to four keys a bucket: 4 MB for 3M keys) sends each
    lookup to the one cache line that holds its bucket, where a binary search over a
    million-row set misses the caches some twenty times."""

    def __init__(self, keys: U64) -> None:
        bits = max(1, min(24, len(keys).bit_length() - 2))
        self.shift = 64 - bits
        bounds = np.arange(1 << bits, dtype=np.uint64) << np.uint64(self.shift)
        self.starts = np.append(np.searchsorted(keys, bounds), len(keys)).astype(np.uint32)
        self._starts = self.starts.data
        self._keys = keys.data

    def find(self, key: int) -> int:
        """The position of `key` in the keys (the first, if it repeats), or -1."""
        bucket = key >> self.shift
        keys = self._keys
        for at in range(self._starts[bucket], self._starts[bucket + 1]):
            if keys[at] == key:
                return at
        return -1

    @property
    def nbytes(self) -> int:
        return int(self.starts.nbytes)


class Prefilter:
    """A bit filter over prefilter keys: two bits in one 32-bit word per key (one
    memory read a probe), PREFILTER_BITS_PER_KEY bits a key: ~0.5% of other keys pass."""

    # the two (distinct) bits of a key in its word, from its low 10 bits
    _PAIRS = np.array([(1 << (j & 31)) | (1 << ((j & 31) + 1 + (j >> 5) % 31) % 32)
                       for j in range(1024)], np.uint32)

    def __init__(self, tables: Sequence[U64]) -> None:
        total = sum(len(t) for t in tables)
        size = max(1 << 10, min(1 << 28, 1 << (
            total * PREFILTER_BITS_PER_KEY // 32 - 1).bit_length()))
        self.shift = np.uint64(64 - (size.bit_length() - 1))
        self.words = np.zeros(size, np.uint32)
        for table in tables:  # in chunks: small temporaries, the loaded RSS stays low
            for at in range(0, len(table), PREFILTER_CHUNK):
                self._add(table[at:at + PREFILTER_CHUNK])
        self.keys = total
        self._words, self._pairs = self.words.data, self._PAIRS.data
        self._shift = int(self.shift)

    def _add(self, keys: U64) -> None:
        """OR each key's pair of bits into its word: sorted by word, pairs of one word
        OR-ed together first (a fancy-index update keeps one of duplicate indices)."""
        at = self._at(keys)
        order = np.argsort(at, kind="stable")
        at, pairs = at[order], self._pair(keys)[order]
        first = np.flatnonzero(np.concatenate(([True], at[1:] != at[:-1])))
        self.words[at[first]] |= np.bitwise_or.reduceat(pairs, first)

    def _at(self, keys: U64) -> Positions:
        return (keys >> self.shift).view(np.intp)  # < 2**30: the view is the same number

    @classmethod
    def _pair(cls, keys: U64) -> npt.NDArray[np.uint32]:
        return cls._PAIRS[(keys & np.uint64(1023)).view(np.intp)]

    def passes(self, keys: U64) -> Positions:
        """Positions of the keys that may be in the filter (every key put in it is)."""
        pair = self._pair(keys)
        return np.flatnonzero((self.words[self._at(keys)] & pair) == pair)

    def scan(self, scanner: _accelerator.Scanner, data: bytes) -> _accelerator.Scan | None:
        """The compiled prefilter of one view (None: not ASCII, the numpy path's)."""
        return scanner.scan(data, self._words, self._pairs, self._shift)

    def probe(self, scanner: _accelerator.Scanner, blocks: bytes) -> list[int]:
        """Positions of the 16-byte blocks whose keys may be in the filter (compiled)."""
        return scanner.probe(blocks, self._words, self._pairs, self._shift)

    def passes_few(self, keys: Iterable[int]) -> list[int]:
        """`passes` for a few keys (Python ints): no numpy call per key."""
        words, pairs, shift = self._words, self._pairs, self._shift
        return [i for i, k in enumerate(keys)
                if words[k >> shift] & pairs[k & 1023] == pairs[k & 1023]]

    @property
    def nbytes(self) -> int:
        return int(self.words.nbytes)


def _lengths(mask: int) -> tuple[int, ...]:
    return tuple(n for n in range(2, NGRAM_MAX + 1) if mask >> n & 1)


class FingerprintMatcher:
    """Finds loaded sets in decoded views; `replace` swaps the index (another thread
    may call it: a scan in progress keeps the index it started with)."""

    def __init__(self, key: bytes) -> None:
        self.hasher = ValueHasher(key)
        self._index = FingerprintIndex()
        # tenant -> allow list ("vendor:instance"): a set's owner writing to these is home
        self.allow: Mapping[str, Collection[str]] = {}
        self.stats: Counter[str] = Counter()
        self._lengths: dict[int, tuple[int, ...]] = {}

    @property
    def index(self) -> FingerprintIndex:
        return self._index

    @property
    def active(self) -> bool:
        return bool(self._index.sets)

    def replace(self, index: FingerprintIndex) -> None:
        global _fallback_said
        if index.sets and _accelerator is None and not _fallback_said:
            _fallback_said = True
            logger.warning("fingerprints: the compiled prefilter (leaktap.analytics.plaintext."
                           "_prefilter) is not built: the numpy path is used, at about half "
                           "the speed; `make setup` builds it (needs gcc and libssl-dev)")
        self._index = index

    def sanctioned(self, owner: str, vendor: str | None, instance: str | None) -> bool:
        """The destination is a CRM instance the set's owner is allowed: data going home."""
        if vendor is None or instance is None:
            return False
        return bool(allows(self.allow.get(owner, ()), vendor, instance))

    # -- tokens to keys ------------------------------------------------------------

    def _passed(self, index: FingerprintIndex, blocks: Any, n: int) -> list[int]:
        """Positions of the n blocks the prefilter lets through (all without one)."""
        self.stats["fingerprint_tokens"] += n
        if index.prefilter is None:
            self.stats["fingerprint_tokens_unfiltered"] += n
            return list(range(n))
        passed: list[int] = index.prefilter.passes(self.hasher.prefilter_keys(blocks)).tolist()
        self.stats["fingerprint_tokens_passed"] += len(passed)
        return passed

    def passed_runs(self, data: bytes, index: FingerprintIndex
                    ) -> tuple[bytes, int, list[int], list[int]] | None:
        """The run buffer of one view, where its words end, and the starts and lengths
        of the runs that the prefilter lets through (None: none did). The compiled
        prefilter answers for an ASCII view when it is built, the numpy path otherwise."""
        scanner, prefilter = self.hasher.scanner, index.prefilter
        if scanner is not None and prefilter is not None:
            scan = prefilter.scan(scanner, data)
            if scan is not None:
                buf, words_end, runs, _, starts, lens = scan
                self.stats["fingerprint_tokens"] += runs
                self.stats["fingerprint_tokens_passed"] += len(starts)
                return (buf, words_end, starts, lens) if starts else None
        tokens = tokenise_view(data)
        if not len(tokens):
            return None
        passed = self._passed(index, tokens.blocks().data.cast("B"), len(tokens))
        if not passed:
            return None
        # a few: one numpy scalar each costs less than a fancy index
        return (tokens.buf, tokens.words_end, [tokens.starts.item(i) for i in passed],
                [tokens.lens.item(i) for i in passed])

    def value_keys(self, data: bytes, index: FingerprintIndex | None = None) -> set[int]:
        """Keys of the set values found in one decoded view."""
        index = self._index if index is None else index
        runs = self.passed_runs(data, index)
        if runs is None:
            return set()
        buf, words_end, starts, lens = runs
        at: dict[bytes, list[int]] = {}  # distinct tokens let through -> their runs' starts
        for start, n in zip(starts, lens, strict=True):
            token = run_token(buf, words_end, start, n)
            if token is not None:
                at.setdefault(token, []).append(start)
        self.stats["fingerprint_tokens_hashed"] += len(at)
        found: set[int] = set()
        grams: list[bytes] = []
        digest, lookup = self.hasher.digest, index.token
        for token, positions in at.items():
            # a phone candidate ("+digits") starts no multi-word value
            value, mask = lookup(digest(token), token[0] != _PHONE_MARK)
            if value is not None:
                found.add(value)
            if mask and len(grams) < GRAMS_MAX:
                grams += self._grams(buf, words_end, positions, mask)
        if grams:
            if len(grams) >= GRAMS_MAX:
                self.stats["fingerprint_grams_capped"] += 1
            found.update(self._gram_values(index, list(set(grams[:GRAMS_MAX]))))
        return found

    def _gram_values(self, index: FingerprintIndex, grams: list[bytes]) -> list[int]:
        """Keys of the set values among n-grams; the prefilter answers first (per n-gram,
        most n-grams of a first word found are not a value: "jane" and the next words)."""
        blocks = b"".join([g[:BLOCK].ljust(BLOCK, b"\0") for g in grams])  # `block` of words
        scanner = self.hasher.scanner
        if index.prefilter is not None and scanner is not None:
            self.stats["fingerprint_tokens"] += len(grams)
            passed = index.prefilter.probe(scanner, blocks)
            self.stats["fingerprint_tokens_passed"] += len(passed)
        elif index.prefilter is not None and len(grams) <= GRAMS_SCALAR:
            self.stats["fingerprint_tokens"] += len(grams)
            passed = index.prefilter.passes_few(
                self.hasher.prefilter_keys(blocks).tolist())
            self.stats["fingerprint_tokens_passed"] += len(passed)
        else:
            passed = self._passed(index, blocks, len(grams))
        self.stats["fingerprint_tokens_hashed"] += len(passed)
        keys = [self.hasher.value_key(grams[i]) for i in passed]
        return [k for k in keys if index.has_value(k)]

    def _grams(self, buf: bytes, words_end: int, starts: list[int], mask: int) -> list[bytes]:
        """The n-grams of the words whose runs start at `starts` (the separators in front
        of them in `buf`), n the lengths in `mask`."""
        lengths = self._lengths.get(mask)
        if lengths is None:
            lengths = self._lengths[mask] = _lengths(mask)
        longest = lengths[-1]
        join = b" ".join
        grams: list[bytes] = []
        for start in starts:
            # the words from this one on: a slice of the buffer split at its separators,
            # longer until it holds `longest` words or reaches the last word
            span = GRAM_SPAN * longest
            while True:
                end = min(start + 1 + span, words_end)
                following = buf[start + 1:end].split()
                if len(following) > longest or end == words_end:
                    break
                span *= 4
            grams += [join(following[:n]) for n in lengths if n <= len(following)]
            if len(grams) >= GRAMS_MAX:
                break
        return grams

    # -- keys to sets ----------------------------------------------------------------

    def scan(self, views: Iterable[bytes]) -> list[SetMatch]:
        """Per set: what the views of one message held (sets with no value left out)."""
        index = self._index
        if not index.sets:
            return []
        keys: set[int] = set()
        for data in views:
            keys |= self.value_keys(data, index)
        if not keys:
            return []
        probe = np.fromiter(sorted(keys), dtype=np.uint64, count=len(keys))
        lo = np.searchsorted(index.keys, probe, "left").tolist()
        hi = np.searchsorted(index.keys, probe, "right").tolist()
        values: dict[int, set[int]] = {}
        rows: dict[int, dict[int, set[int]]] = {}
        for k, (a, b) in enumerate(zip(lo, hi, strict=True)):
            for j in range(a, b):
                s = int(index.set_ids[j])
                values.setdefault(s, set()).add(k)
                rows.setdefault(s, {}).setdefault(int(index.rows[j]), set()).add(
                    int(index.cols[j]))
        out = []
        for s, matched in values.items():
            info = index.sets[s]
            per_row = rows[s]
            cols = sorted(set().union(*per_row.values()))
            out.append(SetMatch(info, len(matched), len(per_row),
                                sum(1 for c in per_row.values() if len(c) >= 2),
                                [info.columns[c] for c in cols if c < len(info.columns)]))
        self.stats["fingerprint_set_hits"] += len(out)
        return out
