"""One source for each kernel limit (issue 16.4): the defaults and ranges the loader
and the configuration use are the ones bpf/include/lt_types.h defines, and a value
outside them is refused at config load with the file and line."""

from __future__ import annotations

import re

import pytest

from leaktap.controller.config import KernelConfig, parse_config
from leaktap.controller.errors import ConfigError, ProbeLoadError
from leaktap.controller.kernel import abi
from leaktap.controller.kernel.loader import (
    KERNEL_LIMITS,
    SSL_LIMITS,
    KernelOptions,
    SslOptions,
)

# the loader's options classes and the limits each compiles in
OPTIONS: list[tuple[type[KernelOptions] | type[SslOptions], dict[str, str]]] = [
    (KernelOptions, KERNEL_LIMITS), (SslOptions, SSL_LIMITS)]
# <section>.<key> in the configuration -> the -D it sets
CONFIG_KEYS = {
    "kernel.flows_max": "LT_FLOWS_MAX",
    "kernel.ringbuf_pages": "LT_RINGBUF_PAGES",
    "kernel.hello_segments_max": "LT_HELLO_SEGS_MAX",
    "plaintext.max_bytes": "LT_SSL_SNAP",
    "plaintext.events_per_second": "LT_SSL_EVENTS_PER_SEC",
}


def header_limits() -> dict[str, tuple[int, int, int, bool]]:
    """name -> (default, floor, ceil, power of two), read from the header text with
    a scan of its own (not abi.py's parser)."""
    text = abi.header_path().read_text()
    values: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"#define (LT_[A-Z0-9_]+) (\d+)(?:\s|/\*|$)", line.strip())
        if m and m.group(1) not in values:
            values[m.group(1)] = int(m.group(2))
    return {
        name: (values[name], values[f"{name}_FLOOR"], values[f"{name}_CEIL"],
               values.get(f"{name}_POW2") == 1)
        for _, limits in OPTIONS for name in limits.values()
    }


def test_every_compiled_limit_has_its_range_in_the_header() -> None:
    for name, (default, floor, ceil, pow2) in header_limits().items():
        limit = abi.limit(name)
        assert (limit.default, limit.floor, limit.ceil, limit.power_of_two) == (
            default, floor, ceil, pow2), name
        assert floor <= default <= ceil, name
    assert abi.limit("LT_RINGBUF_PAGES").power_of_two


def test_loader_and_config_defaults_are_the_headers() -> None:
    header = header_limits()
    for cls, limits in OPTIONS:
        options = cls()
        for option, name in limits.items():
            assert getattr(options, option) == header[name][0], option
            assert f"-D{name}={header[name][0]}" in options.cflags()
    config = parse_config("")
    for dotted, name in CONFIG_KEYS.items():
        section, key = dotted.split(".")
        assert getattr(getattr(config, section), key) == header[name][0], dotted
    assert KernelConfig().flows_max == header["LT_FLOWS_MAX"][0]


def _option_of(name: str) -> tuple[type[KernelOptions] | type[SslOptions], str]:
    return next((cls, o) for cls, limits in OPTIONS for o, n in limits.items() if n == name)


@pytest.mark.parametrize("dotted", sorted(CONFIG_KEYS))
def test_config_accepts_exactly_the_headers_range(dotted: str) -> None:
    section, key = dotted.split(".")
    default, floor, ceil, pow2 = header_limits()[CONFIG_KEYS[dotted]]
    cls, option = _option_of(CONFIG_KEYS[dotted])
    for good in (floor, ceil, default):
        config = parse_config(f"{section}:\n  {key}: {good}\n")
        assert getattr(getattr(config, section), key) == good
        cls(**{option: good})  # type: ignore[arg-type]
    bad_values = [floor - 1, ceil + 1] + ([floor + 2] if pow2 else [])
    for bad in bad_values:
        with pytest.raises(ConfigError) as info:
            parse_config(f"# sizes\n{section}:\n  {key}: {bad}\n", "node.yaml")
        assert str(info.value).startswith(f"node.yaml:3: {dotted}: must be "), info.value
        with pytest.raises(ProbeLoadError):
            cls(**{option: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize(("cls", "option", "name"), [
    (cls, option, name) for cls, limits in OPTIONS for option, name in limits.items()])
def test_loader_refuses_what_the_header_refuses(
        cls: type[KernelOptions] | type[SslOptions], option: str, name: str) -> None:
    limit = abi.limit(name)
    for good in (limit.floor, limit.ceil):
        cls(**{option: good})  # type: ignore[arg-type]
    for bad in (limit.floor - 1, limit.ceil + 1, "64"):
        with pytest.raises(ProbeLoadError, match=f"^{option} must be"):
            cls(**{option: bad})  # type: ignore[arg-type]


def test_ringbuf_pages_three_fails_at_load_with_file_and_line() -> None:
    _, floor, ceil, _ = header_limits()["LT_RINGBUF_PAGES"]
    with pytest.raises(ConfigError) as info:
        parse_config("mode: tc\nkernel: {flows_max: 4096, ringbuf_pages: 3}\n", "leaktap.yaml")
    assert str(info.value) == (
        f"leaktap.yaml:2: kernel.ringbuf_pages: must be a power of two in {floor}..{ceil}, not 3")


def test_loss_remedies_quote_the_headers_sizes() -> None:
    from leaktap.controller.kernel.loss import REMEDIES

    defines = abi.defines()
    text = REMEDIES["loss_truncated"]
    assert f"DNS > {defines['LT_DNS_SNAP']} B" in text
    assert f"hello > {defines['LT_HELLO_CHUNKS']} chunks" in text
