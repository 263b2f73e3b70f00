"""AES-128-GCM opening and AES-128 block encryption for QUIC Initial packets,
through the process's own libcrypto (OpenSSL's EVP interface, via ctypes).

The `ssl` module has already mapped libcrypto; the `cryptography` package would
add ~7 MB resident to the agent for the few Initials a node sees (issue 16.5).
Each call makes its own cipher context, so calls from several threads are safe.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any

KEY_LEN = 16
TAG_LEN = 16
_EVP_CTRL_GCM_SET_IVLEN = 0x9
_EVP_CTRL_GCM_SET_TAG = 0x11


class CryptoUnavailable(RuntimeError):
    """No usable libcrypto in this process."""


@cache
def _lib() -> Any:
    name = ctypes.util.find_library("crypto") or "libcrypto.so.3"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise CryptoUnavailable(f"cannot load {name}: {e}") from e
    vp, c_int, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    ip = ctypes.POINTER(c_int)
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "EVP_CIPHER_CTX_new": (vp, []),
        "EVP_CIPHER_CTX_free": (None, [vp]),
        "EVP_aes_128_gcm": (vp, []),
        "EVP_aes_128_ecb": (vp, []),
        "EVP_DecryptInit_ex": (c_int, [vp, vp, vp, cp, cp]),
        "EVP_EncryptInit_ex": (c_int, [vp, vp, vp, cp, cp]),
        "EVP_CIPHER_CTX_ctrl": (c_int, [vp, c_int, c_int, vp]),
        "EVP_CIPHER_CTX_set_padding": (c_int, [vp, c_int]),
        "EVP_DecryptUpdate": (c_int, [vp, vp, ip, cp, c_int]),
        "EVP_DecryptFinal_ex": (c_int, [vp, vp, ip]),
        "EVP_EncryptUpdate": (c_int, [vp, vp, ip, cp, c_int]),
    }
    for fn, (restype, argtypes) in sigs.items():
        f = getattr(lib, fn)
        f.restype, f.argtypes = restype, argtypes
    return lib


class _Context:
    def __init__(self) -> None:
        self.lib = _lib()
        self.ctx = self.lib.EVP_CIPHER_CTX_new()
        if not self.ctx:
            raise MemoryError("EVP_CIPHER_CTX_new")

    def __enter__(self) -> _Context:
        return self

    def __exit__(self, *_: object) -> None:
        self.lib.EVP_CIPHER_CTX_free(self.ctx)


def _key(key: bytes) -> bytes:
    if len(key) != KEY_LEN:
        raise ValueError(f"AES-128 key of {len(key)} bytes")
    return bytes(key)


def aes128_gcm_open(key: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes | None:
    """The plaintext of `sealed` (ciphertext + 16-byte tag), or None when the tag
    does not verify (or the input is too short to hold one)."""
    key = _key(key)
    if len(sealed) < TAG_LEN:
        return None
    body, tag = bytes(sealed[:-TAG_LEN]), bytes(sealed[-TAG_LEN:])
    with _Context() as c:
        lib, ctx = c.lib, c.ctx
        n = ctypes.c_int(0)
        out = ctypes.create_string_buffer(max(len(body), 1))
        ok = (lib.EVP_DecryptInit_ex(ctx, lib.EVP_aes_128_gcm(), None, None, None) == 1
              and lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_SET_IVLEN, len(nonce), None) == 1
              and lib.EVP_DecryptInit_ex(ctx, None, None, key, bytes(nonce)) == 1
              and (not aad or lib.EVP_DecryptUpdate(ctx, None, ctypes.byref(n), bytes(aad),
                                                    len(aad)) == 1)
              and lib.EVP_DecryptUpdate(ctx, out, ctypes.byref(n), body, len(body)) == 1)
        written = n.value
        tag_buf = ctypes.create_string_buffer(tag, TAG_LEN)
        ok = ok and lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_SET_TAG, TAG_LEN, tag_buf) == 1
        final = ctypes.create_string_buffer(16)
        if not ok or lib.EVP_DecryptFinal_ex(ctx, final, ctypes.byref(n)) != 1:
            return None
        return out.raw[:written] + final.raw[:n.value]


def aes128_encrypt_block(key: bytes, block: bytes) -> bytes:
    """AES-128 of one 16-byte block (ECB, no padding): QUIC's header-protection mask."""
    key = _key(key)
    if len(block) != 16:
        raise ValueError(f"AES block of {len(block)} bytes")
    with _Context() as c:
        lib, ctx = c.lib, c.ctx
        n = ctypes.c_int(0)
        out = ctypes.create_string_buffer(32)
        if (lib.EVP_EncryptInit_ex(ctx, lib.EVP_aes_128_ecb(), None, key, None) != 1
                or lib.EVP_CIPHER_CTX_set_padding(ctx, 0) != 1
                or lib.EVP_EncryptUpdate(ctx, out, ctypes.byref(n), bytes(block), 16) != 1
                or n.value != 16):
            raise CryptoUnavailable("libcrypto refused AES-128-ECB")
        return out.raw[:16]
