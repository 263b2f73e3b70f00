"""The QUIC Initial ciphers through libcrypto (protocols/initial_aead.py) against the
`cryptography` package, an independent implementation: the same plaintexts, the
same masks, and every forgery refused."""

from __future__ import annotations

import random
import threading

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from leaktap.controller.protocols.initial_aead import aes128_encrypt_block, aes128_gcm_open


def test_gcm_open_matches_cryptography_and_refuses_every_forgery() -> None:
    rng = random.Random(1604)
    for size in [0, 1, 15, 16, 17, 1000, 1200, 1452, *(rng.randrange(1, 1500) for _ in range(40))]:
        key, nonce = rng.randbytes(16), rng.randbytes(12)
        plain, aad = rng.randbytes(size), rng.randbytes(rng.randrange(0, 60))
        sealed = AESGCM(key).encrypt(nonce, plain, aad)
        assert aes128_gcm_open(key, nonce, sealed, aad) == plain
        flip = bytearray(sealed)
        flip[rng.randrange(len(flip))] ^= 1 << rng.randrange(8)
        assert aes128_gcm_open(key, nonce, bytes(flip), aad) is None  # body or tag
        assert aes128_gcm_open(key, nonce, sealed, aad + b"x") is None
        assert aes128_gcm_open(key, nonce[::-1], sealed, aad) is None or nonce == nonce[::-1]
    assert aes128_gcm_open(b"k" * 16, b"n" * 12, b"short", b"") is None


def test_block_matches_cryptography() -> None:
    rng = random.Random(9001)
    for _ in range(200):
        key, block = rng.randbytes(16), rng.randbytes(16)
        enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        assert aes128_encrypt_block(key, block) == enc.update(block) + enc.finalize()


def test_bad_sizes_are_errors_and_threads_share_nothing() -> None:
    with pytest.raises(ValueError, match="key of 15 bytes"):
        aes128_gcm_open(b"k" * 15, b"n" * 12, b"x" * 32, b"")
    with pytest.raises(ValueError, match="block of 15 bytes"):
        aes128_encrypt_block(b"k" * 16, b"b" * 15)
    key, nonce = bytes(range(16)), bytes(12)
    sealed = AESGCM(key).encrypt(nonce, b"p" * 1200, b"h")
    results: list[bytes | None] = []

    def work() -> None:
        for _ in range(200):
            results.append(aes128_gcm_open(key, nonce, sealed, b"h"))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"p" * 1200] * 800
