"""The streaming detector: minute buckets in, incidents out, strictly causal.

`leaktap analyze` and the live agent drive it the same way: `observe(bucket)` for
each row of the open minute and `advance(ts)` when the clock reaches ts (a row of
a later minute does it implicitly). Closing minute t scores it with the state
built from minutes < t, so an incident raised while closing t carries
`raised_ts = t` and is raised identically from any file that contains the rows
up to t. Baselines are refitted (pandas) every `refit_hours` at an hour close.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from leaktap.analytics.allowlist import UNKNOWN_INSTANCE, allows
from leaktap.analytics.baseline import MINUTES_PER_HOUR, HourlyHistory, fit_seasonal
from leaktap.analytics.buckets import MINUTE, Bucket
from leaktap.analytics.detectors import VolumeAlarms, VolumeScorer
from leaktap.analytics.incidents import (
    EGRESS_RATIO,
    NEW_DESTINATION,
    UNSANCTIONED_DESTINATION,
    VOLUME_ANOMALY,
    Incident,
    IncidentBook,
)
from leaktap.analytics.settings import DetectionSettings

logger = logging.getLogger(__name__)

SeriesKey = tuple[str, str | None, str | None]  # (tenant, vendor, instance); None: tenant total
_MAX_LISTED_SERIES = 20


@dataclass
class _Pending:
    """A destination first seen after its tenant's warm-up, below the floor so far."""

    first_ts: int
    bytes_out: float = 0.0


def _human_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class StreamingDetector:
    """Every detector over every (tenant, destination) and tenant-total series."""

    def __init__(
        self,
        settings: DetectionSettings | None = None,
        allow: Mapping[str, Iterable[str]] | None = None,
        capacity: int = 64,
    ) -> None:
        self.settings = settings or DetectionSettings()
        # empty or missing allow list: the tenant has no policy to break
        self._allow = {t: frozenset(a) for t, a in (allow or {}).items() if a}
        self._keys: list[SeriesKey] = []
        self._index: dict[SeriesKey, int] = {}
        self._cap = capacity
        self._total_of = np.zeros(capacity, dtype=np.int64)
        self._tenant_first = np.zeros(capacity, dtype=np.int64)  # per series: tenant first seen
        self._unsanctioned = np.zeros(capacity, dtype=bool)
        self._tenant_first_ts: dict[str, int] = {}
        self._tenant_series: dict[str, list[int]] = {}
        self._volume = VolumeScorer(self.settings, capacity)
        self._history = HourlyHistory(self.settings.baseline_weeks, capacity)
        self._book = IncidentBook()
        self._pending: dict[int, _Pending] = {}
        self._open_dest: dict[int, tuple[str, int]] = {}  # series -> (kind, index) of its page
        self._rows_idx: list[int] = []
        self._rows_out: list[int] = []
        self._rows_in: list[int] = []
        self._open_ts: int | None = None
        self.rows_seen = 0  # counted per minute, off the per-row path

    # -- feeding --------------------------------------------------------------

    def observe(self, bucket: Bucket) -> list[Incident]:
        """Add one row; a row of a later minute first closes the open minute(s)."""
        raised: list[Incident] = []
        ts = bucket[0]
        if ts != self._open_ts:
            if self._open_ts is not None and ts < self._open_ts:
                raise ValueError(f"bucket at {ts} is older than the open minute {self._open_ts}")
            raised = self.advance(ts)
        key: SeriesKey = bucket[1:4]  # (tenant, vendor, instance), hot path
        index = self._index.get(key)
        if index is None:
            index = self._add_destination(key, ts)
        self._rows_idx.append(index)
        self._rows_out.append(bucket[4])
        self._rows_in.append(bucket[5])
        return raised

    def advance(self, ts: int) -> list[Incident]:
        """Close every minute before `ts` (idle minutes count as zero traffic)."""
        if ts % MINUTE:
            raise ValueError(f"ts {ts} is not minute-aligned")
        if self._open_ts is None:
            self._open_ts = ts
            return []
        raised: list[Incident] = []
        while self._open_ts < ts:
            raised += self._close_minute(self._open_ts)
            self._open_ts += MINUTE
        return raised

    def flush(self) -> list[Incident]:
        """Close the open minute (end of input): its rows are all there."""
        if self._open_ts is None:
            return []
        return self.advance(self._open_ts + MINUTE)

    def pop_closed(self) -> list[Incident]:
        """Incidents whose episode has ended since the last call, final spans included."""
        closed: list[Incident] = self._book.pop_closed()
        return closed

    def close_all(self) -> list[Incident]:
        """End every open episode (end of input) and return all closed incidents."""
        self._book.close_all()
        self._open_dest.clear()
        closed: list[Incident] = self._book.pop_closed()
        return closed

    def open_incidents(self) -> list[Incident]:
        opened: list[Incident] = self._book.open_incidents()
        return opened

    def baseline(
        self, tenant: str, minutes: list[int], z: float
    ) -> list[tuple[float, float, float] | None]:
        """(expected, low, high) bytes per minute of the tenant's total CRM egress at each
        minute by the current fit (VolumeScorer.band); None before a seasonal fit."""
        index = self._index.get((tenant, None, None))
        if index is None:
            return [None] * len(minutes)
        band: list[tuple[float, float, float] | None] = self._volume.band(index, minutes, z)
        return band

    @property
    def series_count(self) -> int:
        return len(self._keys)

    # -- series ---------------------------------------------------------------

    def _grow(self) -> None:
        cap = self._cap * 2
        extra = cap - self._cap
        self._total_of = np.concatenate([self._total_of, np.zeros(extra, dtype=np.int64)])
        self._tenant_first = np.concatenate([self._tenant_first, np.zeros(extra, dtype=np.int64)])
        self._unsanctioned = np.concatenate([self._unsanctioned, np.zeros(extra, dtype=bool)])
        self._volume.grow(cap)
        self._history.grow(cap)
        self._cap = cap

    def _new_series(self, key: SeriesKey, tenant_first: int, is_total: bool) -> int:
        if len(self._keys) == self._cap:
            self._grow()
        index = len(self._keys)
        self._keys.append(key)
        self._index[key] = index
        self._tenant_series.setdefault(key[0], []).append(index)
        self._tenant_first[index] = tenant_first
        self._volume.add_series(index, is_total)
        return index

    def set_allow(self, allow: Mapping[str, Iterable[str]]) -> None:
        """Replace the allow lists (a config reload): every known destination is judged
        again; an episode already open stays open until its gap."""
        self._allow = {t: frozenset(a) for t, a in allow.items() if a}
        for index, (tenant, vendor, instance) in enumerate(self._keys):
            if vendor is None:
                continue
            policy = self._allow.get(tenant)
            self._unsanctioned[index] = (
                policy is not None and self.settings.unsanctioned.enabled
                and not allows(policy, vendor, instance))

    def _add_destination(self, key: SeriesKey, ts: int) -> int:
        tenant, vendor, instance = key
        first = self._tenant_first_ts.setdefault(tenant, ts)
        total = self._index.get((tenant, None, None))
        if total is None:
            total = self._new_series((tenant, None, None), first, is_total=True)
            self._total_of[total] = -1
            # not watched before its tenant's first row (e.g. the start of the history):
            # a partly watched first hour stays out of the fit (HourlyHistory.close_hour)
            self._history.add_series(total)
        index = self._new_series(key, first, is_total=False)
        self._total_of[index] = total
        self._history.add_series(index, watched_like=total)
        policy = self._allow.get(tenant)
        if (
            policy is not None and self.settings.unsanctioned.enabled
            and not allows(policy, vendor, instance)
        ):
            self._unsanctioned[index] = True
        elif (
            self.settings.new_destination.enabled
            and ts >= first + self.settings.warmup_minutes * MINUTE
            and not self._unnamed_of_known_vendor(tenant, vendor, instance, index)
        ):
            self._pending[index] = _Pending(first_ts=ts)
        return index

    def _unnamed_of_known_vendor(
        self, tenant: str, vendor: str | None, instance: str | None, index: int
    ) -> bool:
        """A shared host (sign-in, regional API) of a vendor the tenant already uses is
        not a new destination: it names no instance, new or old."""
        if instance not in (None, UNKNOWN_INSTANCE):
            return False
        return any(
            self._keys[i][1] == vendor for i in self._tenant_series.get(tenant, ()) if i != index
        )

    # -- the minute -----------------------------------------------------------

    def _close_minute(self, ts: int) -> list[Incident]:
        n = len(self._keys)
        if self._rows_idx:
            idx = np.asarray(self._rows_idx, dtype=np.int64)
            out = np.asarray(self._rows_out, dtype=np.float64)
            inb = np.asarray(self._rows_in, dtype=np.float64)
            self.rows_seen += len(idx)
            totals = self._total_of[idx]
            x: np.ndarray = np.bincount(idx, out, n) + np.bincount(totals, out, n)
            y: np.ndarray = np.bincount(idx, inb, n) + np.bincount(totals, inb, n)
            self._rows_idx, self._rows_out, self._rows_in = [], [], []
        else:
            x = np.zeros(n)
            y = np.zeros(n)
        minute = (ts // MINUTE) % MINUTES_PER_HOUR
        self._history.record_minute(minute, x, y)
        warm = self._tenant_first[:n] + self.settings.warmup_minutes * MINUTE <= ts
        alarms = self._volume.score(ts, x, y, warm)
        raised = self._on_volume(ts, alarms)
        raised += self._on_new_destinations(ts, x)
        raised += self._on_unsanctioned(ts, x)
        for key in self._book.expire(ts) if self._book.has_open else ():
            if isinstance(key, tuple) and key[0] == "volume":
                self._volume.forget_recent(np.asarray(self._tenant_series[key[1]]))
        if minute == MINUTES_PER_HOUR - 1:
            self._close_hour(ts // 3600, n)
        return raised

    def _close_hour(self, abs_hour: int, n: int) -> None:
        sums = self._history.close_hour(abs_hour, n)
        self._volume.close_hour(abs_hour, sums)
        if (abs_hour + 1) % self.settings.refit_hours == 0:
            self.refit()

    def refit(self) -> None:
        """Refit the seasonal baselines from the stored hourly history (pandas)."""
        n = len(self._keys)
        if n == 0:
            return
        vol = self.settings.volume
        fit = fit_seasonal(
            self._history.frame(n), n, float(vol.floor_bytes_per_minute),
            vol.sigma_floor, vol.level_sigma_floor,
        )
        self._volume.set_fit(fit, n)
        logger.debug("refitted baselines of %d series", n)

    # -- incidents ------------------------------------------------------------

    def _label(self, index: int) -> str:
        _, vendor, instance = self._keys[index]
        return f"{vendor}:{instance}" if vendor is not None else "*"

    def _on_volume(self, ts: int, alarms: VolumeAlarms | None) -> list[Incident]:
        raised: list[Incident] = []
        if alarms is None:
            return raised
        gap = self.settings.episode_gap_minutes * MINUTE
        floor = float(self.settings.volume.floor_bytes_per_minute)
        # destinations before totals, so that a page names the destination when it can
        order = sorted(
            range(len(alarms.index)), key=lambda j: self._keys[alarms.index[j]][1] is None
        )
        for j in order:
            index = int(alarms.index[j])
            tenant, vendor, instance = self._keys[index]
            key = ("volume", tenant)
            score = round(float(alarms.score[j]), 3)
            observed, expected = float(alarms.observed[j]), float(alarms.expected[j])
            incident = self._book.extend(key, ts, bool(alarms.active[j]), score)
            if incident is not None:
                evidence = incident.evidence
                evidence["peak_observed_bytes"] = max(
                    evidence["peak_observed_bytes"], int(observed)
                )
                evidence["minutes_in_alarm"] += 1
                detectors, series = evidence["detectors"], evidence["series_alarmed"]
                if alarms.detector[j] not in detectors:
                    detectors.append(alarms.detector[j])
                label = self._label(index)
                if label not in series and len(series) < _MAX_LISTED_SERIES:
                    series.append(label)
                continue
            detector = alarms.detector[j]
            kind = EGRESS_RATIO if detector == "ratio" else VOLUME_ANOMALY
            factor = (observed + floor) / (expected + floor)
            excess = float(alarms.excess[j])
            severity = "high" if factor >= 10 or excess >= 2**30 else "medium"
            where = self._label(index)
            window = int(alarms.window[j])
            window_observed = float(alarms.window_observed[j])
            window_expected = float(alarms.window_expected[j])
            span = "this minute" if window == 1 else f"over the last {window} minutes"
            if window > 1:  # the window's volumes tell why it fired, not its last minute
                factor = (window_observed + window * floor) / (window_expected + window * floor)
                observed_text, expected_text = window_observed, window_expected
            else:
                observed_text, expected_text = observed, expected
            summary = (
                f"{tenant} -> {where if vendor else 'all CRM destinations'}: "
                f"{_human_bytes(observed_text)} out {span}, {factor:.2f}x the expected "
                f"{_human_bytes(expected_text)} ({detector}, score {score:.2f}; "
                f"{_human_bytes(excess)} above baseline)"
            )
            incident = Incident(
                kind=kind, tenant=tenant, crm_vendor=vendor, crm_instance=instance,
                first_ts=int(alarms.first_ts[j]), last_ts=ts, raised_ts=ts,
                severity=severity, score=score, summary=summary,
                evidence={
                    "detector": detector,
                    "detectors": [detector],
                    "series": "destination" if vendor else "tenant_total",
                    "baseline": "seasonal" if alarms.seasonal[j] else "ewma",
                    "weeks_of_history": int(alarms.weeks[j]) if alarms.seasonal[j] else 0,
                    "level_factor": round(math.exp(float(alarms.level[j])), 3),
                    "observed_bytes": int(observed),
                    "expected_bytes": int(expected),
                    "excess_bytes": int(excess),
                    "z": round(float(alarms.z[j]), 2),
                    "score": score,
                    "window_minutes": window,
                    "window_observed_bytes": int(window_observed),
                    "window_expected_bytes": int(window_expected),
                    "peak_observed_bytes": int(observed),
                    "minutes_in_alarm": 1,
                    "series_alarmed": [where],
                },
            )
            self._book.open(key, incident, gap)
            raised.append(incident)
        return raised

    def _on_new_destinations(self, ts: int, x: np.ndarray) -> list[Incident]:
        raised: list[Incident] = []
        floor = self.settings.new_destination.min_bytes
        for index, pending in list(self._pending.items()):
            pending.bytes_out += float(x[index])
            if pending.bytes_out < floor or pending.bytes_out <= 0:
                continue
            del self._pending[index]
            tenant, vendor, instance = self._keys[index]
            incident = Incident(
                kind=NEW_DESTINATION, tenant=tenant, crm_vendor=vendor, crm_instance=instance,
                first_ts=pending.first_ts, last_ts=ts, raised_ts=ts, severity="medium",
                score=round(pending.bytes_out / max(floor, 1), 3),
                summary=(
                    f"{tenant} sent {_human_bytes(pending.bytes_out)} to {vendor}:{instance}, "
                    "a CRM instance never seen for this tenant"
                ),
                evidence={
                    "bytes_out": int(pending.bytes_out),
                    "known_destinations": sorted(
                        self._label(i) for i, k in enumerate(self._keys)
                        if k[0] == tenant and k[1] is not None and i != index
                    )[:_MAX_LISTED_SERIES],
                },
            )
            gap = self.settings.episode_gap_minutes * MINUTE
            self._book.open((NEW_DESTINATION, index), incident, gap)
            self._open_dest[index] = (NEW_DESTINATION, index)
            raised.append(incident)
        for index, key in list(self._open_dest.items()):
            if self._book.get(key) is None:
                del self._open_dest[index]
            elif key[0] == NEW_DESTINATION and x[index] > 0:
                self._book.extend(key, ts, True, 0.0)
        return raised

    def _on_unsanctioned(self, ts: int, x: np.ndarray) -> list[Incident]:
        raised: list[Incident] = []
        cfg = self.settings.unsanctioned
        n = x.shape[0]
        hits = np.flatnonzero(self._unsanctioned[:n] & (x >= max(cfg.min_bytes, 1)))
        for index in hits.tolist():
            key = (UNSANCTIONED_DESTINATION, index)
            if self._book.extend(key, ts, True, 0.0) is not None:
                incident = self._book.get(key)
                if incident is not None:
                    incident.evidence["bytes_out"] += int(x[index])
                continue
            tenant, vendor, instance = self._keys[index]
            incident = Incident(
                kind=UNSANCTIONED_DESTINATION, tenant=tenant, crm_vendor=vendor,
                crm_instance=instance, first_ts=ts, last_ts=ts, raised_ts=ts, severity="high",
                score=1.0,
                summary=(
                    f"{tenant} sent {_human_bytes(float(x[index]))} to {vendor}:{instance}, "
                    "outside its allow list"
                ),
                evidence={
                    "bytes_out": int(x[index]),
                    "allow": sorted(self._allow.get(tenant, ())),
                },
            )
            self._book.open(key, incident, cfg.episode_gap_minutes * MINUTE)
            raised.append(incident)
        return raised
