"""Window tests at several time scales at once (issue 18): bursts of minutes to drips of a day.

Each minute every series contributes a standardised log residual u (observed against
its seasonal expectation, divided by the slot's robust noise scale, clipped so that one
idle or one huge minute cannot decide a window; an idle minute counts at the low clip),
less the series' usual u at that quarter hour of the UTC day (optional, `_debias`: the
fit's misfit that repeats every day). For every window length w of the bank the test
statistic is

    D_w = mean of u over the last w minutes - m(start of the window)

where m is a slow running level of u (a few hours' half-life): it absorbs what the
seasonal fit misses (today's level, growth since the fit) but is read where the window
starts, so a drip never hides itself (optionally it also learns at SUSPECT_WEIGHT of its
rate while the series is under suspicion). D_w is divided by the series' own running
scale of D_w (mean absolute value, learned online), which folds in the autocorrelation
and the level noise at that length; with `by_hour` learned per UTC hour of the day the
window ends at, since windows across a series' day boundary (where its level steps) are
far noisier than the rest (optionally never below a share of the fit's hour-to-hour
level noise). Thresholds
are split Bonferroni-style over the scales and over the ~10080/w independent windows of
a week, so that the bank as a whole is aimed at `alpha` false alarms per series-week
(the noise has heavier tails than a Gaussian: the default alpha is set low for that).
Cost per minute: a few numpy calls on (scales x series) arrays. Windows up to BLOCK
minutes run on a minute ring; longer ones (multiples of BLOCK) on a ring of BLOCK-minute
sums plus the open block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

BLOCK = 15  # minutes per block of the long-window ring
WEEK_MINUTES = 7 * 24 * 60
_MEAN_ABS_TO_SIGMA = math.sqrt(math.pi / 2)
U, OUT, EXP, COUNT, EXP_WIDE = range(5)  # rows of the summed quantities
ROWS = 5
MIN_LEARNED_MINUTES = 1440
SUSPECT_WEIGHT = 0.25  # learning rate of the levels while a series is under suspicion
RECORD_DAYS = 7  # days of the series' own record of window scores (before today)
DAY_MINUTES = 1440
HOURS_PER_DAY = 24
HOUR_MIN_DAYS = 4  # days an hour-of-day scale learns before it is used
HOUR_SHARE = 0.5  # an hour-of-day scale is never below this share of the all-day one
BLOCKS_PER_DAY = DAY_MINUTES // BLOCK
BLOCKS_PER_HOUR = 60 // BLOCK
BIAS_PRIOR_MINUTES = 45.0  # a block's bias is shrunk by 45 / (45 + minutes learned): 3 days


def thresholds(windows: list[int], alpha: float) -> FloatArray:
    """Per window: the z that a Gaussian statistic exceeds alpha / (scales x windows a week)
    of the time, so the bank as a whole keeps about `alpha` false alarms per series-week."""
    normal = NormalDist()
    k = len(windows)
    return np.array([normal.inv_cdf(1.0 - alpha / (k * WEEK_MINUTES / w)) for w in windows])


@dataclass
class BankHits:
    """Series that crossed a threshold this minute, with the strongest window of each."""

    index: npt.NDArray[np.int64]
    window: npt.NDArray[np.int64]  # minutes the window held
    score: FloatArray  # z / threshold of that window (>= 1)
    z: FloatArray
    observed: FloatArray  # bytes out over the window
    expected: FloatArray  # expected bytes over the window
    mix: BoolArray | None = None  # per hit: told by the out/in mix test (None: none was)


class ScaleBank:
    """Streaming state of the window bank for every series (series on the last axis)."""

    def __init__(
        self, windows: list[int], alpha: float, capacity: int, ref_halflife: float,
        scale_halflife: float, suspect_fraction: float, freeze_limit: int, level_share: float,
        record_margin: float = 0.0, record_days: int = RECORD_DAYS, by_hour: bool = False,
        bias_halflife_days: float = 0.0,
    ) -> None:
        """`record_margin`: a window pages only above this multiple of the highest score it
        reached on the `record_days` days before today (0: no such test). `by_hour`: each
        window's scale is learned per hour of the day as well (see `_hour_scale`).
        `bias_halflife_days`: each series' residual is first corrected by its usual offset
        at that quarter hour of the day (see `_debias`; 0: no correction)."""
        self.windows = sorted(windows)
        self.short = [w for w in self.windows if w <= BLOCK]
        self.long = [w for w in self.windows if w > BLOCK]
        if any(w % BLOCK for w in self.long):
            raise ValueError(f"windows longer than {BLOCK} minutes must be multiples of it")
        self.h = thresholds(self.windows, alpha)
        self.suspect_h = suspect_fraction * self.h
        self._h_col, self._suspect_col = self.h[:, None], self.suspect_h[:, None]
        self.n_blocks = (max(self.long) // BLOCK if self.long else 0) + 1
        self.freeze_limit = freeze_limit
        self._alpha_ref = 1.0 - 0.5 ** (1.0 / ref_halflife)
        self._alpha_scale = 1.0 - 0.5 ** (1.0 / scale_halflife)
        # where each window starts, in blocks back from the open one (short: see _ref_rows)
        self._long_back = np.array([w // BLOCK for w in self.long], dtype=np.int64)
        self._short_len = np.array(self.short, dtype=np.int64)
        k = len(self.windows)
        # the floor of each scale: what iid minutes alone would give
        self._level_share = np.where(np.array(self.windows) >= 60, level_share, 0.0)[:, None]
        self._min_learned = (MIN_LEARNED_MINUTES + 2 * np.array(self.windows))[:, None]
        self._scale_floor = 0.5 / np.sqrt(np.array(self.windows, dtype=np.float64))[:, None]
        # per minute of the block (what `step` would otherwise rebuild every minute): the
        # ring rows the short windows drop, each window's length so far, the count that
        # makes it full, and where it starts in blocks relative to the open block
        positions = np.arange(BLOCK)[:, None]
        self._short_old = (positions - self._short_len) % BLOCK
        self._minutes = np.concatenate([np.broadcast_to(self._short_len, (BLOCK, len(self.short))),
                                        self._long_back * BLOCK + positions + 1], axis=1)
        self._full_at = (0.75 * self._minutes)[:, :, None]
        self._start_off = np.concatenate([
            np.broadcast_to((positions - self._short_len + 1) // BLOCK, (BLOCK, len(self.short))),
            np.broadcast_to(-self._long_back, (BLOCK, len(self.long)))], axis=1)
        self._cap = 0
        self.ring = np.zeros((ROWS, BLOCK, 0))
        self.blocks = np.zeros((ROWS, self.n_blocks, 0))
        self.snap = np.zeros((self.n_blocks, 0))
        self.short_sums = np.zeros((ROWS, len(self.short), 0))
        self.long_sums = np.zeros((ROWS, len(self.long), 0))
        self.open_block = np.zeros((ROWS, 0))
        self._is_short = (np.array(self.windows) <= BLOCK)[:, None]
        self.ref = np.zeros(0)
        # per window and UTC hour of the day the window ends at: the scale learned on those
        # windows alone, and how many minutes it has learned from; the row after the hours
        # is the scale over all hours (`scale`, `learned`). One array each, so that a minute
        # updates the hour's row and the all-day row in one pass (a strided view of both).
        self.by_hour = by_hour
        self._hours = HOURS_PER_DAY if by_hour else 0
        self._scales = np.ones((k, self._hours + 1, 0))
        self._learned = np.zeros((k, self._hours + 1, 0))
        self._views()
        self._pooled = np.zeros((k, 0))  # the scales in use, re-pooled every block
        self.suspect_run = np.zeros(0, dtype=np.int64)
        # the series' own record: per window, the highest tested score of each of the last
        # days (a ring, today's row included) and the highest of the days before today
        self.record_margin = record_margin
        self.day_max = np.full((k, record_days + 1, 0), -np.inf)
        self.record = np.full((k, 0), -np.inf)
        self._day = 0
        # per quarter hour of the UTC day and series: the usual residual against the running
        # level there (the seasonal fit's systematic misfit: ramps, the shape within an hour)
        # and how many minutes it has learned from
        self._alpha_bias = (1.0 - 0.5 ** (1.0 / (bias_halflife_days * BLOCK))
                            if bias_halflife_days > 0 else 0.0)
        self.bias = np.zeros((BLOCKS_PER_DAY, 0))
        self.bias_learned = np.zeros((BLOCKS_PER_DAY, 0))
        # diagnostics only (perf/diagnose_subtle.py): called each minute with the bank's view
        self.trace: Callable[[int, dict[str, np.ndarray]], None] | None = None
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        extra = capacity - self._cap

        def wider(array: np.ndarray, fill: float = 0.0) -> np.ndarray:
            pad = np.full((*array.shape[:-1], extra), fill, dtype=array.dtype)
            return np.concatenate([array, pad], axis=-1)

        self.ring, self.blocks, self.snap = wider(self.ring), wider(self.blocks), wider(self.snap)
        self.short_sums, self.long_sums = wider(self.short_sums), wider(self.long_sums)
        self.open_block, self.ref = wider(self.open_block), wider(self.ref)
        self._scales, self._learned = wider(self._scales, 1.0), wider(self._learned)
        self._views()
        self.suspect_run = wider(self.suspect_run)
        self.day_max, self.record = wider(self.day_max, -np.inf), wider(self.record, -np.inf)
        self.bias, self.bias_learned = wider(self.bias), wider(self.bias_learned)
        self._cap = capacity

    def _views(self) -> None:
        """`hour_scale`/`hour_learned` (window, hour, series) and `scale`/`learned` (window,
        series, over all hours): views of the combined arrays."""
        hours = self._hours
        self.hour_scale, self.scale = self._scales[:, :hours], self._scales[:, hours]
        self.hour_learned, self.learned = self._learned[:, :hours], self._learned[:, hours]

    def clear(self, series: npt.NDArray[np.int64]) -> None:
        """Back to a new series' state (a freed slot, before it is reused)."""
        for array in (self.ring, self.blocks, self.snap, self.short_sums, self.long_sums,
                      self.open_block, self.ref, self.learned, self.suspect_run):
            array[..., series] = 0
        self.scale[:, series] = 1.0
        self.hour_scale[..., series] = 1.0
        self.hour_learned[..., series] = 0.0
        self._pooled[:, series[series < self._pooled.shape[1]]] = 1.0
        self.day_max[..., series] = -np.inf
        self.record[:, series] = -np.inf
        self.bias[:, series] = 0.0
        self.bias_learned[:, series] = 0.0

    def reset(self, series: npt.NDArray[np.int64]) -> None:
        """After an episode: no window may page again on the episode's own minutes."""
        self.ring[..., series] = 0.0
        self.blocks[..., series] = 0.0
        self.short_sums[..., series] = 0.0
        self.long_sums[..., series] = 0.0
        self.open_block[..., series] = 0.0
        self.snap[:, series] = self.ref[series]
        self.suspect_run[series] = 0

    def _update_record(
        self, minute_index: int, z: FloatArray, tested: BoolArray, n: int,
    ) -> FloatArray:
        """Keep each window's highest tested score per day; return the bar a score must clear
        by the series' own record: `record_margin` times the highest of the days before
        today (today's excluded, so an attack building up does not raise its own bar).
        Called only with a record_margin."""
        day = minute_index // DAY_MINUTES
        days = self.day_max.shape[1]
        if day != self._day:
            self._day = day
            self.day_max[:, day % days, :] = -np.inf
            others = np.delete(self.day_max, day % days, axis=1)
            self.record = others.max(axis=1)
        today = self.day_max[:, day % days, :n]
        np.maximum(today, np.where(tested, z, -np.inf), out=today)
        # bursts (the short windows) are judged on their scale alone: a week's record of
        # minute-scale windows is set by single noisy minutes
        return np.where(self._is_short, 0.0, self.record_margin * self.record[:, :n])

    def _debias(self, u: FloatArray, count: FloatArray, block: int, closing: bool) -> FloatArray:
        """u less the series' usual residual at this quarter hour of the day, shrunk while
        few days have taught it. The seasonal fit interpolates between hourly slots: on a
        ramp or a knee of the day its centre is off the same way every day, and the running
        level read at a window's start carries that misfit into every window for hours
        (measured: a typical quarter hour's mean residual 0.2 noise units off, twice the
        sampling error, on tuning seed 203). It learns the raw residual against the running
        level, so a day's level is left to the running level; the profile is kept centred
        (a common offset would be the running level's) at each quarter hour's close."""
        n = u.shape[0]
        bias, learned = self.bias[block, :n], self.bias_learned[block, :n]
        corrected: FloatArray = u - bias * (learned / (learned + BIAS_PRIOR_MINUTES))
        rate = np.maximum(1.0 / (learned + 1.0), self._alpha_bias) * count
        bias += rate * (u - self.ref[:n] - bias)
        learned += count
        if closing:
            taught = self.bias_learned[:, :n] > 0
            centre = (self.bias[:, :n] * taught).sum(axis=0) / np.maximum(taught.sum(axis=0), 1)
            self.bias[:, :n] -= centre * taught
        return corrected

    def _hour_scale(self, hour: int, scale: FloatArray, n: int) -> FloatArray:
        """The scale of windows ending at this hour of the day: where a series' level steps
        (its day boundary) windows across the step are far noisier than the rest, so one
        scale per window would be too wide by day and too narrow across the step. Pooled
        over the hour and its neighbours (root mean square), once each has learned on
        HOUR_MIN_DAYS days; never below HOUR_SHARE of the window's scale over all hours."""
        around = [(hour + d) % HOURS_PER_DAY for d in (-1, 0, 1)]
        scales = self.hour_scale[:, around, :n]
        pooled = np.sqrt((scales**2).mean(axis=1))
        ready = self.hour_learned[:, around, :n].min(axis=1) >= HOUR_MIN_DAYS * 60
        return np.where(ready, np.maximum(pooled, HOUR_SHARE * scale), scale)

    def step(
        self, minute_index: int, u: FloatArray, x: FloatArray, expected: FloatArray,
        expected_wide: FloatArray, scorable: BoolArray, warm: BoolArray, min_excess: float,
        min_ratio: FloatArray, level_noise: FloatArray, block_of_day: int = 0,
    ) -> BankHits | None:
        """Add minute `minute_index` of series 0..n-1 and test every window ending at it.
        `expected`: bytes of the minute by the seasonal fit; `expected_wide`: the same
        widened to the neighbouring hours (a batch's timing jitter), which the short windows'
        bytes must beat. `min_ratio`: per window, the least bytes out / expected to page.
        `level_noise`: per series, the fit's hour-to-hour level noise in units of u; the
        windows of an hour and longer never trust a learned scale below that share of it.
        `block_of_day`: the minute's quarter hour of the UTC day (its hour: `by_hour`)."""
        n = u.shape[0]
        hour_of_day = block_of_day // BLOCKS_PER_HOUR
        count = scorable.astype(np.float64)
        if self._alpha_bias:
            u = self._debias(u, count, block_of_day, minute_index % BLOCK == BLOCK - 1)
        value = np.array([u, x, expected, count, expected_wide], dtype=np.float64)
        value *= count  # count * count is count
        pos = minute_index % BLOCK
        block = minute_index // BLOCK
        ring = self.ring[:, :, :n]
        if self.short:
            short_sums = self.short_sums[:, :, :n]
            short_sums += value[:, None] - ring[:, self._short_old[pos]]
        ring[:, pos] = value
        open_block = self.open_block[:, :n]
        open_block += value
        sums = self.long_sums[:, :, :n] + open_block[:, None]
        if self.short:
            sums = np.concatenate([short_sums, sums], axis=1)
        minutes = self._minutes[pos]
        # the running level where each window starts (short windows: their block's start)
        reference = self.snap[(block + self._start_off[pos]) % self.n_blocks, :n]
        seen = sums[COUNT]
        full = seen >= self._full_at[pos]
        deviation = sums[U] / np.maximum(seen, 1.0) - reference
        scale = self.scale[:, :n]
        if self.by_hour:
            # pooled once a block: the hour scales move slowly, and pooling costs a few copies
            if pos == 0 or self._pooled.shape[1] != n:
                self._pooled = self._hour_scale(hour_of_day, scale, n)
            used = self._pooled
        else:
            used = scale
        z = deviation / np.maximum(used, self._level_share * level_noise)
        learned = self.learned[:, :n]
        # a window is tested only once its scale has been learned on a day and two windows
        crossed = full & (learned >= self._min_learned) & (z >= self._suspect_col)
        suspect = crossed.any(axis=0)
        suspect_run = self.suspect_run[:n]
        suspect_run += 1
        suspect_run *= suspect
        if self.freeze_limit:
            frozen = suspect & (suspect_run <= self.freeze_limit)
            weight = np.where(frozen, SUSPECT_WEIGHT, 1.0) * scorable
        else:  # nothing is ever frozen: each scorable minute weighs 1
            weight = count

        # learn the scale of each window from every full window, suspicious ones included:
        # leaving out the high ones would truncate the tail and shrink the scale (each large
        # deviation is capped at three scales, so one attack barely moves it). The hour's
        # scale and the all-day one learn alike, in one pass: a view of both rows.
        rows = (slice(hour_of_day, self._hours + 1, self._hours - hour_of_day) if self.by_hour
                else slice(0, 1))
        scales, counts = self._scales[:, rows, :n], self._learned[:, rows, :n]
        calm = full[:, None]
        rate = np.maximum(1.0 / (counts + 1.0), self._alpha_scale) * calm
        target = np.minimum((np.abs(deviation) * _MEAN_ABS_TO_SIGMA)[:, None], 3.0 * scales)
        scales += rate * (target - scales)
        np.maximum(scales, self._scale_floor[:, :, None], out=scales)
        counts += calm
        # the level is down-weighted, not frozen, under suspicion: a real change of level
        # (a refit, growth the fit did not know) is still followed, only more slowly
        ref = self.ref[:n]
        ref += self._alpha_ref * (u - ref) * weight

        if pos == BLOCK - 1:  # the block closes: it enters the long windows
            slot = block % self.n_blocks
            blocks = self.blocks[:, :, :n]
            for k, back in enumerate(self._long_back.tolist()):
                self.long_sums[:, k, :n] += open_block - blocks[:, (block - back) % self.n_blocks]
            blocks[:, slot] = open_block
            self.snap[(block + 1) % self.n_blocks, :n] = ref
            open_block[:] = 0.0

        record = (
            self._update_record(minute_index, z, full & (learned >= self._min_learned), n)
            if self.record_margin else None
        )
        if self.trace is not None:
            self.trace(minute_index, {
                "z": z, "deviation": deviation, "scale": used.copy(),
                "floor": np.broadcast_to(self._level_share * level_noise, z.shape),
                "tested": full & (learned >= self._min_learned), "out": sums[OUT],
                "exp": sums[EXP], "exp_wide": sums[EXP_WIDE], "reference": reference,
                "ref": ref.copy(), "warm": warm,
                "record": np.broadcast_to(0.0 if record is None else record, z.shape)})
        # the thresholds first: they are rarely crossed, the bytes gates cost more
        hit = crossed & (z >= self._h_col) & warm
        if not hit.any():
            return None
        if record is not None:
            hit &= z >= record
        hit &= (sums[OUT] - sums[EXP] >= min_excess) & (
            sums[OUT] >= min_ratio * np.where(self._is_short, sums[EXP_WIDE], sums[EXP]))
        if not hit.any():
            return None
        index = np.flatnonzero(hit.any(axis=0))
        ratio = np.where(hit[:, index], z[:, index] / self.h[:, None], 0.0)
        best = ratio.argmax(axis=0)
        return BankHits(
            index=index.astype(np.int64), window=minutes[best].astype(np.int64),
            score=ratio[best, np.arange(len(index))], z=z[best, index],
            observed=sums[OUT][best, index], expected=sums[EXP][best, index],
        )
