"""Shared fixtures: small fixed-seed scenarios run once per session."""

from __future__ import annotations

import pytest

from leaktap.analytics.incidents import Incident
from leaktap.analytics.settings import DetectionSettings
from leaktap.analytics.stream import StreamingDetector
from tests.analytics import scenario

EVAL_SEEDS = (11, 12)


def run_detector(
    scen: scenario.Scenario, settings: DetectionSettings | None = None
) -> list[Incident]:
    detector = StreamingDetector(settings or DetectionSettings(), scen.allow)
    for bucket in scen.buckets():
        detector.observe(bucket)
    detector.flush()
    return detector.close_all()


@pytest.fixture(scope="session")
def evaluated() -> list[tuple[scenario.Scenario, list[Incident]]]:
    out = []
    for seed in EVAL_SEEDS:
        scen = scenario.generate(seed, n_tenants=10, weeks=4, events_per_kind=3, allow_fraction=0.3)
        out.append((scen, run_detector(scen)))
    return out
