"""Per-minute volume and egress/ingress-ratio scoring, vectorised over every series.

All series advance together one minute at a time, so a minute costs a few dozen
numpy operations whatever the number of series (10,000 series: about a
millisecond). Scores are robust z-scores in log space, where multiplicative noise
is additive:

    z = (log(x + floor) - log(expected + floor)) / sigma

with `expected` the seasonal median interpolated between hour-of-week slots and
scaled by a tracked growth level, or an EWMA for a series with no week of history.
Burst: CUSUM of z beyond a minimum ratio. Spike: one huge step. Drip: windowed
sums against expected sums. Ratio: windowed log(out/in) against the slot's usual.
What only changes hourly (slot baselines times the growth level) is cached per
half hour, so a minute is a few dozen numpy calls.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from leaktap.analytics.baseline import (
    HOURS_PER_WEEK,
    MINUTES_PER_HOUR,
    FloatArray,
    SeasonalFit,
    hour_of_week,
)
from leaktap.analytics.scales import BLOCK, SUSPECT_WEIGHT, BankHits, ScaleBank
from leaktap.analytics.settings import DetectionSettings

logger = logging.getLogger(__name__)

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

SPIKE, BURST, DRIP, RATIO, WINDOW, BATCH = "spike", "burst", "drip", "ratio", "window", "batch"
MIX = "mix"  # a window of the bank on the out/in mix (on the volume or the share: WINDOW)
_SLOW_K = 0.25  # slow CUSUM, only used to date the start of a drip
_LEVEL_LIMIT = 3.0  # the growth level never claims more than e^3 = 20x
_MEAN_ABS_TO_SIGMA = math.sqrt(math.pi / 2)
_MIX_SIGMA_FLOOR = 0.05  # log units: the out/in mix's minute noise is never taken below
_MIX_CAP_AFTER = 240  # minutes the mix learns freely before its steps are capped


@dataclass
class VolumeAlarms:
    """Series in alarm this minute and what to tell about each (parallel arrays)."""

    index: IntArray
    detector: list[str]
    first_ts: IntArray
    score: FloatArray
    active: BoolArray  # the minute itself is above the baseline (moves last_ts)
    observed: FloatArray
    expected: FloatArray
    excess: FloatArray
    z: FloatArray
    seasonal: BoolArray
    weeks: IntArray
    level: FloatArray
    window: IntArray  # minutes of the window the detector judged
    window_observed: FloatArray  # bytes out over that window
    window_expected: FloatArray  # expected bytes over that window


def _slot_pair(ts: int) -> tuple[int, int, int, float]:
    """Minute ts's slot, the two slots interpolated between, and the weight of the second."""
    slot = hour_of_week(ts // 3600)
    minute = (ts // 60) % MINUTES_PER_HOUR
    # interpolate between the centres of neighbouring slots so that ramps are smooth
    if minute < 30:
        return slot, (slot - 1) % HOURS_PER_WEEK, slot, (minute + 30) / 60
    return slot, slot, (slot + 1) % HOURS_PER_WEEK, (minute - 30) / 60


def _stronger(a: BankHits | None, b: BankHits | None) -> BankHits | None:
    """Hits of two window banks, one per series: the one with the higher score."""
    if a is None or b is None:
        return a if b is None else b
    index = np.union1d(a.index, b.index)
    fields = ("window", "score", "z", "observed", "expected")
    merged = {f: np.zeros(len(index), dtype=getattr(a, f).dtype) for f in fields}
    merged["score"] = np.full(len(index), -np.inf)
    mix = np.zeros(len(index), dtype=bool)
    for hits in (a, b):
        at = np.searchsorted(index, hits.index)
        better = hits.score > merged["score"][at]
        for f in fields:
            merged[f][at[better]] = getattr(hits, f)[better]
        mix[at[better]] = hits.mix[better] if hits.mix is not None else False
    return BankHits(index=index, mix=mix, **merged)


def _pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a and b interleaved: a[i] at 2i, b[i] at 2i + 1."""
    out = np.empty(2 * a.shape[0], dtype=a.dtype)
    out[0::2], out[1::2] = a, b
    return out


def _series_hits(hits: BankHits, keep: BoolArray, mix: bool) -> BankHits | None:
    """The hits of one of a paired bank's two columns per series, indexed by series."""
    if not keep.any():
        return None
    return BankHits(index=hits.index[keep] // 2, window=hits.window[keep],
                    score=hits.score[keep], z=hits.z[keep], observed=hits.observed[keep],
                    expected=hits.expected[keep], mix=np.full(int(keep.sum()), mix))


class _SlotCache:
    """Per half hour: the two slots interpolated between, with the level applied."""

    def __init__(self, scorer: VolumeScorer, slot: int, slot_a: int, slot_b: int) -> None:
        vol = scorer.settings.volume
        fit, n = scorer.fit, scorer.n
        level = scorer.level[:n]
        weeks = fit.weeks
        self.seasonal = (weeks[slot, :n] > 0) & (weeks[slot_a, :n] > 0) & (weeks[slot_b, :n] > 0)
        self.all_seasonal = bool(self.seasonal.all())
        self.center_a = fit.center[slot_a, :n] + level
        self.center_d = fit.center[slot_b, :n] - fit.center[slot_a, :n]
        # never below the slot's own median: a slot whose median is a batch stays a batch
        # slot to its first minute instead of being averaged with the quiet hour before it
        self.center_floor = fit.center[slot, :n] + level
        inv_a = 1.0 / fit.sigma[slot_a, :n]
        self.inv_a, self.inv_d = inv_a, 1.0 / fit.sigma[slot_b, :n] - inv_a
        # Scoring against the slot's usual maximum too keeps recurring batches quiet. Its
        # slack is the series' ordinary max-over-centre gap, shrinking as the slot's maximum
        # rises above where noise alone would put it (a batch): there a minute must come
        # close to beating the maximum itself.
        slack = vol.envelope_z * fit.sigma_series[:n]
        gap = fit.envelope[slot, :n] - fit.center[slot, :n]
        slack = np.clip(2 * slack - gap, np.minimum(slack, math.log(vol.burst_min_ratio)), slack)
        self.envelope = fit.envelope[slot, :n] + level - slack
        # The window bank judges a batch slot's minutes against its usual maximum itself
        # (no slack): a batch at its usual size adds nothing to any window.
        # A batch slot (this hour or either neighbour, for timing jitter): its mean minute is
        # far above its median one, more than log-normal noise alone puts it (a ramp-up hour
        # has a high maximum too, but not that mean-to-median gap).
        floor = float(vol.floor_bytes_per_minute)
        skew = 0.7 + 0.5 * fit.sigma_series[:n] ** 2
        batch_slot = np.zeros(n, dtype=bool)
        for s in (slot_a, slot, slot_b):
            gap_mean = np.log(fit.hour_mean_raw[s, :n] + floor) - fit.center[s, :n]
            batch_slot |= (gap_mean > skew) & (fit.weeks[s, :n] > 0)
        self.bank_floor = np.where(batch_slot, fit.envelope[slot, :n] + level, -np.inf)
        # a slot whose hour carries 1.5x more than both neighbours' (a batch, even one long
        # enough to be the hour's median minute): the minute centres step there, so the
        # share-of-tenant test leaves these hours and their neighbours out
        log_mean = np.log(fit.hour_mean_raw[:, :n] + floor)
        peak = np.zeros(n, dtype=bool)
        for s in (slot_a, slot, slot_b):
            around = np.maximum(log_mean[(s - 1) % HOURS_PER_WEEK],
                                log_mean[(s + 1) % HOURS_PER_WEEK])
            peak |= (log_mean[s] - around > math.log(1.5)) & (fit.weeks[s, :n] > 0)
        self.peak_slot = peak | batch_slot
        # the weekly batch test (issue 18.3) on a slot that is a batch slot itself: its
        # usual bytes above the ordinary traffic around it (the quieter neighbour's mean)
        gap_self = np.log(fit.hour_mean_raw[slot, :n] + floor) - fit.center[slot, :n]
        around_self = np.maximum(log_mean[(slot - 1) % HOURS_PER_WEEK],
                                 log_mean[(slot + 1) % HOURS_PER_WEEK])
        batch_self = ((gap_self > skew) | (log_mean[slot] - around_self > math.log(1.5))) & (
            weeks[slot, :n] >= vol.scale_min_weeks)
        grown = np.exp(level)
        self.batch_base = np.minimum(fit.hour_mean_raw[(slot - 1) % HOURS_PER_WEEK, :n],
                                     fit.hour_mean_raw[(slot + 1) % HOURS_PER_WEEK, :n]) * grown
        self.batch_usual = MINUTES_PER_HOUR * np.maximum(
            fit.hour_mean_raw[slot, :n] * grown - self.batch_base, 0.0)
        self.batch_tested = batch_self & (self.batch_usual > 0) & vol.batch_enabled
        self.batch_noise = MINUTES_PER_HOUR * self.batch_base * fit.sigma_level[slot, :n]
        self.batch_index = np.flatnonzero(self.batch_tested)
        self.any_peak = bool(self.peak_slot.any())
        # the window bank learns from a week of history on, but tests only once the slot's
        # level noise is measured (two weeks: one week has no week-to-week spread)
        min_weeks = vol.scale_min_weeks
        self.mature = (
            (weeks[slot, :n] >= min_weeks) & (weeks[slot_a, :n] >= min_weeks)
            & (weeks[slot_b, :n] >= min_weeks)
        )
        mean_a = fit.hour_mean_raw[slot_a, :n]
        self.mean_a = mean_a * np.exp(level)
        self.mean_d = (fit.hour_mean_raw[slot_b, :n] - mean_a) * np.exp(level)
        self.hour_mean = np.where(self.seasonal, fit.hour_mean[slot, :n] * np.exp(level), 0.0)
        self.spread_level_sq = fit.sigma_level[slot, :n] ** 2
        ratio = scorer.settings.ratio
        noise = fit.sigma_ratio[:n] * math.sqrt(MINUTES_PER_HOUR / scorer.ratio_window)
        threshold = np.maximum(math.log(ratio.min_factor), ratio.z * noise)
        allowed = self.seasonal & ~scorer.is_total[:n] & ratio.enabled
        self.ratio_threshold = np.where(allowed, threshold, np.inf)
        self.ratio_base = fit.ratio[slot, :n]


class VolumeScorer:
    """Streaming state of the volume and ratio detectors for every series."""

    # per-series state, series on the last axis (declared in _declare, grown together)
    cusum: FloatArray
    run_start: IntArray
    run_excess: FloatArray
    slow: FloatArray
    slow_start: IntArray
    level: FloatArray
    cold_mean: FloatArray
    cold_init: BoolArray
    first_minute: IntArray
    seasonal_run: IntArray
    is_total: BoolArray
    alarm_hour: BoolArray
    suspect_hour: BoolArray  # the window bank suspected the series this hour
    hour_sum: FloatArray  # bytes out since the open hour's start (the weekly batch test)
    ring_out: FloatArray  # (ring_len, series): bytes out of the last minutes
    ring_exp: FloatArray  # (ring_len, series): expected bytes of the same minutes
    ring_in: FloatArray  # (ratio window, series)
    sums_out: FloatArray  # (drip windows, series)
    sums_exp: FloatArray
    ratio_out: FloatArray
    ratio_in: FloatArray
    mix_center: FloatArray  # usual minute log(out/in) against the slot's, learned online
    mix_dev: FloatArray  # its mean absolute deviation
    mix_seen: FloatArray  # minutes it has learned from

    def __init__(self, settings: DetectionSettings, capacity: int) -> None:
        self.settings = settings
        vol = settings.volume
        self.windows = sorted(vol.drip_windows_minutes)
        self.ratio_window = settings.ratio.window_minutes
        self.ring_len = max([*self.windows, self.ratio_window])
        self.minute_index = 0
        self.n = 0
        self._alpha_cold = 1.0 - 0.5 ** (1.0 / vol.cold_halflife_minutes)
        self._alpha_level = 1.0 - 0.5 ** (1.0 / vol.level_halflife_hours)
        self._log_min_ratio = math.log(vol.burst_min_ratio)
        self._arrays: dict[str, tuple[np.ndarray, bool | int | float]] = {}
        self._cache: _SlotCache | None = None
        self._cache_key: tuple[int, int] = (-1, -1)
        self._cap = 0
        self._declare(capacity)
        self.fit = SeasonalFit.empty(capacity)
        self._empty_fit = SeasonalFit.empty(1)  # a new series' fit (fill values of `clear`)
        # Two columns per series (see _score_bank): its volume at 2i, its out/in mix at 2i+1.
        self.bank = (
            ScaleBank(
                vol.scale_windows_minutes, vol.scale_alpha, 2 * capacity,
                vol.scale_level_halflife_minutes, vol.scale_noise_halflife_minutes,
                vol.scale_suspect_fraction, vol.scale_freeze_minutes, vol.scale_level_noise_share,
                vol.scale_record_margin, by_hour=vol.scale_by_hour,
                bias_halflife_days=vol.scale_bias_halflife_days,
            ) if vol.scale_enabled else None
        )
        # the share-of-tenant bank: the tenant's common swings cancel, so no level-noise floor
        self.share_bank = (
            ScaleBank(
                vol.share_windows_minutes, vol.scale_alpha, capacity,
                vol.scale_level_halflife_minutes, vol.scale_noise_halflife_minutes,
                vol.scale_suspect_fraction, vol.scale_freeze_minutes, 0.0,
                vol.scale_record_margin, by_hour=vol.scale_by_hour,
                bias_halflife_days=vol.scale_bias_halflife_days,
            ) if vol.scale_enabled and vol.share_enabled else None
        )
        self._share_min_ratio = np.full((len(vol.share_windows_minutes), 1), vol.share_min_ratio)
        self._alpha_mix = 1.0 - 0.5 ** (1.0 / vol.mix_noise_halflife_minutes)
        # per window, the least bytes out / expected to page: the volume's column, then the
        # mix's (its own for the short windows, where the volume's 2.7x would hide the
        # bursts the mix is there for; the volume's for the longer ones), tiled per series
        short = np.array(sorted(vol.scale_windows_minutes))[:, None] <= BLOCK
        self._gates = np.concatenate([
            np.where(short, vol.scale_short_min_ratio, vol.scale_min_ratio),
            np.where(short, vol.mix_short_min_ratio, vol.scale_min_ratio)], axis=1)
        self._pair_min_ratio = np.tile(self._gates, (1, capacity))

    # -- state ----------------------------------------------------------------

    def _declare(self, capacity: int) -> None:
        k, length = len(self.windows), self.ring_len
        specs: dict[str, tuple[tuple[int, ...], bool | int | float]] = {
            "cusum": ((), 0.0), "run_start": ((), 0), "run_excess": ((), 0.0),
            "slow": ((), 0.0), "slow_start": ((), 0), "level": ((), 0.0),
            "cold_mean": ((), 0.0), "cold_init": ((), False), "first_minute": ((), 0),
            "seasonal_run": ((), 0), "is_total": ((), False), "alarm_hour": ((), False),
            "suspect_hour": ((), False), "hour_sum": ((), 0.0),
            "ring_out": ((length,), 0.0), "ring_exp": ((length,), 0.0),
            "ring_in": ((self.ratio_window,), 0.0), "sums_out": ((k,), 0.0),
            "sums_exp": ((k,), 0.0), "ratio_out": ((), 0.0), "ratio_in": ((), 0.0),
            "mix_center": ((), 0.0), "mix_dev": ((), 0.0), "mix_seen": ((), 0.0),
        }
        for name, (lead, fill) in specs.items():
            dtype = (
                np.bool_ if isinstance(fill, bool) else np.int64 if isinstance(fill, int)
                else np.float64
            )
            self._arrays[name] = (np.full((*lead, capacity), fill, dtype=dtype), fill)
            setattr(self, name, self._arrays[name][0])
        self._cap = capacity

    def grow(self, capacity: int) -> None:
        for name, (array, fill) in self._arrays.items():
            extra = np.full((*array.shape[:-1], capacity - self._cap), fill, dtype=array.dtype)
            grown = np.concatenate([array, extra], axis=-1)
            self._arrays[name] = (grown, fill)
            setattr(self, name, grown)
        self.fit = self._widened(self.fit, self._cap, capacity)
        if self.bank is not None:
            self.bank.grow(2 * capacity)
        if self.share_bank is not None:
            self.share_bank.grow(capacity)
        self._pair_min_ratio = np.tile(self._gates, (1, capacity))
        self._cap = capacity

    def _banks(self) -> list[ScaleBank]:
        return [b for b in (self.bank, self.share_bank) if b is not None]

    def _bank_columns(self, bank: ScaleBank, series: IntArray) -> IntArray:
        """The columns of `series` in `bank`: the volume bank keeps two per series."""
        if bank is self.bank:
            return np.concatenate([2 * series, 2 * series + 1])
        return series

    @staticmethod
    def _widened(fit: SeasonalFit, n: int, capacity: int) -> SeasonalFit:
        wide = SeasonalFit.empty(capacity)
        for name in vars(fit):
            getattr(wide, name)[..., :n] = getattr(fit, name)[..., :n]
        return wide

    def add_series(self, index: int, is_total: bool) -> None:
        """Start series `index` (a reused slot is cleared first: `clear`)."""
        self.first_minute[index] = self.minute_index
        self.is_total[index] = is_total
        self.n = max(self.n, index + 1)
        self._cache = None

    def clear(self, series: IntArray) -> None:
        """Back to a new series' state: detector state, fit and window bank (what
        `add_series` sets is left to it). A freed slot keeps being stepped with idle minutes
        until reused, so it is cleared on reuse; one call clears a minute's slots at once."""
        for name, (array, fill) in self._arrays.items():
            if name not in ("first_minute", "is_total"):
                array[..., series] = fill
        for name in vars(self.fit):
            getattr(self.fit, name)[..., series] = getattr(self._empty_fit, name)
        for bank in self._banks():
            bank.clear(self._bank_columns(bank, series))
        self._cache = None

    def set_fit(self, fit: SeasonalFit, n: int) -> None:
        """Adopt a refitted baseline; the growth level restarts from the last day's."""
        self.fit = self._widened(fit, n, self._cap)
        self.level[:n] = np.clip(fit.level[:n], -_LEVEL_LIMIT, _LEVEL_LIMIT)
        self._cache = None

    def _slots(self, ts: int) -> tuple[_SlotCache, float]:
        slot, slot_a, slot_b, w = _slot_pair(ts)
        if self._cache is None or self._cache_key != (slot, slot_a):
            self._cache = _SlotCache(self, slot, slot_a, slot_b)
            self._cache_key = (slot, slot_a)
        return self._cache, w

    def band(
        self, index: int, minutes: list[int], z: float
    ) -> list[tuple[float, float, float] | None]:
        """Series `index`'s expected bytes at each minute with the band a normal minute stays
        in, by the current fit and growth level, as `score` computes them: (expected, low,
        high) with low/high z sigmas either side in log space, high raised to the slot's
        usual maximum (scoring does the same). None where the slot has no seasonal fit."""
        floor = float(self.settings.volume.floor_bytes_per_minute)
        caches: dict[tuple[int, int], _SlotCache] = {}
        out: list[tuple[float, float, float] | None] = []
        for ts in minutes:
            slot, slot_a, slot_b, w = _slot_pair(ts)
            cache = caches.get((slot, slot_a))
            if cache is None:
                cache = caches[(slot, slot_a)] = _SlotCache(self, slot, slot_a, slot_b)
            if not cache.seasonal[index]:
                out.append(None)
                continue
            center = max(cache.center_a[index] + w * cache.center_d[index],
                         cache.center_floor[index])
            sigma = 1.0 / (cache.inv_a[index] + w * cache.inv_d[index])
            top = max(center + z * sigma, cache.envelope[index])
            out.append((max(math.exp(center) - floor, 0.0),
                        max(math.exp(center - z * sigma) - floor, 0.0),
                        max(math.exp(top) - floor, 0.0)))
        return out

    # -- the minute -----------------------------------------------------------

    def score(
        self, ts: int, x: FloatArray, y: FloatArray, warm: BoolArray,
        total_of: IntArray | None = None,
    ) -> VolumeAlarms | None:
        """Score minute `ts` (bytes out x, in y per series), advance the state; None: calm.
        `total_of`: per series, its tenant total's series (-1: a total or a free slot), for
        the share-of-tenant bank; None: no share test."""
        vol, n = self.settings.volume, self.n
        floor = float(vol.floor_bytes_per_minute)
        cache, w = self._slots(ts)
        log_x = np.log(x + floor)
        center = np.maximum(cache.center_a + w * cache.center_d, cache.center_floor)
        excess = np.minimum(log_x - center, log_x - cache.envelope)
        inv_sigma = cache.inv_a + w * cache.inv_d
        seasonal = cache.seasonal
        if cache.all_seasonal:
            scorable = warm
        else:
            age = self.minute_index - self.first_minute[:n]
            cold_ok = ~seasonal & self.cold_init[:n] & (age >= vol.cold_min_age_minutes)
            cold_mean = self.cold_mean[:n]
            excess = np.where(seasonal, excess, np.where(cold_ok, log_x - cold_mean, 0.0))
            center = np.where(seasonal, center, cold_mean)
            inv_sigma = np.where(seasonal, inv_sigma, 1.0 / vol.cold_sigma)
            scorable = (seasonal | cold_ok) & warm
        z = excess * inv_sigma
        step = (excess - self._log_min_ratio) * inv_sigma - vol.burst_k
        expected = np.maximum(np.exp(center) - floor, 0.0)
        above = np.maximum(x - expected, 0.0)

        # burst: CUSUM, capped so that it falls back soon after the burst ends
        cusum, run_excess = self.cusum[:n], self.run_excess[:n]
        np.putmask(self.run_start[:n], cusum == 0, ts)  # a run starting now starts at ts
        run_excess *= cusum > 0
        cusum += step
        np.clip(cusum, 0.0, 2 * vol.burst_h, out=cusum)
        cusum *= scorable
        run_excess += above
        burst = (cusum >= vol.burst_h) & (run_excess >= vol.min_excess_bytes)
        spike = (step >= vol.spike_z) & (above >= vol.min_excess_bytes) & scorable
        slow = self.slow[:n]
        np.putmask(self.slow_start[:n], slow == 0, ts)
        slow += np.minimum(z, 3.0) - _SLOW_K
        np.maximum(slow, 0.0, out=slow)
        slow *= scorable

        # drip: windowed sums against expected sums (rings hold the last minutes)
        pos = self.minute_index % self.ring_len
        hour_mean = cache.hour_mean
        seasonal_run = self.seasonal_run[:n]
        seasonal_run += 1
        seasonal_run *= seasonal
        drip: BoolArray | None = None
        drip_score = drip_first = drip_excess = None
        drip_window = drip_observed = drip_expected = None
        for k, window in enumerate(self.windows):
            old = (self.minute_index - window) % self.ring_len
            sums_out, sums_exp = self.sums_out[k, :n], self.sums_exp[k, :n]
            sums_out += x - self.ring_out[old, :n]
            sums_exp += hour_mean - self.ring_exp[old, :n]
            gap = sums_out - sums_exp
            candidates = np.flatnonzero(
                (gap >= vol.min_excess_bytes) & (seasonal_run >= window) & warm
            )
            if not len(candidates):
                continue
            log_ratio = np.log(sums_out[candidates] + window * floor) - np.log(
                sums_exp[candidates] + window * floor
            )
            sigma_c = 1.0 / inv_sigma[candidates]
            dz = log_ratio / np.sqrt(cache.spread_level_sq[candidates] + sigma_c**2 / window)
            hit = (dz >= vol.drip_z) & (log_ratio >= math.log(vol.drip_min_ratio))
            if not hit.any():
                continue
            if drip is None:
                drip, drip_score = np.zeros(n, dtype=bool), np.zeros(n)
                drip_first, drip_excess = np.full(n, ts, dtype=np.int64), np.zeros(n)
                drip_window = np.ones(n, dtype=np.int64)
                drip_observed, drip_expected = np.zeros(n), np.zeros(n)
            assert drip_score is not None and drip_first is not None and drip_excess is not None
            assert drip_window is not None and drip_observed is not None
            assert drip_expected is not None
            where = candidates[hit]
            newly = where[~drip[where]]
            start = np.where(slow[newly] > 0, self.slow_start[newly], ts)
            drip_first[newly] = np.maximum(ts - (window - 1) * 60, start)
            drip_excess[newly] = gap[newly]
            drip_window[newly] = window
            drip_observed[newly], drip_expected[newly] = sums_out[newly], sums_exp[newly]
            drip_score[where] = np.maximum(drip_score[where], dz[hit] / vol.drip_z)
            drip[where] = True
        ratio = self._score_ratio(x, y, cache, warm)
        minute_of_hour = (ts // 60) % MINUTES_PER_HOUR
        batch, batch_score, batch_expected = self._score_batch(x, minute_of_hour, cache, warm)
        bank = self._score_bank(x, y, log_x, inv_sigma, w, cache, scorable, warm, total_of,
                                (ts // 900) % 96)
        self.ring_out[pos, :n] = x
        self.ring_exp[pos, :n] = hour_mean

        if not cache.all_seasonal:
            # cold-start EWMA learns after scoring, so minute t is judged on minutes < t
            cold = np.flatnonzero(~seasonal)
            init = self.cold_init[cold]
            mean = self.cold_mean[cold]
            self.cold_mean[cold] = np.where(init, mean + self._alpha_cold * (log_x[cold] - mean),
                                            log_x[cold])
            self.cold_init[cold] = True
        self.minute_index += 1

        alarm = spike | burst | batch
        if drip is not None:
            alarm |= drip
        if ratio is not None:
            alarm |= ratio > 0
        in_bank = np.zeros(n, dtype=bool)
        if bank is not None:
            in_bank[bank.index] = True
            alarm |= in_bank
        if not alarm.any():
            return None
        self.alarm_hour[:n] |= alarm
        index = np.flatnonzero(alarm)
        count = len(index)
        is_spike, is_burst = spike[index], burst[index]
        is_drip = drip[index] if drip is not None else np.zeros(count, dtype=bool)
        is_bank = in_bank[index]
        is_batch = batch[index]
        ratio_at = ratio[index] if ratio is not None else np.zeros(count)
        # the window bank's view of each alarmed series (zero where it did not fire)
        bank_score, bank_window = np.zeros(count), np.ones(count, dtype=np.int64)
        bank_mix = np.zeros(count, dtype=bool)
        bank_observed, bank_expected = x[index].copy(), expected[index].copy()
        if bank is not None:
            at = np.searchsorted(index, bank.index)
            bank_score[at], bank_window[at] = bank.score, bank.window
            bank_observed[at], bank_expected[at] = bank.observed, bank.expected
            if bank.mix is not None:
                bank_mix[at] = bank.mix
        spike_score = np.where(is_spike, step[index] / vol.spike_z, 0.0)
        burst_score = np.where(is_burst, cusum[index] / vol.burst_h, 0.0)
        d_score = drip_score[index] if drip_score is not None else np.zeros(count)
        # each series is told by the detector with the strongest evidence
        scores = np.stack([spike_score, burst_score, d_score, bank_score, ratio_at,
                           batch_score[index]])
        best = scores.argmax(axis=0)
        names = (SPIKE, BURST, DRIP, WINDOW, RATIO, BATCH)
        detector = [MIX if b == 3 and mixed else names[b]
                    for b, mixed in zip(best.tolist(), bank_mix.tolist(), strict=True)]
        run_start = self.run_start[index]
        window_start = ts - (bank_window - 1) * 60
        first_ts = np.where(
            best == 5, ts - minute_of_hour * 60,
            np.where(is_spike | is_burst, run_start,
            np.where(is_drip, drip_first[index] if drip_first is not None else ts,
                     np.where(is_bank, window_start, ts - (self.ratio_window - 1) * 60))),
        )
        score = scores.max(axis=0)
        run = run_excess[index]
        excess_bytes = (
            np.where(is_drip & ~(is_spike | is_burst), drip_excess[index], run)
            if drip_excess is not None else run
        )
        excess_bytes = np.where(best == 3, bank_observed - bank_expected, excess_bytes)
        # the ratio detector judges out/in, not volume: its volumes are the minute's
        judged = np.where(best == 3, bank_window, 1)
        window_observed = np.where(best == 3, bank_observed, x[index])
        window_expected = np.where(best == 3, bank_expected, expected[index])
        if drip_window is not None:
            assert drip_observed is not None and drip_expected is not None  # set together
            is_d = best == 2
            judged = np.where(is_d, drip_window[index], judged)
            window_observed = np.where(is_d, drip_observed[index], window_observed)
            window_expected = np.where(is_d, drip_expected[index], window_expected)
        # the batch test judges the hour so far against the slot's usual batch
        is_b = best == 5
        judged = np.where(is_b, minute_of_hour + 1, judged)
        window_observed = np.where(is_b, self.hour_sum[index], window_observed)
        window_expected = np.where(is_b, batch_expected[index], window_expected)
        excess_bytes = np.where(is_b, self.hour_sum[index] - batch_expected[index], excess_bytes)
        slot = hour_of_week(ts // 3600)
        return VolumeAlarms(
            index=index, detector=detector, first_ts=first_ts.astype(np.int64), score=score,
            active=(z[index] >= 1.0) | (ratio_at > 0) | is_bank | is_batch, observed=x[index],
            expected=expected[index], excess=excess_bytes, z=z[index],
            seasonal=seasonal[index], weeks=self.fit.weeks[slot, index].astype(np.int64),
            level=self.level[index], window=judged.astype(np.int64),
            window_observed=window_observed, window_expected=window_expected,
        )

    def _score_bank(
        self, x: FloatArray, y: FloatArray, log_x: FloatArray, inv_sigma: FloatArray,
        w: float, cache: _SlotCache, scorable: BoolArray, warm: BoolArray,
        total_of: IntArray | None, block_of_day: int,
    ) -> BankHits | None:
        """One minute of the window bank, on seasonal series only (cold ones have no fit):
        each series' volume and, on destinations, its out/in mix; and of the
        share-of-tenant bank on destinations (merged: the strongest window of each series)."""
        if self.bank is None:
            return None
        vol, n = self.settings.volume, self.n
        # the interpolated centre itself, not floored at the slot's median as the burst
        # detectors have it: that floor biases every ramp-up minute low, and a window's mean
        # must be unbiased at every hour for its own noise scale to mean anything
        center = np.maximum(cache.center_a + w * cache.center_d, cache.bank_floor)
        residual = (log_x - center) * inv_sigma
        u = np.clip(residual, vol.scale_clip_low, vol.scale_clip_high)
        watched = scorable & cache.seasonal if not cache.all_seasonal else scorable
        # Idle minutes count, at the clip's floor (log of the floor alone is far below any
        # centre), so that a window never falls when bytes are added to any of its minutes:
        # left out, a minute the series would have idled and a throttled stream fills with
        # small writes entered the window below its mean and hid the drip. How often a
        # series idles depends on the hour; the bank's quarter-hour profile takes that out.
        mean = np.maximum(cache.mean_a + w * cache.mean_d, 0.0)
        # the short windows' bytes must beat the neighbouring hours' mean only around a
        # batch (its timing jitter): elsewhere that would hide a burst on a ramp-up hour
        wide = np.where(cache.peak_slot, cache.hour_mean, mean) if cache.any_peak else mean
        mix_u, mix_watched = self._mix_units(x, y, watched, cache)
        # One bank step for both tests of every series (their columns interleaved): the
        # step's cost is mostly per call, not per column.
        ready = warm & cache.mature
        level_noise = np.sqrt(cache.spread_level_sq) * inv_sigma
        paired = self.bank.step(
            self.minute_index, _pair(u, mix_u), _pair(x, x), _pair(mean, mean),
            _pair(wide, wide), _pair(watched, mix_watched), _pair(ready, ready),
            float(vol.min_excess_bytes), self._pair_min_ratio[:, :2 * n],
            _pair(level_noise, np.zeros(n)), block_of_day=block_of_day)
        self.suspect_hour[:n] |= self._bank_suspects(n)
        hits = None
        if paired is not None:
            is_mix = (paired.index % 2).astype(bool)
            hits = _stronger(_series_hits(paired, ~is_mix, False),
                             _series_hits(paired, is_mix, True))
        if self.share_bank is None or total_of is None:
            return hits
        share_hits = self._score_share(x, log_x, center, inv_sigma, watched, mean,
                                       cache, warm, total_of, block_of_day)
        return _stronger(hits, share_hits)

    def _mix_units(
        self, x: FloatArray, y: FloatArray, watched: BoolArray, cache: _SlotCache,
    ) -> tuple[FloatArray, BoolArray]:
        """The out/in mix test's minute (u and the minutes it watches): a destination's
        log(out/in) against the slot's usual, in units of its own minute noise of that. An
        upload (requests without the responses that ordinary calls pull back) shifts it by
        the upload's factor. Idle minutes count at the low clip, so bytes added to any
        minute never lower a window. Totals (they mix destinations) and batch slots (a
        batch has a mix of its own that the hourly fit blurs) are left out."""
        vol, n = self.settings.volume, self.n
        if not vol.mix_enabled:
            return np.zeros(n), np.zeros(n, dtype=bool)
        floor = float(vol.floor_bytes_per_minute)
        r = np.log(x + floor) - np.log(y + floor) - cache.ratio_base
        active = x > 0
        mix_watched = watched & ~self.is_total[:n] & ~cache.peak_slot
        center, dev, seen = self.mix_center[:n], self.mix_dev[:n], self.mix_seen[:n]
        sigma = np.maximum(dev * _MEAN_ABS_TO_SIGMA, _MIX_SIGMA_FLOOR)
        u = np.where(active, np.clip((r - center) / sigma, vol.scale_clip_low,
                                     vol.scale_clip_high), vol.scale_clip_low)
        # learn the usual mix and its noise (after u is taken), on active minutes; each
        # step capped at three deviations once a few hours have taught them, so an upload
        # barely moves either
        learn = active & mix_watched
        np.copyto(center, r, where=learn & (seen == 0))
        rate = np.maximum(1.0 / (seen + 1.0), self._alpha_mix) * learn
        gap = r - center
        cap = np.where(seen >= _MIX_CAP_AFTER, 3.0 * sigma, np.inf)
        center += rate * np.clip(gap, -cap, cap)
        dev += rate * (np.minimum(np.abs(gap), cap) - dev)
        seen += learn
        return u, mix_watched

    def _score_share(
        self, x: FloatArray, log_x: FloatArray, center: FloatArray, inv_sigma: FloatArray,
        watched: BoolArray, mean: FloatArray, cache: _SlotCache, warm: BoolArray,
        total_of: IntArray, block_of_day: int,
    ) -> BankHits | None:
        """A destination's log residual minus that of the rest of its tenant (the total less
        this destination), in the destination's noise units: whatever moves the whole tenant
        (the day's level, growth the fit missed) cancels, a drip to one destination does not."""
        assert self.share_bank is not None
        vol, n = self.settings.volume, self.n
        floor = float(vol.floor_bytes_per_minute)
        total = np.where(total_of >= 0, total_of, np.arange(n))
        expected = np.maximum(np.exp(center) - floor, 0.0)
        rest_x = x[total] - x
        rest_e = expected[total] - expected
        # a tenant's batch slots are left out: a batch to one destination is a seasonal shift
        # in share that the minute centres (floored at a batch slot's usual maximum) miss
        batch = np.bincount(total, weights=cache.peak_slot, minlength=n) > 0
        share_watched = (
            (total_of >= 0) & watched & watched[total] & ~batch[total]
            & (rest_x > 0) & (rest_e > 0))
        rest = np.log(np.maximum(rest_x, 0.0) + floor) - np.log(np.maximum(rest_e, 0.0) + floor)
        share = np.clip((log_x - center - rest) * inv_sigma, vol.scale_clip_low,
                        vol.scale_clip_high)
        mature = cache.mature & cache.mature[total]
        # the bytes gate and the evidence: the destination's own seasonal expectation (a
        # share that rises because the rest of the tenant fell quiet is no exfiltration)
        hits = self.share_bank.step(
            self.minute_index, share, x, mean, cache.hour_mean, share_watched, warm & mature,
            float(vol.min_excess_bytes), self._share_min_ratio, np.zeros(n),
            block_of_day=block_of_day)
        self.suspect_hour[:n] |= self.share_bank.suspect_run[:n] > 0
        return hits

    def _score_batch(
        self, x: FloatArray, minute_of_hour: int, cache: _SlotCache, warm: BoolArray,
    ) -> tuple[BoolArray, FloatArray, FloatArray]:
        """The weekly batch (issue 18.3): in a batch slot, the bytes of the hour so far above
        the ordinary traffic around the batch, against the slot's usual batch. Returns the
        series in alarm, their score (>= 1) and the bytes expected for the hour so far."""
        vol, n = self.settings.volume, self.n
        hour_sum = self.hour_sum[:n]
        hour_sum += x
        hit, score, expected = np.zeros(n, dtype=bool), np.zeros(n), np.zeros(n)
        at = cache.batch_index  # most hours of most series are no batch slot
        if not len(at):
            return hit, score, expected
        base = cache.batch_base[at] * (minute_of_hour + 1)
        excess = hour_sum[at] - base
        usual = cache.batch_usual[at]
        hit[at] = (
            warm[at] & (excess >= vol.batch_min_ratio * usual)
            & (excess - usual >= vol.batch_z * cache.batch_noise[at])
            & (excess - usual >= vol.min_excess_bytes)
        )
        score[at] = np.where(hit[at], excess / np.maximum(vol.batch_min_ratio * usual, 1.0), 0.0)
        expected[at] = base + usual
        return hit, score, expected

    def suspected(self) -> BoolArray:
        """Per series: a window of a bank is under suspicion this minute."""
        n = self.n
        out = np.zeros(n, dtype=bool)
        if self.bank is not None:
            out |= self._bank_suspects(n)
        if self.share_bank is not None:
            out |= self.share_bank.suspect_run[:n] > 0
        return out

    def _bank_suspects(self, n: int) -> BoolArray:
        """Per series: either of its two columns of the window bank is under suspicion."""
        assert self.bank is not None
        return np.asarray((self.bank.suspect_run[:2 * n] > 0).reshape(n, 2).any(axis=1))

    def forget_recent(self, series: IntArray) -> None:
        """After an episode: its minutes still fill the windows, so re-arm the windows only
        once they hold fresh minutes alone, and restart the CUSUMs; the tail cannot page."""
        self.seasonal_run[series] = 0
        self.cusum[series] = 0.0
        self.slow[series] = 0.0
        for bank in self._banks():
            bank.reset(self._bank_columns(bank, series))

    def _score_ratio(
        self, x: FloatArray, y: FloatArray, cache: _SlotCache, warm: BoolArray
    ) -> FloatArray | None:
        """Score (>= 1 means alarm) of the windowed log(out/in) against the slot's usual."""
        cfg, n = self.settings.ratio, self.n
        window = self.ratio_window
        old = (self.minute_index - window) % self.ring_len
        pos_in = self.minute_index % window
        ratio_out, ratio_in = self.ratio_out[:n], self.ratio_in[:n]
        ratio_out += x - self.ring_out[old, :n]
        ratio_in += y - self.ring_in[pos_in, :n]
        self.ring_in[pos_in, :n] = y
        candidates = np.flatnonzero(
            (ratio_out >= cfg.min_bytes_out) & (self.seasonal_run[:n] >= window) & warm
        )
        if not len(candidates):
            return None
        floor = float(self.settings.volume.floor_bytes_per_minute) * window
        excess = (
            np.log(ratio_out[candidates] + floor) - np.log(ratio_in[candidates] + floor)
            - cache.ratio_base[candidates]
        )
        score = excess / cache.ratio_threshold[candidates]
        hit = score >= 1.0
        if not hit.any():
            return None
        out = np.zeros(n)
        out[candidates[hit]] = score[hit]
        return out

    def close_hour(self, abs_hour: int, hour_sums: FloatArray) -> None:
        """Hourly: track the growth level; re-sum the windows to shed float drift.
        `hour_sums` is NaN for a series not observed for the whole hour: no level step."""
        n = hour_sums.shape[0]
        floor = MINUTES_PER_HOUR * float(self.settings.volume.floor_bytes_per_minute)
        slot = hour_of_week(abs_hour)
        expected = MINUTES_PER_HOUR * self.fit.hour_mean_raw[slot, :n]
        observed = np.log(hour_sums + floor) - np.log(expected + floor)
        level = self.level[:n]
        clip = self.settings.volume.level_clip
        step = self._alpha_level * np.clip(observed - level, -clip, clip)
        learn = (self.fit.weeks[slot, :n] > 0) & ~self.alarm_hour[:n] & np.isfinite(observed)
        # down-weighted while under suspicion: a drip must not become the new level
        step = np.where(self.suspect_hour[:n], SUSPECT_WEIGHT * step, step)
        level = level + np.where(learn, step, 0.0) + self.fit.slope[:n]
        self.level[:n] = np.clip(level, -_LEVEL_LIMIT, _LEVEL_LIMIT)
        self.alarm_hour[:n] = False
        self.suspect_hour[:n] = False
        self.hour_sum[:n] = 0.0
        self._cache = None
        newest = self.minute_index - 1
        for k, window in enumerate(self.windows):
            rows = (newest - np.arange(window)) % self.ring_len
            self.sums_out[k, :n] = self.ring_out[rows, :n].sum(axis=0)
            self.sums_exp[k, :n] = self.ring_exp[rows, :n].sum(axis=0)
        rows = (newest - np.arange(self.ratio_window)) % self.ring_len
        self.ratio_out[:n] = self.ring_out[rows, :n].sum(axis=0)
        self.ratio_in[:n] = self.ring_in[:, :n].sum(axis=0)
