"""Payloads that look like model weights or checkpoints.

Containers are recognised by their headers (safetensors, GGUF, PyTorch zip,
pickled tensors); raw tensors by their numbers: weights stored as float16 or
float32 have a sign bit near 50/50, exponents packed into a few values (they
are small numbers of similar magnitude) and mantissa bytes close to random.
Text has no sign bits, compressed or encrypted data has uniform exponents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MIN_FLOAT_BYTES = 2048
SIGN_BALANCE = (0.3, 0.7)
F32_EXPONENT_TOP8 = 0.9  # share of values in the 8 most common exponents
F16_EXPONENT_TOP6 = 0.9
MANTISSA_MIN_ENTROPY = 7.0  # bits per byte of the low mantissa byte

_SAFETENSORS_DTYPE = re.compile(
    rb'"dtype"\s*:\s*"(F16|F32|F64|BF16|I8|U8|I16|I32|I64|BOOL|F8_E4M3|F8_E5M2)"')
_GGUF = re.compile(rb"GGUF[\x01-\x03]\x00\x00\x00")
_ZIP_TORCH = re.compile(
    rb"PK\x03\x04.{26}[^\x00]{0,200}?(?:data\.pkl|/data/\d+|version|byteorder)", re.S)
_PICKLE = re.compile(rb"\x80[\x02-\x05]")
_PICKLE_TENSOR = re.compile(
    rb"torch\._utils|_rebuild_tensor|numpy\.core\.multiarray|collections\nOrderedDict")


@dataclass(frozen=True, slots=True)
class ArtifactHit:
    format: str  # safetensors | gguf | pytorch_zip | pickle | float16 | float32
    offset: int
    detail: str  # non-secret description, e.g. the dtype


def _safetensors(data: bytes) -> ArtifactHit | None:
    for m in _SAFETENSORS_DTYPE.finditer(data[:65536]):
        # the header's JSON starts 8 bytes after a little-endian length
        start = data.rfind(b'{"', 0, m.start())
        if start < 8:
            continue
        length = int.from_bytes(data[start - 8 : start], "little")
        if 2 <= length <= 100 * 1024 * 1024:
            return ArtifactHit("safetensors", start - 8, f"dtype {m.group(1).decode()}")
    return None


def _header_formats(data: bytes) -> ArtifactHit | None:
    # each signature's fixed bytes are looked for first (memmem): most bodies have none
    if b'"dtype"' in data and (hit := _safetensors(data)):
        return hit
    if b"GGUF" in data and (m := _GGUF.search(data)):
        return ArtifactHit("gguf", m.start(), f"version {data[m.start() + 4]}")
    if b"PK\x03\x04" in data and (m := _ZIP_TORCH.search(data)):
        return ArtifactHit("pytorch_zip", m.start(), "zip with a pickled tensor archive")
    if b"\x80" not in data:
        return None
    for m in _PICKLE.finditer(data):
        window = data[m.start() : m.start() + 4096]
        if _PICKLE_TENSOR.search(window):
            return ArtifactHit("pickle", m.start(), f"pickle protocol {data[m.start() + 1]}")
    return None


def _byte_entropy(values: np.ndarray) -> float:
    counts = np.bincount(values, minlength=256).astype(np.float64)
    p = counts[counts > 0] / values.size
    return float(-(p * np.log2(p)).sum())


def _float_run(data: bytes) -> ArtifactHit | None:
    n = len(data) & ~3
    if n < MIN_FLOAT_BYTES or data.isascii():  # weights have bytes >= 0x80 throughout
        return None
    raw = np.frombuffer(data[:n], dtype=np.uint8)
    # text and markup have almost no bytes >= 0x80; weights have half of them there
    high = raw[3::4]
    if np.count_nonzero(high & 0x80) < 0.2 * high.size:
        return None
    f32 = np.frombuffer(data[:n], dtype="<u4")
    sign = float(np.mean(f32 >> 31))
    if SIGN_BALANCE[0] <= sign <= SIGN_BALANCE[1]:
        exps = np.bincount(((f32 >> 23) & 0xFF).astype(np.intp), minlength=256)
        top = float(np.sort(exps)[-8:].sum()) / f32.size
        if top >= F32_EXPONENT_TOP8 and _byte_entropy(raw[0::4]) >= MANTISSA_MIN_ENTROPY:
            return ArtifactHit("float32", 0, f"{f32.size} values, exponent top-8 share {top:.2f}")
    f16 = np.frombuffer(data[:n], dtype="<u2")
    sign = float(np.mean(f16 >> 15))
    if SIGN_BALANCE[0] <= sign <= SIGN_BALANCE[1]:
        exps = np.bincount(((f16 >> 10) & 0x1F).astype(np.intp), minlength=32)
        top = float(np.sort(exps)[-6:].sum()) / f16.size
        if top >= F16_EXPONENT_TOP6 and _byte_entropy(raw[0::2]) >= MANTISSA_MIN_ENTROPY:
            return ArtifactHit("float16", 0, f"{f16.size} values, exponent top-6 share {top:.2f}")
    return None


def detect(data: bytes) -> ArtifactHit | None:
    """The first model-artifact signature in `data`, or None."""
    if not data:
        return None
    return _header_formats(data) or _float_run(data)
