"""Keyed hashes and masks: the only forms in which plaintext leaves the inspector."""

from __future__ import annotations

import hashlib
import hmac

HASH_HEX_CHARS = 32  # 128 bits: collisions are no concern, the value stays unguessable
MASK = "****"


class KeyedHasher:
    """HMAC-SHA256 with the per-install secret: equal inputs give equal hashes on
    this install only, so a stored hash cannot be checked against a guessed token
    without the secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the HMAC secret must be at least 16 bytes")
        self._secret = secret

    def hash(self, value: bytes | str) -> str:
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        # hmac.digest: the one-shot C path, same value as hmac.new(...).hexdigest()
        return hmac.digest(self._secret, raw, "sha256").hex()[:HASH_HEX_CHARS]


def mask_token(value: str, keep: int = 4) -> str:
    """`****3f9a`: the last `keep` characters of a long secret, nothing of a short one."""
    if len(value) < 4 * keep:
        return MASK
    return MASK + value[-keep:]


def mask_value(value: str, keep: int = 2) -> str:
    """Letters and digits replaced by `*` except the last `keep`; punctuation kept,
    so the shape (`***-**-**89`, `*****@*******.*om`) says what kind of value it was."""
    cut = max(0, len(value) - keep) if len(value) > 2 * keep else len(value)
    head = "".join("*" if ch.isalnum() else ch for ch in value[:cut])
    return (head + value[cut:])[:64]


def dedup_key(*parts: str) -> str:
    """Stable alert key from non-secret parts (kinds, tenants, keyed hashes)."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()
