"""The window bank (issue 18) on its own: thresholds, a drip it must see, noise it must not."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from leaktap.analytics.scales import ScaleBank, thresholds

WINDOWS = [5, 15, 60, 180, 360, 720, 1440]


def test_thresholds_split_alpha_over_scales_and_windows_a_week() -> None:
    h = thresholds(WINDOWS, 1e-4)
    assert list(h) == sorted(h, reverse=True)  # short windows: more chances, higher bar
    # alpha shared by 7 scales, each over 10080 / w windows a week
    normal = NormalDist()
    assert abs(h[0] - normal.inv_cdf(1 - 1e-4 / (7 * 10080 / 5))) < 1e-9  # 5.67
    assert abs(h[-1] - normal.inv_cdf(1 - 1e-4 / (7 * 10080 / 1440))) < 1e-9  # 4.61
    assert (thresholds(WINDOWS, 1e-2) < h).all()


def _run(shift: float, days: float = 4.0, drip_minutes: int = 720) -> list[tuple[int, int, int]]:
    """Two series of iid N(0, 1) residuals; series 0 shifts by `shift` (in noise units) for
    the last `drip_minutes`. Returns (minute, series, window) of every hit."""
    rng = np.random.default_rng(5)
    bank = ScaleBank(WINDOWS, 1e-4, 2, ref_halflife=240, scale_halflife=10_080,
                     suspect_fraction=0.6, freeze_limit=1440, level_share=0.0)
    total = int(days * 1440)
    expected = np.full(2, 1e6)
    hits = []
    for minute in range(total):
        u = rng.normal(0, 1, 2)
        if minute >= total - drip_minutes:
            u[0] += shift
        x = expected * np.exp(0.3 * u)
        found = bank.step(minute, u, x, expected, expected, np.ones(2, dtype=bool),
                          np.full(2, minute >= 3 * 1440), 0.0,
                          np.ones((len(WINDOWS), 1)), np.zeros(2))
        if found is not None:
            hits += [(minute, int(i), int(w)) for i, w in
                     zip(found.index.tolist(), found.window.tolist(), strict=True)]
    return hits


def test_a_drip_of_a_third_of_the_noise_is_seen_by_a_long_window_and_calm_stays_calm() -> None:
    hits = _run(shift=0.35)  # 1.11x at 0.3 log-noise a minute, for 12 hours
    assert {series for _, series, _ in hits} == {0}
    first = min(minute for minute, _, _ in hits)
    assert first - (4 * 1440 - 720) <= 360  # within 6 hours of the drip's start
    assert max(window for *_, window in hits) >= 180


def test_no_shift_no_hit() -> None:
    assert _run(shift=0.0) == []
