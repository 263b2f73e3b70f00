"""Detection settings (the `detection:` section of the config).

Owned by the analytics package; controller/config.py embeds it. Byte floors are
per minute or per episode as their names say. The defaults were tuned on the
synthetic scenarios in tests/analytics/scenario.py (see perf/bench_analyze.py).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveBytes = Annotated[int, Field(ge=0, le=2**50)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VolumeSettings(_Frozen):
    """volume_anomaly (and egress_ratio) on each (tenant, destination) and tenant total."""

    # Offset added before taking logs: changes below this many bytes a minute are noise.
    floor_bytes_per_minute: PositiveBytes = 16_384
    # An episode pages only once its excess over the baseline reaches this.
    min_excess_bytes: PositiveBytes = 262_144
    # Fast CUSUM of (log(x / expected) - log(burst_min_ratio)) / sigma - burst_k: bursts
    # page within minutes, while shifts below burst_min_ratio are left to the drip windows.
    burst_min_ratio: Annotated[float, Field(ge=1, le=100)] = 2.0
    burst_k: Annotated[float, Field(ge=0, le=10)] = 0.25
    burst_h: Annotated[float, Field(gt=0, le=100)] = 7.0
    # One minute this far (same units as the CUSUM step) above the baseline pages at once.
    spike_z: Annotated[float, Field(gt=0, le=100)] = 8.0
    # The expected per-hour maximum of normal minutes sits about this many sigmas up;
    # scoring against it as well keeps recurring batch minutes quiet.
    envelope_z: Annotated[float, Field(ge=0, le=10)] = 2.3
    # Slow drips, the first detector: excess of windowed sums over the expected sums, its
    # noise the fit's hour-to-hour level noise. Off by default (no windows): the window bank
    # catches what it caught, and on tuning seeds it only added false incidents.
    drip_windows_minutes: list[Annotated[int, Field(ge=5, le=1440)]] = []
    drip_z: Annotated[float, Field(gt=0, le=100)] = 4.0
    drip_min_ratio: Annotated[float, Field(gt=1, le=100)] = 1.7
    # Window bank (issue 18, analytics/scales.py): mean standardised log residual over each
    # window against the series' own running level and noise scale at that length. Windows
    # above 15 minutes are multiples of 15. scale_alpha: false alarms per series-week the
    # whole bank may raise (split over the windows and the windows a week); the main knob.
    scale_enabled: bool = True
    # Weeks of history a slot needs before the bank tests on it (it learns from one week
    # on; with one week there is no week-to-week level noise to measure).
    scale_min_weeks: Annotated[int, Field(ge=1, le=12)] = 2
    scale_windows_minutes: list[Annotated[int, Field(ge=1, le=1440)]] = [
        5, 10, 15, 180, 360, 720, 1440]
    scale_alpha: Annotated[float, Field(gt=0, lt=1)] = 0.0001
    # Half-life of the running level (today's level, growth the fit missed) and of the
    # learned noise scale of each window.
    scale_level_halflife_minutes: Annotated[float, Field(gt=0, le=10_080)] = 240.0
    scale_noise_halflife_minutes: Annotated[float, Field(gt=0, le=100_800)] = 10_080.0
    # A series is under suspicion once a window reaches this fraction of its threshold: its
    # open episode stays open, and for at most scale_freeze_minutes its running level learns
    # at a quarter of its rate. 0 by default: each window reads the level where the window
    # starts, so a drip cannot lift its own reference, and the learned-slower level of a
    # suspect series turned the day-to-day swings that follow into false incidents.
    scale_suspect_fraction: Annotated[float, Field(gt=0, le=1)] = 0.6
    scale_freeze_minutes: Annotated[int, Field(ge=0, le=10_080)] = 0
    # A minute's standardised residual is clipped to this range before entering windows;
    # an idle minute counts at the low end. Low side at -1.5: a throttled stream fills the
    # minutes a series would have idled with its own small writes, and at -3 those minutes
    # pulled a drip's window mean back down (tuning seeds 201-208, 211-214: drips 47 -> 49
    # of 60, bursts 55 -> 56, false incidents 14 -> 10 in 480 tenant-weeks).
    scale_clip_low: Annotated[float, Field(ge=-20, le=0)] = -1.5
    scale_clip_high: Annotated[float, Field(gt=0, le=50)] = 4.0
    # Windows of an hour or more never use a noise scale below this share of the fit's
    # hour-to-hour level noise. 0 by default: that floor decided most missed drips, and the
    # per-hour-of-day scales (scale_by_hour) now carry the day-to-day swings where they are.
    scale_level_noise_share: Annotated[float, Field(ge=0, le=5)] = 0.0
    # The series' own record (issue 18.1): a window pages only above this multiple of the
    # highest score that window reached on the week before today, so a series whose window
    # means have heavier tails than the learned scale says sets its own bar (0: off). Off by
    # default: with three weeks of history the record comes from the week of a one-week fit,
    # whose residuals are noisier (tuning seeds: drips 0.70 -> 0.60 at 1.0).
    scale_record_margin: Annotated[float, Field(ge=0, le=10)] = 0.0
    # Each window's noise scale learned per hour of the day too (issue 18.1): the windows
    # across a series' day boundary (where its level steps) are up to twice as noisy as the
    # rest, so one scale per window is too wide by day and too narrow across the step.
    scale_by_hour: bool = True
    # Half-life in days of each series' usual residual per quarter hour of the UTC day,
    # taken off before the windows (0: off): the hourly fit's systematic misfit on ramps and
    # the hour-to-hour share of idle minutes, which idle minutes counting brings in. With
    # idle minutes counted and the share bank's per-hour scales, on the same tuning seeds:
    # drips 49 -> 52 of 60, bursts 56 -> 57, false incidents 10 -> 11 (50 drips without it).
    scale_bias_halflife_days: Annotated[float, Field(ge=0, le=365)] = 7.0
    # A window pages only if its bytes out are at least this multiple of the expected.
    scale_min_ratio: Annotated[float, Field(ge=1, le=100)] = 1.2
    # ... and windows of 15 minutes or less this multiple (bursts; minute noise is large).
    scale_short_min_ratio: Annotated[float, Field(ge=1, le=100)] = 2.7
    # Share of the tenant (issue 18.1): a second window bank on a destination's log residual
    # minus that of the tenant's other traffic, so the tenant's day-to-day swings (common to
    # all its destinations) cancel and a drip to one destination stands out as a shift in
    # share. Needs another destination with traffic; same scale_alpha, its own windows.
    # With per-hour scales, windows of 3 h and more and a 1.2x bytes gate it adds drips
    # without false incidents on tuning seeds 201-208 (0.78 -> 0.85, false 15 -> 15 in 320
    # tenant-weeks); before (one scale per window, from 60 min, gate 1.1) it cost false ones.
    # Off by default since the out/in mix (below): a tenant's common swings cancel in the
    # mix as well, and on the same tuning seeds the share bank added 1 drip of 60 (and one
    # batch +45 min) at the cost of a second bank step a minute (analyze ~10 % slower).
    share_enabled: bool = False
    share_windows_minutes: list[Annotated[int, Field(ge=15, le=1440)]] = [180, 360, 720]
    # A share window pages only if the destination's bytes are this multiple of expected.
    share_min_ratio: Annotated[float, Field(ge=1, le=100)] = 1.2
    # Out/in mix (issue 18.1): the window bank tests a destination's log(bytes out / bytes
    # in) against the slot's usual too, in units of its own minute noise of that, with the
    # same windows and scale_alpha. An upload pushes bytes out with acknowledgements alone
    # coming back, so the mix shifts by the upload's factor, while ordinary calls keep
    # requests and responses paired: that noise is often far below the volume's (3x for 5
    # minutes is invisible in the volume at log-noise 0.9, plain in the mix). Totals (they
    # mix destinations) and batch slots are left out. A mix window pages only if its bytes
    # out are also mix_short_min_ratio times the expected (windows of 15 minutes or less)
    # or scale_min_ratio times (longer ones, as the volume windows). Tuning seeds 201-208,
    # 211-214: drips 52 -> 60 of 60, bursts 57 -> 60, false incidents 11 -> 13 in 480
    # tenant-weeks (with the share bank off; a 1.5x gate on every mix window: 56 drips).
    mix_enabled: bool = True
    mix_short_min_ratio: Annotated[float, Field(ge=1, le=100)] = 1.5
    # Half-life of the learned minute noise of the mix (a week).
    mix_noise_halflife_minutes: Annotated[float, Field(gt=0, le=100_800)] = 10_080.0
    # The weekly batch (issue 18.3): during an hour-of-week slot that is a batch slot (its
    # mean minute far above its median, two weeks of history), the bytes above the ordinary
    # traffic around it (the quieter neighbouring slot's mean) are summed from the hour's
    # start and compared with the same slot's usual batch: an incident once they reach
    # batch_min_ratio times it and beat it by batch_z times the ordinary traffic's hourly noise.
    batch_enabled: bool = True
    batch_min_ratio: Annotated[float, Field(gt=1, le=100)] = 1.3
    batch_z: Annotated[float, Field(ge=0, le=100)] = 3.0
    # Noise scales never go below these (log units).
    sigma_floor: Annotated[float, Field(gt=0, le=5)] = 0.12
    level_sigma_floor: Annotated[float, Field(gt=0, le=5)] = 0.08
    # Multiplicative level (growth) tracker, updated hourly.
    level_halflife_hours: Annotated[float, Field(gt=0, le=24 * 28)] = 36.0
    level_clip: Annotated[float, Field(gt=0, le=5)] = 0.7
    # Cold start: a series with no week of history is scored against an EWMA.
    cold_halflife_minutes: Annotated[float, Field(gt=0, le=10_080)] = 60.0
    cold_sigma: Annotated[float, Field(gt=0, le=5)] = 0.8
    cold_min_age_minutes: Annotated[int, Field(ge=0, le=10_080)] = 120


class RatioSettings(_Frozen):
    """egress_ratio: a destination pushing far more than it usually does per byte pulled."""

    enabled: bool = True
    window_minutes: Annotated[int, Field(ge=1, le=240)] = 15
    min_factor: Annotated[float, Field(gt=1, le=1e6)] = 4.0
    z: Annotated[float, Field(gt=0, le=100)] = 5.0
    min_bytes_out: PositiveBytes = 4_194_304


class NewDestinationSettings(_Frozen):
    enabled: bool = True
    min_bytes: PositiveBytes = 65_536


class UnsanctionedSettings(_Frozen):
    enabled: bool = True
    min_bytes: PositiveBytes = 1
    # A new episode (and page) only after this long without traffic to it.
    episode_gap_minutes: Annotated[int, Field(ge=1, le=10_080)] = 240


class DetectionSettings(_Frozen):
    # No volume or new_destination alert for a tenant before it has been seen this long.
    warmup_days: Annotated[float, Field(ge=0, le=90)] = 7.0
    # Hour-of-week history kept per series; the seasonal fit is the median across weeks.
    baseline_weeks: Annotated[int, Field(ge=1, le=12)] = 3
    refit_hours: Annotated[int, Field(ge=1, le=168)] = 24
    # An episode ends after this many minutes without an alarm.
    episode_gap_minutes: Annotated[int, Field(ge=1, le=10_080)] = 30
    # A series (tenant x destination, or a tenant's total) with no traffic for longer than
    # this is dropped with its baseline, so destinations that come and go do not fill the
    # series table. Eight days: longer than a week, so a series that only pauses (a weekly
    # batch, a quiet weekend or a holiday week) keeps its hour-of-week history; longer than
    # every episode gap (at most 7 days), so idleness never cuts an open episode short.
    series_idle_days: Annotated[float, Field(gt=0, le=365)] = 8.0
    volume: VolumeSettings = VolumeSettings()
    ratio: RatioSettings = RatioSettings()
    new_destination: NewDestinationSettings = NewDestinationSettings()
    unsanctioned: UnsanctionedSettings = UnsanctionedSettings()

    @model_validator(mode="after")
    def _windows(self) -> DetectionSettings:
        if len(set(self.volume.drip_windows_minutes)) != len(self.volume.drip_windows_minutes):
            raise ValueError("volume.drip_windows_minutes has duplicates")
        scales = self.volume.scale_windows_minutes
        if len(set(scales)) != len(scales):
            raise ValueError("volume.scale_windows_minutes has duplicates")
        if any(w > 15 and w % 15 for w in scales):
            raise ValueError("volume.scale_windows_minutes above 15 must be multiples of 15")
        shares = self.volume.share_windows_minutes
        if len(set(shares)) != len(shares) or any(w % 15 for w in shares):
            raise ValueError("volume.share_windows_minutes: distinct multiples of 15 only")
        return self

    @property
    def warmup_minutes(self) -> int:
        return int(self.warmup_days * 1440)

    @property
    def series_idle_seconds(self) -> int:
        return int(self.series_idle_days * 86400)
