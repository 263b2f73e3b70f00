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


def _run_with_misfit(bias_days: float) -> tuple[ScaleBank, list[tuple[int, int, int]], int]:
    """Two series of iid N(0, 1) residuals plus the same misfit every day: +1.2 noise units
    over 07:00-09:00 (a ramp's knee the hourly fit cuts across). Series 0 drips by 0.35 from
    04:00 for 12 hours on the last day. Returns the bank, the hits and the drip's start.
    The scales learn from the first day, while the profile has not learned the misfit yet."""
    rng = np.random.default_rng(11)
    bank = ScaleBank(WINDOWS, 1e-4, 2, ref_halflife=240, scale_halflife=10_080,
                     suspect_fraction=0.6, freeze_limit=0, level_share=0.0, by_hour=True,
                     bias_halflife_days=bias_days)
    days = 12
    start = (days - 1) * 1440 + 4 * 60
    expected = np.full(2, 1e6)
    hits = []
    for minute in range(days * 1440):
        block = (minute // 15) % 96
        u = rng.normal(0, 1, 2) + (1.2 if 28 <= block < 36 else 0.0)
        if start <= minute < start + 720:
            u[0] += 0.35
        x = expected * np.exp(0.3 * u)
        found = bank.step(minute, u, x, expected, expected, np.ones(2, dtype=bool),
                          np.full(2, minute >= 9 * 1440), 0.0,
                          np.ones((len(WINDOWS), 1)), np.zeros(2),
                          block_of_day=block)
        if found is not None:
            hits += [(minute, int(i), int(w)) for i, w in
                     zip(found.index.tolist(), found.window.tolist(), strict=True)]
    return bank, hits, start


def test_a_misfit_repeating_every_day_is_learned_and_taken_off_before_the_windows() -> None:
    """The quarter-hour profile learns the daily misfit, so the windows around it see the
    noise alone: their learned scales halve (measured 0.12 against 0.22 for 6 hours), and
    the drip's windows are judged against that."""
    bank, hits, start = _run_with_misfit(bias_days=7.0)
    # the profile is centred: the knee's eight quarter hours stand 1.2 above the rest
    knee = bank.bias[28:36, 1].mean() - np.delete(bank.bias[:, 1], range(28, 36)).mean()
    assert abs(knee - 1.2) < 0.2, knee
    plain, without, _ = _run_with_misfit(bias_days=0.0)
    long = [WINDOWS.index(w) for w in (180, 360, 720)]
    assert (bank.scale[long, 1] < 0.65 * plain.scale[long, 1]).all(), (
        bank.scale[long, 1], plain.scale[long, 1])
    # the windows over the knee (ending 08:00-10:00) above all
    assert (bank.hour_scale[3, 8:10, 1] < 0.5 * plain.hour_scale[3, 8:10, 1]).all()
    assert {series for _, series, _ in hits + without} <= {0}  # the calm series stays calm
    assert all(minute >= start for minute, _, _ in hits)
