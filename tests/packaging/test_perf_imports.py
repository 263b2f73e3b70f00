"""Every perf/ benchmark still imports: no test runs them (they are timed, long and
need a quiet machine), so a moved module would otherwise break one unnoticed."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parents[2] / "perf"
BENCHES = sorted(p.stem for p in PERF.glob("*.py") if p.stem != "__init__")


def test_the_benchmarks_are_found() -> None:
    assert len(BENCHES) >= 15 and "bench_tc_cost" in BENCHES


@pytest.mark.parametrize("name", BENCHES)
def test_benchmark_imports(name: str) -> None:
    module = importlib.import_module(f"perf.{name}")
    assert module.__doc__, f"perf/{name}.py says what it measures in its docstring"
