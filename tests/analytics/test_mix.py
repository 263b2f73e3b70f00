"""The out/in mix bank (issue 18.1) on hand-built series: a tenant whose minute volume is
very noisy (log-noise 0.9) but whose responses follow its requests (log-noise 0.25 on
bytes in over bytes out), as ordinary API calls do. A short upload (3x, requests without
responses) is invisible in the volume at that noise and plain in the mix; a big read, a
busy spell of ordinary calls and the noise itself must raise nothing."""

from __future__ import annotations

import numpy as np
import pytest

from leaktap.analytics.buckets import Bucket
from leaktap.analytics.incidents import Incident
from leaktap.analytics.settings import DetectionSettings, VolumeSettings
from tests.analytics.test_subtle import MONDAY, W3, incidents_by_tenant, tenant_rates

UPLOAD_AT = W3 + 1440 + 14 * 60 + 7  # Tuesday 14:07 of the third week
UPLOAD_MINUTES = 6
SPELL_AT = W3 + 3 * 1440 + 11 * 60  # Thursday 11:00
DRIP_AT = W3 + 2 * 1440 + 9 * 60  # Wednesday 09:00
DRIP_MINUTES = 8 * 60
SPELL_MINUTES = 20


def _streams() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tenant: bytes out and in per minute of three weeks."""
    streams = {}
    for seed, name in enumerate(("upload", "download", "busy", "quiet", "drip")):
        rng = np.random.default_rng(seed + 1900)
        out = tenant_rates(rng, sigma=0.9)
        inb = 1.5 * out * np.exp(rng.normal(0, 0.25, out.shape[0]))
        if name == "upload":  # bytes out only: acknowledgements come back
            span = slice(UPLOAD_AT, UPLOAD_AT + UPLOAD_MINUTES)
            added = 2.0 * out[span]
            out[span] += added
            inb[span] += 0.02 * added
        elif name == "drip":  # 1.35x for 8 hours, uploads only
            span = slice(DRIP_AT, DRIP_AT + DRIP_MINUTES)
            added = 0.35 * out[span]
            out[span] += added
            inb[span] += 0.02 * added
        elif name == "download":  # a big read: far more in for the same requests
            inb[SPELL_AT:SPELL_AT + SPELL_MINUTES] *= 4.0
        elif name == "busy":  # three times the usual calls, each with its response
            out[SPELL_AT:SPELL_AT + SPELL_MINUTES] *= 3.0
            inb[SPELL_AT:SPELL_AT + SPELL_MINUTES] *= 3.0
        streams[name] = (out, inb)
    return streams


def _run(settings: DetectionSettings) -> dict[str, list[Incident]]:
    rows = sorted(
        (Bucket(MONDAY + 60 * int(m), name, "hubspot", f"{name}-prod", int(out[m]), int(inb[m]))
         for name, (out, inb) in _streams().items() for m in np.flatnonzero(out + inb >= 1)),
        key=lambda b: b.ts)
    return incidents_by_tenant(rows, settings)


@pytest.fixture(scope="module")
def with_mix() -> dict[str, list[Incident]]:
    return _run(DetectionSettings())


@pytest.fixture(scope="module")
def without_mix() -> dict[str, list[Incident]]:
    return _run(DetectionSettings(volume=VolumeSettings(mix_enabled=False)))


def test_a_short_upload_hidden_in_the_volume_noise_pages_by_its_mix(
    with_mix: dict[str, list[Incident]], without_mix: dict[str, list[Incident]],
) -> None:
    assert without_mix.get("upload", []) == []  # 3x for 6 minutes at log-noise 0.9
    pages = with_mix.get("upload", [])
    assert len(pages) == 1, [i.summary for i in pages]
    page = pages[0]
    start = MONDAY + 60 * UPLOAD_AT
    assert start <= page.raised_ts <= start + 60 * (UPLOAD_MINUTES + 2)
    evidence = page.evidence
    assert evidence["detector"] == "mix" and evidence["window_minutes"] <= 15
    assert evidence["window_observed_bytes"] >= 1.5 * evidence["window_expected_bytes"] > 0
    assert evidence["score"] >= 1.0 and "(mix, score" in page.summary
    assert page.first_ts >= start - 60 * 15


def test_a_throttled_upload_below_the_short_windows_gate_pages_by_a_long_mix_window(
    with_mix: dict[str, list[Incident]],
) -> None:
    """1.35x sits below the short mix windows' 1.5x bytes gate: a long window, gated at the
    volume windows' 1.2x, tells it within the drip's first three hours (measured: the 3 h
    window at 1.46x, 105 minutes in; under a 1.5x gate that window could not page)."""
    pages = with_mix.get("drip", [])
    assert len(pages) == 1, [i.summary for i in pages]
    page = pages[0]
    start = MONDAY + 60 * DRIP_AT
    assert start <= page.raised_ts <= start + 3 * 3600
    evidence = page.evidence
    assert evidence["detector"] == "mix" and evidence["window_minutes"] >= 60, evidence
    observed, expected = evidence["window_observed_bytes"], evidence["window_expected_bytes"]
    assert 1.2 * expected <= observed < 1.5 * expected, evidence


def test_reads_busy_spells_and_noise_raise_nothing(
    with_mix: dict[str, list[Incident]], without_mix: dict[str, list[Incident]],
) -> None:
    for name in ("download", "busy", "quiet"):
        assert with_mix.get(name, []) == [], [i.summary for i in with_mix[name]]
        assert without_mix.get(name, []) == []
