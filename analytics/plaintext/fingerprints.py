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
n-grams that start at a word known to start a multi-word value. Tokens already
seen are answered from a cache keyed by Python's per-process `hash()` of the
token (the token itself is not kept); only new tokens are hashed with the key,
and a bit filter over all keys (32 bits per key) answers "no" for most of them
before any binary search in the sorted keys.
A set matches when a write holds `min_matches` of its distinct values, or two
columns of one of its rows. Values shared by more than COMMON_VALUE_ROWS rows are
dropped at build time: they cannot tell one record from another.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
from array import array
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt

from leaktap.analytics.allowlist import allows
from leaktap.analytics.plaintext.redact import KeyedHasher

KEY_LABEL = b"leaktap fingerprints v1"
DIGEST_BYTES = 16
NGRAM_MAX = 16  # words of a value that free text can match (longer values are skipped)
MIN_VALUE_CHARS = 3
COMMON_VALUE_ROWS = 10  # a value in more rows than this is not evidence of a record
PHONE_DIGITS_MIN, PHONE_DIGITS_MAX = 7, 15  # E.164 allows at most 15 digits
CACHE_MAX = 1 << 18  # token hashes remembered as "in no set" (then cleared), ~16 MB
POS_CACHE_MAX = 1 << 16  # ... and as "in a set" (first words, values), ~10 MB
FILTER_BITS_PER_KEY = 32  # ~3% of tokens not in any set pass the filter to the search
GRAMS_MAX = 4096  # n-grams tried per view (a word repeated very often is bounded)

U64 = npt.NDArray[np.uint64]
_WORD = re.compile(r"[^\W_]+")
_PHONE_VALUE = re.compile(r"\+?[\d\s().\-/]+")
# ASCII fast path: lower case and keep letters and digits, everything else separates
_WORD_TABLE = bytes(
    (c + 32) if 65 <= c <= 90 else c if (48 <= c <= 57 or 97 <= c <= 122) else 32
    for c in range(256))
# phone runs: punctuation inside a number is deleted, anything else separates
_PHONE_PUNCT = b" ()-.+/"
_PHONE_PUNCT_NO_SPACE = b"()-.+/"
_NOT_DIGITS = bytes(c for c in range(256) if not 48 <= c <= 57)
_PHONE_TABLE = bytes(c if 48 <= c <= 57 else 32 for c in range(256))


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


def tokenise(data: bytes) -> tuple[list[bytes], list[bytes]]:
    """(words in order, phone candidates "+digits") of one decoded view."""
    if data.isascii():
        text = data
        words = data.translate(_WORD_TABLE).split()
    else:
        s = unicodedata.normalize("NFKC", data.decode("utf-8", "replace")).casefold()
        words = [w.encode() for w in _WORD.findall(s)]
        text = s.encode()
    if len(text.translate(None, _NOT_DIGITS)) < PHONE_DIGITS_MIN:
        return words, []  # too few digits for any phone number (cheap: memchr-like)
    # spaces inside a number are deleted ("+1 555 010 2345"), and also kept as
    # separators, so a number followed by another ("555-010-2345 2 days") is found too
    runs = text.translate(_PHONE_TABLE, _PHONE_PUNCT).split()
    runs += text.translate(_PHONE_TABLE, _PHONE_PUNCT_NO_SPACE).split()
    phones = [b"+" + run for run in runs if PHONE_DIGITS_MIN <= len(run) <= PHONE_DIGITS_MAX]
    return words, phones


def fingerprint_key(hasher: KeyedHasher) -> bytes:
    """The fingerprints' subkey: HMAC-SHA256(secret, KEY_LABEL), 128 bits."""
    return bytes.fromhex(hasher.hash(KEY_LABEL))


class ValueHasher:
    """The keyed 16-byte digest of a normalised token (see the module docstring)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the fingerprint key must be at least 16 bytes")
        self._digest = partial(hashlib.blake2s, key=key[:32], digest_size=DIGEST_BYTES)
        self.key_id = hashlib.blake2s(b"key id", key=key[:32], digest_size=8).hexdigest()

    def digest(self, token: bytes) -> bytes:
        return self._digest(token).digest()

    def value_key(self, token: bytes) -> int:
        return int.from_bytes(self.digest(token)[:8], "little")

    def first_key(self, word: bytes) -> int:
        return int.from_bytes(self.digest(word)[8:], "little")


@dataclass(slots=True)
class SetArrays:
    """One set's hashes: value keys sorted with their row and column, and the
    first-word keys of multi-word values with a bit mask of their word counts."""

    keys: U64
    rows: npt.NDArray[np.uint32]
    cols: npt.NDArray[np.uint8]
    first_keys: U64
    first_masks: npt.NDArray[np.uint32]

    def as_dict(self) -> dict[str, np.ndarray[Any, Any]]:
        return {"keys": self.keys, "rows": self.rows, "cols": self.cols,
                "first_keys": self.first_keys, "first_masks": self.first_masks}

    @classmethod
    def from_dict(cls, d: Mapping[str, np.ndarray[Any, Any]]) -> SetArrays:
        return cls(d["keys"].astype(np.uint64, copy=False),
                   d["rows"].astype(np.uint32, copy=False),
                   d["cols"].astype(np.uint8, copy=False),
                   d["first_keys"].astype(np.uint64, copy=False),
                   d["first_masks"].astype(np.uint32, copy=False))

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
    """Feeds rows in, gives SetArrays out; holds hashes only."""

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
            if nwords >= 2:
                first = token.split(b" ", 1)[0]
                self._first_keys.append(int.from_bytes(digest(first)[8:], "little"))
                self._first_masks.append(1 << nwords)

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
        return SetArrays(np.ascontiguousarray(keys), np.ascontiguousarray(rows),
                         np.ascontiguousarray(cols), first_keys, first_masks)


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

        self.filter = self._filter(self.keys, self.first_keys)

    @staticmethod
    def _filter(*tables: U64) -> npt.NDArray[np.uint8]:
        """A one-probe bit filter over every key: a binary search in millions of keys
        costs ~20 cache misses, the filter one, and answers "no" for ~97% of tokens."""
        total = sum(len(t) for t in tables)
        bits = 1 << max(16, min(30, (FILTER_BITS_PER_KEY * total).bit_length()))
        out = np.zeros(bits >> 3, dtype=np.uint8)
        mask = np.uint64(bits - 1)
        for table in tables:
            at = table & mask
            np.bitwise_or.at(out, (at >> np.uint64(3)).astype(np.intp),
                             (np.uint8(1) << (at & np.uint64(7)).astype(np.uint8)))
        return out

    def may_hold(self, probe: U64) -> npt.NDArray[np.bool_]:
        at = probe & np.uint64(len(self.filter) * 8 - 1)
        byte = self.filter[(at >> np.uint64(3)).astype(np.intp)]
        return ((byte >> (at & np.uint64(7)).astype(np.uint8)) & 1).astype(bool)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.set_ids.nbytes + self.rows.nbytes + self.cols.nbytes
                   + self.first_keys.nbytes + self.first_masks.nbytes + self.filter.nbytes)


def _lengths(mask: int) -> tuple[int, ...]:
    return tuple(n for n in range(2, NGRAM_MAX + 1) if mask >> n & 1)


class _Loaded:
    """An index with the token caches answered from it: swapped together, so a scan
    in progress while the sets change never caches an old answer for the new sets."""

    def __init__(self, index: FingerprintIndex) -> None:
        self.index = index
        self.neg: set[int] = set()  # hash() of tokens in no set
        self.pos: dict[int, tuple[int | None, int]] = {}  # hash() -> (value key, mask)
        self.pos_keys: set[int] = set()


class FingerprintMatcher:
    """Finds loaded sets in decoded views; `replace` swaps the index (another thread
    may call it: the scan in progress keeps the index it started with)."""

    def __init__(self, key: bytes) -> None:
        self.hasher = ValueHasher(key)
        self._loaded = _Loaded(FingerprintIndex())
        # tenant -> allow list ("vendor:instance"): a set's owner writing to these is home
        self.allow: Mapping[str, Collection[str]] = {}
        self.stats: Counter[str] = Counter()
        self._lengths: dict[int, tuple[int, ...]] = {}

    @property
    def index(self) -> FingerprintIndex:
        return self._loaded.index

    @property
    def active(self) -> bool:
        return bool(self._loaded.index.sets)

    def replace(self, index: FingerprintIndex) -> None:
        self._loaded = _Loaded(index)

    def sanctioned(self, owner: str, vendor: str | None, instance: str | None) -> bool:
        """The destination is a CRM instance the set's owner is allowed: data going home."""
        if vendor is None or instance is None:
            return False
        return bool(allows(self.allow.get(owner, ()), vendor, instance))

    # -- tokens to keys ------------------------------------------------------------

    def _classify(self, loaded: _Loaded,
                  tokens: list[bytes]) -> list[tuple[bytes, int | None, int]]:
        """(token, value key if the token is a value, first-word mask) of the tokens
        that are in some set; each new token hashed once, then cached by hash()."""
        tokens = list(set(tokens))  # bytes keep their hash: dedup first, make ints once
        hashes = list(map(hash, tokens))
        seen = set(hashes)
        unknown = seen - loaded.neg
        if unknown:
            unknown = unknown - loaded.pos_keys  # set - set walks the smaller side
        wanted = seen & loaded.pos_keys
        if not unknown and not wanted:
            return []  # the common case: every token known to be in no set
        if unknown:
            fresh = dict(itertools.compress(zip(hashes, tokens, strict=True),
                                            map(unknown.__contains__, hashes)))
            self._learn(loaded, list(fresh.values()), list(fresh))
            wanted = seen & loaded.pos_keys
        pos = loaded.pos
        hits = dict(itertools.compress(zip(hashes, tokens, strict=True),
                                       map(wanted.__contains__, hashes)))
        return [(t, *pos[h]) for h, t in hits.items()]

    def _learn(self, loaded: _Loaded, tokens: list[bytes], hashes: list[int]) -> None:
        self.stats["fingerprint_tokens_hashed"] += len(tokens)
        index = loaded.index
        # value key and first-word key of token i at 2i and 2i+1: one filter pass for all
        keys = np.frombuffer(b"".join(map(self.hasher.digest, tokens)), dtype="<u8")
        found: dict[int, tuple[int | None, int]] = {}
        for j in np.flatnonzero(index.may_hold(keys)).tolist():  # the filter's few "maybe"s
            key = keys[j]
            i, first = j >> 1, j & 1
            table = index.first_keys if first else index.keys
            at = int(np.searchsorted(table, key))
            if at == len(table) or table[at] != key:
                continue
            value, mask = found.get(i, (None, 0))
            if first:
                mask = int(index.first_masks[at])
            else:
                value = int(key)
            found[i] = (value, mask)
        if len(loaded.neg) + len(hashes) > CACHE_MAX:
            loaded.neg = set()
            self.stats["fingerprint_cache_resets"] += 1
        loaded.neg.update(hashes if not found else
                          (h for i, h in enumerate(hashes) if i not in found))
        if len(loaded.pos) > POS_CACHE_MAX:
            loaded.pos, loaded.pos_keys = {}, set()
            self.stats["fingerprint_cache_resets"] += 1
        for i, entry in found.items():
            loaded.pos[hashes[i]] = entry
            loaded.pos_keys.add(hashes[i])

    def _grams(self, words: list[bytes], firsts: list[tuple[bytes, int]]) -> list[bytes]:
        grams: list[bytes] = []
        total = len(words)
        join = b" ".join
        for word, mask in firsts:
            lengths = self._lengths.get(mask)
            if lengths is None:
                lengths = self._lengths[mask] = _lengths(mask)
            at = -1
            while len(grams) < GRAMS_MAX:
                try:
                    at = words.index(word, at + 1)
                except ValueError:
                    break
                grams.extend(join(words[at:at + n]) for n in lengths if at + n <= total)
        if len(grams) >= GRAMS_MAX:
            self.stats["fingerprint_grams_capped"] += 1
        return grams

    def value_keys(self, data: bytes, loaded: _Loaded | None = None) -> set[int]:
        """Keys of the set values found in one decoded view."""
        loaded = loaded or self._loaded
        words, phones = tokenise(data)
        found: set[int] = set()
        firsts: list[tuple[bytes, int]] = []
        for token, value, mask in self._classify(loaded, words + phones):
            if value is not None:
                found.add(value)
            if mask:
                firsts.append((token, mask))
        if firsts:
            grams = self._grams(words, firsts)
            found.update(v for _, v, _ in self._classify(loaded, grams) if v is not None)
        return found

    # -- keys to sets ----------------------------------------------------------------

    def scan(self, views: Iterable[bytes]) -> list[SetMatch]:
        """Per set: what the views of one message held (sets with no value left out)."""
        loaded = self._loaded
        index = loaded.index
        if not index.sets:
            return []
        keys: set[int] = set()
        for data in views:
            keys |= self.value_keys(data, loaded)
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
