"""Seasonal baselines: hourly summaries per series and their hour-of-week fit.

Each series keeps a ring of `baseline_weeks` weeks of hourly summaries (minute
median, p90 and max, hourly sums out and in). The fit is the median across weeks
of every hour-of-week slot, so one odd week (an incident, a holiday) does not move
it, and a weekly batch that recurs every week becomes part of it. An hour a series
was not watched for in full (the first hour of a history starting mid-hour) is left
out, so unknown minutes never pass for idle ones. Memory is
bounded: 5 float32 per series per hour kept (10,000 series x 3 weeks: ~100 MB).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import pandas as pd  # imported where used: ~40 MB resident the agent needs only to refit

logger = logging.getLogger(__name__)

HOURS_PER_WEEK = 168
MINUTES_PER_HOUR = 60
# 1970-01-01 was a Thursday: shift so that slot 0 is Monday 00:00 UTC.
_EPOCH_HOUR_OF_WEEK = 72
_Z90 = 1.2816  # standard normal 90th percentile: p90/p50 of a log-normal minute -> sigma
_MAD_TO_SIGMA = 1.4826
# With a single week of history there is nothing to compare against: assume +-35%.
_ONE_WEEK_LEVEL_SIGMA = 0.3
_MAX_SLOPE = math.log(1.1) / 24  # growth tracked up to 10% a day (log per hour)

FloatArray = npt.NDArray[np.float64]

P50, P90, PMAX, SUM_OUT, SUM_IN = range(5)
N_STATS = 5


def hour_of_week(abs_hour: int) -> int:
    return (abs_hour + _EPOCH_HOUR_OF_WEEK) % HOURS_PER_WEEK


class HourlyHistory:
    """Per-minute buffer of the open hour and a ring of hourly summaries per series."""

    def __init__(self, weeks: int, capacity: int) -> None:
        self.depth = weeks * HOURS_PER_WEEK
        self.hour_ids = np.full(self.depth, -1, dtype=np.int64)  # absolute hour per ring slot
        self.stats = np.full((self.depth, N_STATS, capacity), np.nan, dtype=np.float32)
        self.minutes_out = np.zeros((MINUTES_PER_HOUR, capacity))
        self.hour_in = np.zeros(capacity)
        # per series: minutes of the open hour it was watched for (see add_series)
        self.minutes_seen = np.zeros(capacity, dtype=np.int64)

    def grow(self, capacity: int) -> None:
        extra = capacity - self.stats.shape[2]
        self.stats = np.concatenate(
            [self.stats, np.full((self.depth, N_STATS, extra), np.nan, dtype=np.float32)], axis=2
        )
        self.minutes_out = np.concatenate(
            [self.minutes_out, np.zeros((MINUTES_PER_HOUR, extra))], axis=1
        )
        self.hour_in = np.concatenate([self.hour_in, np.zeros(extra)])
        self.minutes_seen = np.concatenate([self.minutes_seen, np.zeros(extra, dtype=np.int64)])

    def add_series(self, index: int, watched_like: int | None = None) -> None:
        """A series is watched from when it is added: the minutes of the open hour before
        (the start of the input or of the stored history, a tenant not seen yet) are
        unknown, not idle. A destination of a known tenant is watched as long as
        `watched_like` (its tenant's total): its minutes before its first row were idle."""
        self.minutes_seen[index] = 0 if watched_like is None else self.minutes_seen[watched_like]

    def clear(self, series: npt.NDArray[np.int64]) -> None:
        """Forget these series' history (a freed slot, before it is reused); `add_series`
        sets when it is watched from."""
        self.stats[:, :, series] = np.nan
        self.minutes_out[:, series] = 0.0
        self.hour_in[series] = 0.0

    def record_minute(self, minute_of_hour: int, out: FloatArray, inb: FloatArray) -> None:
        """Minute `minute_of_hour` of series 0..n-1 (all watched)."""
        n = out.shape[0]
        self.minutes_out[minute_of_hour, :n] = out
        self.hour_in[:n] += inb
        self.minutes_seen[:n] += 1

    def close_hour(self, abs_hour: int, n: int) -> FloatArray:
        """Store the hour's summary of series 0..n-1 (later ones stay NaN). Returns sums out,
        NaN for a series not observed for the whole hour: a partly watched hour (the first
        hour of a history that starts mid-hour) would pass its unwatched minutes off as
        zero traffic and drag its hour-of-week slot down, so it is left out of the fit."""
        minutes = self.minutes_out[:, :n]
        p50, p90 = np.percentile(minutes, [50, 90], axis=0)
        sum_out: FloatArray = minutes.sum(axis=0)
        pos = abs_hour % self.depth
        row = np.stack([p50, p90, minutes.max(axis=0), sum_out, self.hour_in[:n]])
        partial = self.minutes_seen[:n] < MINUTES_PER_HOUR
        if partial.any():
            row[:, partial] = np.nan
            sum_out = np.where(partial, np.nan, sum_out)
        self.stats[pos, :, :n] = row
        self.stats[pos, :, n:] = np.nan
        self.hour_ids[pos] = abs_hour
        self.minutes_out[:, :n] = 0.0
        self.hour_in[:n] = 0.0
        self.minutes_seen[:n] = 0
        return sum_out

    def frame(self, n: int) -> pd.DataFrame:
        """Long table of the stored hours: series, week, slot and the five statistics."""
        import pandas as pd

        valid = np.flatnonzero(self.hour_ids >= 0)
        hours = self.hour_ids[valid]
        stats = self.stats[valid, :, :n]  # (hours, stats, series)
        series = np.tile(np.arange(n), len(valid))
        frame = pd.DataFrame(
            {
                "series": series,
                "hour": np.repeat(hours, n),
                "p50": stats[:, P50, :].ravel(),
                "p90": stats[:, P90, :].ravel(),
                "max": stats[:, PMAX, :].ravel(),
                "sum_out": stats[:, SUM_OUT, :].ravel(),
                "sum_in": stats[:, SUM_IN, :].ravel(),
            }
        )
        frame = frame[frame["sum_out"].notna()]
        frame["slot"] = (frame["hour"] + _EPOCH_HOUR_OF_WEEK) % HOURS_PER_WEEK
        frame["week"] = (frame["hour"] + _EPOCH_HOUR_OF_WEEK) // HOURS_PER_WEEK
        return frame


@dataclass
class SeasonalFit:
    """Per hour-of-week slot (first axis) and series (second axis), in log(bytes + floor)."""

    center: FloatArray  # median minute
    envelope: FloatArray  # typical hourly maximum, widened to the neighbouring slots
    sigma: FloatArray  # robust per-minute noise, level uncertainty included
    hour_mean: FloatArray  # expected bytes per minute, widened to the neighbouring slots
    hour_mean_raw: FloatArray  # expected bytes per minute of the slot itself (level tracking)
    ratio: FloatArray  # log(out/in) of the hour, widened to the neighbouring slots
    weeks: npt.NDArray[np.int16]  # weeks of history behind each slot; 0 = no seasonal baseline
    sigma_series: FloatArray  # per series: typical per-minute noise (quiet slots' spread)
    sigma_level: FloatArray  # hour-to-hour level noise, trend removed (quiet/busy slots apart)
    sigma_ratio: FloatArray  # per series: noise of the hourly log(out/in)
    level: FloatArray  # per series: log level of the last days against this fit
    slope: FloatArray  # per series: log growth per hour, applied hourly to the level

    @classmethod
    def empty(cls, n: int) -> SeasonalFit:
        slots = np.zeros((HOURS_PER_WEEK, n))
        return cls(
            center=slots.copy(), envelope=slots.copy(), sigma=np.ones((HOURS_PER_WEEK, n)),
            hour_mean=slots.copy(), hour_mean_raw=slots.copy(), ratio=slots.copy(),
            weeks=np.zeros((HOURS_PER_WEEK, n), dtype=np.int16),
            sigma_series=np.ones(n), sigma_level=np.ones((HOURS_PER_WEEK, n)),
            sigma_ratio=np.ones(n), level=np.zeros(n), slope=np.zeros(n),
        )


def _neighbour_max(slots: FloatArray) -> FloatArray:
    """Max of each slot and the slots either side (the week wraps): tolerates timing jitter."""
    return np.fmax(np.fmax(slots, np.roll(slots, 1, axis=0)), np.roll(slots, -1, axis=0))


def _slot_table(grouped: pd.DataFrame, column: str, n: int) -> FloatArray:
    table = np.full((HOURS_PER_WEEK, n), np.nan)
    table[grouped["slot"].to_numpy(), grouped["series"].to_numpy()] = grouped[column].to_numpy()
    return table


def fit_seasonal(
    frame: pd.DataFrame,
    n: int,
    floor: float,
    sigma_floor: float,
    level_sigma_floor: float,
    recent_hours: int = 72,
) -> SeasonalFit:
    """Median across weeks per (series, hour-of-week) and robust noise scales per series."""
    import pandas as pd

    fit = SeasonalFit.empty(n)
    if frame.empty:
        return fit
    hour_floor = MINUTES_PER_HOUR * floor
    logs = pd.DataFrame(
        {
            "series": frame["series"].to_numpy(),
            "slot": frame["slot"].to_numpy(),
            "week": frame["week"].to_numpy(),
            "hour": frame["hour"].to_numpy(),
            "center": np.log(frame["p50"].to_numpy(np.float64) + floor),
            "spread": (
                np.log(frame["p90"].to_numpy(np.float64) + floor)
                - np.log(frame["p50"].to_numpy(np.float64) + floor)
            )
            / _Z90,
            "envelope": np.log(frame["max"].to_numpy(np.float64) + floor),
            "level": np.log(frame["sum_out"].to_numpy(np.float64) + hour_floor),
            "ratio": np.log(frame["sum_out"].to_numpy(np.float64) + hour_floor)
            - np.log(frame["sum_in"].to_numpy(np.float64) + hour_floor),
        }
    )
    # Steady growth: the median week of a slot lies one to three weeks back depending on
    # the weekday, so project every hour to now along the series' trend, taken as the
    # median week-on-week change of its slots (robust to one odd week or a batch).
    logs = logs.sort_values(["series", "slot", "hour"], kind="stable")
    by_slot = logs.groupby(["series", "slot"], sort=False)
    change = by_slot["level"].diff() / by_slot["hour"].diff()
    slope = change.groupby(logs["series"]).median().fillna(0.0).clip(-_MAX_SLOPE, _MAX_SLOPE)
    fit.slope[slope.index.to_numpy()] = slope.to_numpy()
    age = (logs["hour"].max() + 1 - logs["hour"]).to_numpy()
    shift = fit.slope[logs["series"].to_numpy()] * age
    for column in ("center", "envelope", "level"):
        logs[column] = logs[column].to_numpy() + shift

    columns = ["center", "spread", "envelope", "level", "ratio"]
    slots = logs.groupby(["series", "slot"], sort=False)[columns].median()
    slots["weeks"] = logs.groupby(["series", "slot"], sort=False).size()
    slots = slots.reset_index()

    # Residuals against the slot medians give the noise of hourly levels and ratios;
    # removing each week's median residual first keeps steady growth out of the noise.
    logs = logs.merge(
        slots[["series", "slot", "level", "ratio"]], on=["series", "slot"], suffixes=("", "_slot")
    )
    logs["level_resid"] = logs["level"] - logs["level_slot"]
    logs["level_resid"] -= logs.groupby(["series", "week"])["level_resid"].transform("median")
    # Against the other weeks only (leave one out): a residual against a median of three
    # weeks is zero for the median week itself, which would halve the noise estimate.
    by_slot = logs.groupby(["series", "slot"])["level_resid"]
    count = by_slot.transform("size").to_numpy()
    total = by_slot.transform("sum").to_numpy()
    resid = logs["level_resid"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        loo = np.where(count > 1, (count * resid - total) / (count - 1), np.nan)
        # x - mean(others) has variance sigma^2 * k / (k - 1)
        logs["level_resid"] = loo * np.sqrt((count - 1) / np.maximum(count, 1))
    logs["level_abs"] = logs["level_resid"].abs()
    logs["ratio_resid"] = (logs["ratio"] - logs["ratio_slot"]).abs()
    sigma_ratio = np.full(n, np.nan)
    ratio_mad = logs.groupby("series")["ratio_resid"].median()
    sigma_ratio[ratio_mad.index.to_numpy()] = _MAD_TO_SIGMA * ratio_mad.to_numpy()
    fit.sigma_ratio = np.fmax(np.nan_to_num(sigma_ratio, nan=1.0), 0.1)
    # Quiet hours (below the series' median level) are relatively noisier than busy ones:
    # their hourly level noise is measured apart.
    typical_level = slots.groupby("series")["level"].transform("median")
    slots["quiet"] = slots["level"] < typical_level
    logs = logs.merge(slots[["series", "slot", "quiet"]], on=["series", "slot"])
    level_mad = logs.groupby(["series", "quiet"])["level_abs"].median().rename("mad").reset_index()
    slots = slots.merge(level_mad, on=["series", "quiet"], how="left")
    sigma_level = np.fmax(
        np.nan_to_num(_MAD_TO_SIGMA * _slot_table(slots, "mad", n), nan=_ONE_WEEK_LEVEL_SIGMA),
        level_sigma_floor,
    )
    fit.sigma_level = sigma_level

    # The level of the last days against this fit: growth since the median week. Days,
    # not one day, so that one unusual day is not carried into the next.
    newest = int(logs["hour"].max())
    recent = logs[logs["hour"] > newest - recent_hours]
    recent_level = (recent["level"] - recent["level_slot"]).groupby(recent["series"]).median()
    fit.level[recent_level.index.to_numpy()] = recent_level.to_numpy()

    weeks = _slot_table(slots, "weeks", n)
    fit.weeks = np.nan_to_num(weeks, nan=0).astype(np.int16)
    center = _slot_table(slots, "center", n)
    spread = _slot_table(slots, "spread", n)
    typical_spread = np.zeros(n)
    per_series_spread = slots.groupby("series")["spread"].median()
    typical_spread[per_series_spread.index.to_numpy()] = per_series_spread.to_numpy()
    # A quiet slot's spread estimate may be unluckily small: never below 3/4 of the series'.
    minute_sigma = np.fmax(np.fmax(spread, 0.75 * typical_spread), sigma_floor)
    fit.sigma = np.sqrt(minute_sigma**2 + sigma_level**2)
    busy_level = np.median(sigma_level, axis=0)
    fit.sigma_series = np.sqrt(np.fmax(typical_spread, sigma_floor) ** 2 + busy_level**2)
    fit.center = center
    fit.envelope = _neighbour_max(_slot_table(slots, "envelope", n))
    level = _slot_table(slots, "level", n)
    fit.hour_mean_raw = np.fmax(np.exp(level) - hour_floor, 0.0) / MINUTES_PER_HOUR
    fit.hour_mean = _neighbour_max(fit.hour_mean_raw)
    fit.ratio = _neighbour_max(_slot_table(slots, "ratio", n))
    for name in ("center", "envelope", "sigma", "hour_mean", "hour_mean_raw", "ratio"):
        setattr(fit, name, np.nan_to_num(getattr(fit, name), nan=0.0))
    fit.sigma = np.where(fit.weeks > 0, fit.sigma, 1.0)
    return fit
