"""Fixtures of the kernel tests; the harness itself is tests/bpf/harness.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from leaktap.controller.kernel.loader import KernelOptions
from tests.bpf.harness import (
    DEFAULT,
    RATE_3,
    RING_NAMED,
    TINY_CGROUPS,
    TINY_FLOWS,
    TINY_PENDING,
    TINY_RING,
    Harness,
    Kernel,
)


@pytest.fixture(scope="session")
def kernels() -> Iterator[Callable[..., Kernel]]:
    """Compile on first use, once per distinct (KernelOptions, mode)."""
    built: dict[tuple[KernelOptions, str], Kernel] = {}

    def get(options: KernelOptions, mode: str = "tc") -> Kernel:
        if (options, mode) not in built:
            built[options, mode] = Kernel(options, mode)
        return built[options, mode]

    yield get
    for kernel in built.values():
        kernel.close()


@pytest.fixture
def pinned_cpu() -> Iterator[int]:
    """Keep the test on one CPU: the rate limiter and flow slots are per CPU."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def _harness(kernels: Callable[[KernelOptions], Kernel], options: KernelOptions) -> Harness:
    return Harness(kernels(options))


@pytest.fixture
def tc(kernels: Callable[[KernelOptions], Kernel], pinned_cpu: int) -> Harness:
    """The default build (flows_max=4096)."""
    return _harness(kernels, DEFAULT)


@pytest.fixture
def tc_ring(kernels: Callable[[KernelOptions], Kernel], pinned_cpu: int) -> Harness:
    """A build whose ring also carries the hellos the kernel names (ring capture tests)."""
    return _harness(kernels, RING_NAMED)


@pytest.fixture
def tc_tiny_ring(kernels: Callable[[KernelOptions], Kernel], pinned_cpu: int) -> Harness:
    return _harness(kernels, TINY_RING)


@pytest.fixture
def tc_tiny_flows(kernels: Callable[[KernelOptions], Kernel], pinned_cpu: int) -> Harness:
    return _harness(kernels, TINY_FLOWS)


@pytest.fixture
def tc_rate3(kernels: Callable[[KernelOptions], Kernel], pinned_cpu: int) -> Harness:
    return _harness(kernels, RATE_3)


@pytest.fixture
def tc_tiny_pending(kernels: Callable[[KernelOptions], Kernel], pinned_cpu: int) -> Harness:
    return _harness(kernels, TINY_PENDING)


@pytest.fixture
def tc_tiny_cgroups(kernels: Callable[[KernelOptions], Kernel], pinned_cpu: int) -> Harness:
    return _harness(kernels, TINY_CGROUPS)


@pytest.fixture
def xdp(kernels: Callable[..., Kernel], pinned_cpu: int) -> Harness:
    """The XDP gateway program, same sizes as the default TC build."""
    return Harness(kernels(DEFAULT, "xdp"))


@pytest.fixture
def xdp_dedup(kernels: Callable[..., Kernel], pinned_cpu: int) -> Harness:
    """The XDP program built for a mirror port that repeats packets."""
    return Harness(kernels(KernelOptions(flows_max=4096, dedup=True), "xdp"))
