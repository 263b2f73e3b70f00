"""The header's own guard (issue 16.4): a -D override outside the range lt_types.h
gives it fails the BPF build with the limit's name, whoever bypasses the Python
checks (the ranges are the same ones abi.limit reads)."""

from __future__ import annotations

import pytest

from leaktap.controller.kernel import abi
from leaktap.controller.kernel.loader import (
    KERNEL_LIMITS,
    MODE_SOURCES,
    SSL_LIMITS,
    KernelOptions,
    _bcc,
    expand_source,
)

pytestmark = pytest.mark.kernel


def _build(overrides: dict[str, int]) -> None:
    cflags = [f for f in KernelOptions().cflags() if f.split("=")[0][2:] not in overrides]
    cflags += [f"-D{name}={value}" for name, value in overrides.items()]
    _bcc()(text=expand_source(MODE_SOURCES["tc"]).encode(), cflags=cflags + ["-Wno-unused-value"])


@pytest.mark.parametrize(("name", "value"), [
    ("LT_RINGBUF_PAGES", 3),
    ("LT_RINGBUF_PAGES", abi.limit("LT_RINGBUF_PAGES").ceil * 2),
    ("LT_FLOWS_MAX", abi.limit("LT_FLOWS_MAX").floor - 1),
    ("LT_HELLO_SEGS_MAX", abi.limit("LT_HELLO_SEGS_MAX").ceil + 1),
    ("LT_SSL_RINGBUF_PAGES", 3),
    ("LT_SSL_SNAP", abi.limit("LT_SSL_SNAP").floor - 1),
])
def test_out_of_range_override_fails_the_build(
        name: str, value: int, capfd: pytest.CaptureFixture[str]) -> None:
    assert name in {*KERNEL_LIMITS.values(), *SSL_LIMITS.values()}
    with pytest.raises(Exception, match="[Ff]ailed to compile"):
        _build({name: value})
    assert f'#error "{name}' in capfd.readouterr().err
