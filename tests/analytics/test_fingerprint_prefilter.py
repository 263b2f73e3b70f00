"""The compiled fingerprint prefilter (issue 15.3) answers exactly what the numpy path
does: the same run buffer, runs, prefilter keys, runs passed, n-gram probes and set
values found, on generated texts of every kind; without it the numpy path is used and
that is said once in the log."""

from __future__ import annotations

import json
import logging
import os
import random
import string
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leaktap.analytics.plaintext import fingerprints
from leaktap.analytics.plaintext.fingerprints import (
    FingerprintIndex,
    FingerprintMatcher,
    Prefilter,
    SetBuilder,
    SetInfo,
    ValueHasher,
    fingerprint_key,
    tokenise_view,
)
from leaktap.analytics.plaintext.redact import KeyedHasher
from tests.analytics.fingerprint_data import as_csv, as_json, as_paragraph, contact, contacts

KEY = fingerprint_key(KeyedHasher(b"p" * 32))
COLUMNS = ("name", "email", "phone", "address")
TEXTS = 1500


def _hasher(cipher: str = "aesni") -> ValueHasher:
    """A hasher whose compiled prefilter translates 16 bytes at a time and encrypts with
    AES-NI ("aesni"), or translates a byte at a time and encrypts with OpenSSL."""
    if cipher == "openssl":
        os.environ["LEAKTAP_NO_AESNI"] = os.environ["LEAKTAP_NO_SIMD"] = "1"
    try:
        hasher = ValueHasher(KEY)
    finally:
        os.environ.pop("LEAKTAP_NO_AESNI", None)
        os.environ.pop("LEAKTAP_NO_SIMD", None)
    assert hasher.scanner is not None, "the compiled prefilter is not built (make setup)"
    assert hasher.scanner.aesni == hasher.scanner.simd == (cipher == "aesni")
    return hasher


def _token(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(n))


def _phone(rng: random.Random) -> str:
    digits = "".join(rng.choice(string.digits) for _ in range(rng.randrange(3, 19)))
    seps = " ().-/+"
    return "".join(ch + (rng.choice(seps) if rng.random() < 0.3 else "") for ch in digits)


def _texts(seed: int, n: int) -> list[bytes]:
    """Views of every kind the inspector sees: JSON, CSV, free text, e-mails, phones
    with punctuation, tokens of 15/16/17 bytes (and other edges), random ASCII bytes
    (control characters, every punctuation), and non-ASCII text."""
    rng = random.Random(seed)
    out: list[bytes] = [b"", b"+", b" ", b"a", b"ab", b"0" * 7, b"1" * 15, b"1" * 16,
                        b"9" * 17, b"x" * 15, b"y" * 16, b"z" * 17, b"+" * 40]
    for i in range(n):
        rows = [contact(rng) for _ in range(rng.randrange(1, 4))]
        kind = i % 9
        if kind == 0:
            text = as_json(rows)
        elif kind == 1:
            text = as_csv(rows, list(COLUMNS))
        elif kind == 2:
            text = as_paragraph(rows, rng)
        elif kind == 3:  # tokens around the 16-byte block edge, digits and letters
            text = " ".join(_token(rng, rng.choice((1, 2, 7, 14, 15, 16, 17, 18, 31, 32, 33)))
                            for _ in range(rng.randrange(1, 40))).encode()
        elif kind == 4:  # phones however punctuated, glued to words or not
            text = rng.choice((" ", ", ", "", "; tel:")).join(
                _phone(rng) for _ in range(rng.randrange(1, 12))).encode()
        elif kind == 5:  # e-mails and form fields
            text = "&".join(f"{_token(rng, 3)}={r['email']}" for r in rows).encode()
        elif kind == 6:  # random ASCII bytes, any length up to 4 KiB
            text = bytes(rng.randrange(128) for _ in range(rng.choice((1, 15, 16, 17, 300,
                                                                        4096))))
        elif kind == 7:  # non-ASCII text (the numpy path's)
            text = json.dumps({"n": "Straße ＪＡＮＥ " + rows[0]["name"]},
                              ensure_ascii=False).encode()
        else:  # a 4 KiB write of JSON records and a note
            text = (as_json(rows * 8) + as_paragraph(rows, rng))[:4096]
        out.append(text)
    return out


def _numpy_tokens(hasher: ValueHasher, data: bytes) -> tuple[bytes, int, list[int], list[int],
                                                              bytes]:
    t = tokenise_view(data)
    keys = (hasher.prefilter_keys(t.blocks().data.cast("B")).astype("<u8").tobytes()
            if len(t) else b"")
    return t.buf, t.words_end, t.starts.tolist(), t.lens.tolist(), keys


def _dense_prefilter(seed: int) -> Prefilter:
    """A filter whose words have ~3/4 of their bits set: about half of all keys pass,
    so the passed runs compared below are many, not the ~0.5% of a real set."""
    pre = Prefilter([np.arange(1000, dtype=np.uint64)])
    rng = np.random.default_rng(seed)
    pre.words[:] = (rng.integers(0, 1 << 32, len(pre.words), dtype=np.uint64)
                    | rng.integers(0, 1 << 32, len(pre.words), dtype=np.uint64)
                    ).astype(np.uint32)
    return pre


def _index(records: list[dict[str, str]]) -> FingerprintIndex:
    builder = SetBuilder(ValueHasher(KEY), COLUMNS)
    for r in records:
        builder.add_row([r[c] for c in COLUMNS])
    return FingerprintIndex([(SetInfo("acme", "contacts", COLUMNS), builder.finish())])


@pytest.mark.parametrize("cipher", ["aesni", "openssl"])
def test_runs_and_prefilter_keys_are_the_numpy_paths_on_every_kind_of_text(cipher: str) -> None:
    hasher = _hasher(cipher)
    assert hasher.scanner is not None
    compared = non_ascii = 0
    for data in _texts(1, TEXTS):
        got = hasher.scanner.tokens(data)
        if not data.isascii():
            assert got is None
            non_ascii += 1
            continue
        assert got == _numpy_tokens(hasher, data), data
        compared += 1
    assert compared > 1300 and non_ascii > 100


HASHERS = [_hasher("aesni"), _hasher("openssl")]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600).map(lambda b: bytes(c & 0x7F for c in b)))
def test_runs_and_keys_are_the_numpy_paths_on_any_ascii_bytes(data: bytes) -> None:
    for hasher in HASHERS:
        assert hasher.scanner is not None
        assert hasher.scanner.tokens(data) == _numpy_tokens(hasher, data)


@pytest.mark.parametrize("seed", [2, 3])
def test_the_runs_passed_are_the_numpy_paths(seed: int) -> None:
    hasher = _hasher()
    assert hasher.scanner is not None
    pre = _dense_prefilter(seed)
    passed_total = 0
    for data in _texts(seed, TEXTS // 2):
        scan = pre.scan(hasher.scanner, data)
        if not data.isascii():
            assert scan is None
            continue
        assert scan is not None
        t = tokenise_view(data)
        want = (pre.passes(hasher.prefilter_keys(t.blocks().data.cast("B"))).tolist()
                if len(t) else [])
        buf, words_end, runs, passed, starts, lens = scan
        assert (buf, words_end, runs) == (t.buf, t.words_end, len(t))
        assert passed == want
        assert starts == [t.starts.item(i) for i in want]
        assert lens == [t.lens.item(i) for i in want]
        passed_total += len(passed)
    assert passed_total > 10_000  # the dense filter lets many through: a real comparison


@pytest.mark.parametrize("cipher", ["aesni", "openssl"])
def test_n_gram_probes_are_the_numpy_paths(cipher: str) -> None:
    hasher = _hasher(cipher)
    assert hasher.scanner is not None
    pre = _dense_prefilter(4)
    rng = random.Random(4)
    for n in (0, 1, 2, 63, 64, 65, 1000):
        blocks = bytes(rng.randrange(256) for _ in range(16 * n))
        want = pre.passes(hasher.prefilter_keys(blocks)).tolist() if n else []
        assert pre.probe(hasher.scanner, blocks) == want
    with pytest.raises(ValueError, match="16 bytes"):
        pre.probe(hasher.scanner, b"x" * 17)


def test_a_filter_of_the_wrong_size_is_refused() -> None:
    hasher = _hasher()
    assert hasher.scanner is not None
    pre = _dense_prefilter(5)
    with pytest.raises(ValueError, match="2\\*\\*\\(64 - shift\\)"):
        hasher.scanner.scan(b"jane smith", pre.words.data, pre._PAIRS.data,
                            int(pre.shift) + 1)
    with pytest.raises(ValueError, match="16 bytes"):
        ValueHasher(KEY).scanner.__class__(b"short")  # type: ignore[union-attr]


def test_values_found_and_counters_are_the_same_with_and_without_the_accelerator() -> None:
    records = list(contacts(3000, seed=9))
    index = _index(records)
    fast, slow = FingerprintMatcher(KEY), FingerprintMatcher(KEY)
    slow.hasher.scanner = None
    fast.replace(index)
    slow.replace(index)
    rng = random.Random(9)
    texts = _texts(9, 400)
    # views holding set values in every form: JSON, CSV, free text, upper case, phones
    for _ in range(200):
        rows = rng.sample(records, rng.randrange(1, 5))
        texts += [as_json(rows), as_csv(rows, list(COLUMNS)), as_paragraph(rows, rng),
                  as_paragraph(rows, rng).upper()]
    found = 0
    for data in texts:
        keys = fast.value_keys(data, index)
        assert keys == slow.value_keys(data, index), data
        found += len(keys)
    assert found > 2000
    assert fast.stats == slow.stats
    assert fast.stats["fingerprint_tokens_passed"] > 0


def test_without_the_accelerator_the_numpy_path_is_used_and_said_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(fingerprints, "_accelerator", None)
    monkeypatch.setattr(fingerprints, "_fallback_said", False)
    records = list(contacts(200, seed=10))
    index = _index(records)
    with caplog.at_level(logging.WARNING, logger=fingerprints.__name__):
        matchers = [FingerprintMatcher(KEY) for _ in range(3)]
        for m in matchers:
            assert m.hasher.scanner is None
            m.replace(index)
            m.replace(index)
    said = [r.getMessage() for r in caplog.records if "_prefilter" in r.getMessage()]
    assert len(said) == 1 and "numpy path" in said[0]
    matches = matchers[0].scan([as_json(records[:3])])
    assert [(m.info.tenant, m.values) for m in matches] == [("acme", 12)]  # 3 rows x 4 columns


def test_a_view_of_megabytes_then_a_small_one_give_the_numpy_paths_runs() -> None:
    # past the scratch the scanner keeps between calls: it is let go and grown again
    hasher = _hasher()
    assert hasher.scanner is not None
    large = (b'{"name": "Jane Smith", "phone": "+1 (555) 010-2345", "email": '
             b'"jane.smith@example.org", "n": 1234567890123456789}, ' * 40_000)
    assert len(large) > 4_000_000
    for data in (large, b"Jane Smith +1 (555) 010-2345", large[:70_001]):
        assert hasher.scanner.tokens(data) == _numpy_tokens(hasher, data)


def test_a_scanner_never_initialised_is_an_error_not_a_crash() -> None:
    scanner = type(_hasher().scanner).__new__(type(_hasher().scanner))
    pre = _dense_prefilter(6)
    with pytest.raises(RuntimeError, match="__init__"):
        pre.scan(scanner, b"jane smith")


def test_threads_sharing_one_matcher_find_what_one_thread_finds() -> None:
    # one scanner (its cipher context and scratch) serves every thread of a matcher
    records = list(contacts(500, seed=12))
    index = _index(records)
    matcher = FingerprintMatcher(KEY)
    matcher.replace(index)
    rng = random.Random(12)
    texts = [as_paragraph(rng.sample(records, 2), rng) for _ in range(150)] + _texts(12, 150)
    want = [matcher.value_keys(t, index) for t in texts]
    results: list[list[set[int]]] = [[] for _ in range(4)]

    def work(out: list[set[int]]) -> None:
        out.extend(matcher.value_keys(t, index) for t in texts)

    threads = [threading.Thread(target=work, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(map(len, want)) > 500
    assert all(r == want for r in results)
