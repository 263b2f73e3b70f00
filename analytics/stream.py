"""The streaming detector: minute buckets in, incidents out, strictly causal.

`leaktap analyze` and the live agent drive it the same way: `observe(bucket)` for
each row of the open minute and `advance(ts)` when the clock reaches ts (a row of
a later minute does it implicitly). Closing minute t scores it with the state
built from minutes < t, so an incident raised while closing t carries
`raised_ts = t` and is raised identically from any file that contains the rows
up to t. Baselines are refitted (pandas) every `refit_hours` at an hour close.

Series state is bounded (issue 17.5): a series with no row for `series_idle_days`
is dropped at an hour close, and with `max_series` set a new series takes the slot
of the least recently active destination (never one with a row in the minute
being closed). A freed slot is cleared in every per-series structure before reuse.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
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
_FREE: SeriesKey = ("", None, None)  # the key of a slot whose series was dropped
_NEVER = np.iinfo(np.int64).max // 2  # tenant_first of a free slot: never warm, never pages
IDLE, CAPACITY = "idle", "capacity"  # why a series was dropped
# names of dropped destinations remembered (oldest forgotten first), so that one coming
# back after a pause is not paged as a new destination (about 200 bytes each)
_REMEMBERED_MAX = 20_000


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
        max_series: int | None = None,
    ) -> None:
        """`max_series`: series kept at most (destinations and tenant totals); None: any."""
        self.settings = settings or DetectionSettings()
        if max_series is not None:
            if max_series < 2:
                raise ValueError(f"max_series {max_series} leaves no room for a destination")
            capacity = min(capacity, max_series)
        self._max_series = max_series
        # empty or missing allow list: the tenant has no policy to break
        self._allow = {t: frozenset(a) for t, a in (allow or {}).items() if a}
        self._keys: list[SeriesKey] = []  # per slot; _FREE where the series was dropped
        self._index: dict[SeriesKey, int] = {}
        self._free: list[int] = []  # slots to reuse
        self._freed: list[int] = []  # slots freed or reused since they were last cleared
        # per slot: minute of its last row (set when the minute closes, off the per-row path)
        self._last_seen = np.zeros(capacity, dtype=np.int64)
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
        # rows of series not known yet: admitted when their minute closes, after every known
        # series has had its rows, so a full table evicts only series idle in that minute
        self._new_rows: list[Bucket] = []
        self._refused: dict[str, list[float]] = {}  # tenant -> [out, in] of refused rows
        self._victims: list[int] = []  # least recently active destinations, last first
        self._victims_ts: int | None = None
        self._remembered: dict[SeriesKey, None] = {}  # dropped destinations, oldest first
        self._open_ts: int | None = None
        self.rows_seen = 0  # counted per minute, off the per-row path
        self.evicted = {IDLE: 0, CAPACITY: 0}  # series dropped, by reason
        # rows of a new series when every slot had a row in the same minute (a flood of new
        # destinations): their bytes still count in their tenant's total when it has one
        self.rows_refused = 0

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
            self._new_rows.append(bucket)
            return raised
        self._rows_idx.append(index)
        self._rows_out.append(bucket[4])
        self._rows_in.append(bucket[5])
        return raised

    def observe_all(self, buckets: Iterable[Bucket], new_minute: Callable[[], None]) -> None:
        """`observe` each row in turn (`leaktap analyze`), calling `new_minute()` before the
        first row of each minute, before that row closes the minutes before it. The same as
        observe row by row; the rows of the open minute go straight to its lists."""
        index_of = self._index.get
        newest: int | None = None
        rows_idx, rows_out, rows_in = self._rows_idx, self._rows_out, self._rows_in
        for bucket in buckets:
            if bucket[0] != newest:
                new_minute()
                self.observe(bucket)  # closes the minutes before it: new row lists
                newest = bucket[0]
                rows_idx, rows_out, rows_in = self._rows_idx, self._rows_out, self._rows_in
                continue
            index = index_of(bucket[1:4])
            if index is None:
                self._new_rows.append(bucket)
            else:
                rows_idx.append(index)
                rows_out.append(bucket[4])
                rows_in.append(bucket[5])

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
        """Series kept (destinations and tenant totals)."""
        return len(self._keys) - len(self._free)

    @property
    def slots(self) -> int:
        """Slots of every per-series array in use, free ones included (<= max_series)."""
        return len(self._keys)

    # -- series ---------------------------------------------------------------

    def _grow(self) -> None:
        cap = self._cap * 2
        if self._max_series is not None:
            cap = min(cap, self._max_series)
        extra = cap - self._cap
        self._total_of = np.concatenate([self._total_of, np.zeros(extra, dtype=np.int64)])
        self._tenant_first = np.concatenate([self._tenant_first, np.zeros(extra, dtype=np.int64)])
        self._unsanctioned = np.concatenate([self._unsanctioned, np.zeros(extra, dtype=bool)])
        self._last_seen = np.concatenate([self._last_seen, np.zeros(extra, dtype=np.int64)])
        self._volume.grow(cap)
        self._history.grow(cap)
        self._cap = cap

    def _new_series(self, key: SeriesKey, tenant_first: int, is_total: bool, ts: int) -> int:
        if self._free:
            index = self._free.pop()
            self._keys[index] = key
            self._last_seen[index] = ts
            # a dropped series' slot: nothing of it may reach the new one (cleared before
            # the minute is scored, with the other slots of the minute: _clear_freed)
            self._freed.append(index)
        else:
            if len(self._keys) == self._cap:
                self._grow()
            index = len(self._keys)
            self._keys.append(key)
            self._last_seen[index] = ts
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

    def _add_destination(self, key: SeriesKey, ts: int) -> int | None:
        """Admit a new destination (and its tenant's total); None: no room at minute ts."""
        tenant, vendor, instance = key
        if not self._make_room(tenant, ts):
            return None
        # kept when the tenant's series are dropped (one entry per tenant): a tenant that
        # comes back is not blind for another warm-up
        first = self._tenant_first_ts.setdefault(tenant, ts)
        total = self._index.get((tenant, None, None))
        if total is None:
            total = self._new_series((tenant, None, None), first, is_total=True, ts=ts)
            self._total_of[total] = -1
            # not watched before its tenant's first row (e.g. the start of the history):
            # a partly watched first hour stays out of the fit (HourlyHistory.close_hour)
            self._history.add_series(total)
        index = self._new_series(key, first, is_total=False, ts=ts)
        returning = key in self._remembered  # seen before, dropped while idle
        self._remembered.pop(key, None)
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
            and not returning
            and not self._unnamed_of_known_vendor(tenant, vendor, instance, index)
        ):
            self._pending[index] = _Pending(first_ts=ts)
        return index

    def _make_room(self, tenant: str, ts: int) -> bool:
        """Evict least recently active destinations until a destination of `tenant` (and its
        total if it has none) fits under max_series; False if every one had a row at ts."""
        if self._max_series is None:
            return True
        while True:
            need = 1 if (tenant, None, None) in self._index else 2
            if self.series_count + need <= self._max_series:
                return True
            victim = self._least_recent(ts)
            if victim is None:
                return False
            self._drop(victim, CAPACITY)

    def _least_recent(self, ts: int) -> int | None:
        """The destination whose last row is the oldest, among those with none at ts (all
        rows of known series are in: new series are admitted at the close). The order is
        sorted once per minute; a slot dropped or reused since is skipped."""
        if self._victims_ts != ts:
            n = len(self._keys)
            last = self._last_seen[:n]
            active = np.zeros(n, dtype=bool)
            active[np.asarray(self._rows_idx, dtype=np.int64)] = True
            candidates = np.flatnonzero((self._total_of[:n] >= 0) & (last < ts) & ~active)
            order = candidates[np.argsort(last[candidates], kind="stable")]
            self._victims = order[::-1].tolist()
            self._victims_ts = ts
        while self._victims:
            index: int = self._victims.pop()
            if self._total_of[index] >= 0 and self._last_seen[index] < ts:
                return index
        return None

    def _drop_idle(self, ts: int) -> None:
        """Drop destinations without a row for longer than series_idle_days (hourly)."""
        n = len(self._keys)
        last = self._last_seen[:n]
        idle = (self._total_of[:n] >= 0) & (last < ts - self.settings.series_idle_seconds)
        for index in np.flatnonzero(idle).tolist():
            self._drop(index, IDLE)
        self._clear_freed()

    def _drop(self, index: int, reason: str) -> None:
        """Forget a destination series, and its tenant's total with its last destination.
        Its open episodes end now (pop_closed hands them over): a series that takes the slot
        later must not extend them."""
        tenant = self._keys[index][0]
        for kind in (NEW_DESTINATION, UNSANCTIONED_DESTINATION):
            self._book.close((kind, index))
        self._pending.pop(index, None)
        self._open_dest.pop(index, None)
        self._remembered[self._keys[index]] = None  # not remembered while live: at the end
        if len(self._remembered) > _REMEMBERED_MAX:
            del self._remembered[next(iter(self._remembered))]
        series = self._tenant_series[tenant]
        series.remove(index)
        self._release(index, reason)
        if len(series) == 1:  # only the tenant's total is left
            self._release(series[0], reason)
            del self._tenant_series[tenant]

    def _release(self, index: int, reason: str) -> None:
        del self._index[self._keys[index]]
        self._keys[index] = _FREE
        self._free.append(index)
        self._total_of[index] = -1  # rows never name a free slot; not a candidate victim
        self._tenant_first[index] = _NEVER  # stepped with idle minutes until reused: silent
        self._unsanctioned[index] = False
        self._freed.append(index)  # its history would otherwise be refitted until reused
        self.evicted[reason] += 1

    def _clear_freed(self) -> None:
        """Clear every slot freed or reused since the last call, in one pass per array."""
        if self._freed:
            slots = np.unique(np.asarray(self._freed, dtype=np.int64))
            self._volume.clear(slots)
            self._history.clear(slots)
            self._freed.clear()

    def _admit_new(self, ts: int) -> None:
        """Rows of series first seen in minute ts, after every known series' rows."""
        rows, self._new_rows = self._new_rows, []
        for bucket in rows:
            key: SeriesKey = bucket[1:4]
            index = self._index.get(key)
            if index is None:
                index = self._add_destination(key, ts)
            if index is None:
                self.rows_refused += 1
                refused = self._refused.setdefault(key[0], [0.0, 0.0])
                refused[0] += bucket[4]
                refused[1] += bucket[5]
                continue
            self._last_seen[index] = ts
            self._rows_idx.append(index)
            self._rows_out.append(bucket[4])
            self._rows_in.append(bucket[5])
        self._clear_freed()

    def _unnamed_of_known_vendor(
        self, tenant: str, vendor: str | None, instance: str | None, index: int
    ) -> bool:
        """A shared host (sign-in, regional API) of a vendor the tenant already uses is
        not a new destination: it names no instance, new or old."""
        if instance not in (None, UNKNOWN_INSTANCE):
            return False
        return any(
            self._keys[i][1] == vendor for i in self._tenant_series.get(tenant, ()) if i != index
        ) or any(k[0] == tenant and k[1] == vendor for k in self._remembered)

    # -- the minute -----------------------------------------------------------

    def _close_minute(self, ts: int) -> list[Incident]:
        if self._new_rows:
            self._admit_new(ts)
        n = len(self._keys)
        if self._rows_idx:
            idx = np.asarray(self._rows_idx, dtype=np.int64)
            out = np.asarray(self._rows_out, dtype=np.float64)
            inb = np.asarray(self._rows_in, dtype=np.float64)
            self.rows_seen += len(idx)
            self._last_seen[idx] = ts
            totals = self._total_of[idx]
            x: np.ndarray = np.bincount(idx, out, n) + np.bincount(totals, out, n)
            y: np.ndarray = np.bincount(idx, inb, n) + np.bincount(totals, inb, n)
            self._rows_idx, self._rows_out, self._rows_in = [], [], []
        else:
            x = np.zeros(n)
            y = np.zeros(n)
        for tenant, (out_refused, in_refused) in self._refused.items():
            total = self._index.get((tenant, None, None))
            if total is not None:  # the tenant's volume stays whole
                x[total] += out_refused
                y[total] += in_refused
        self._refused.clear()
        minute = (ts // MINUTE) % MINUTES_PER_HOUR
        self._history.record_minute(minute, x, y)
        warm = self._tenant_first[:n] + self.settings.warmup_minutes * MINUTE <= ts
        alarms = self._volume.score(ts, x, y, warm, self._total_of[:n])
        raised = self._on_volume(ts, alarms)
        if self._book.has_open:
            self._hold_suspected(ts)
        raised += self._on_new_destinations(ts, x)
        raised += self._on_unsanctioned(ts, x)
        for key in self._book.expire(ts) if self._book.has_open else ():
            if isinstance(key, tuple) and key[0] == "volume":
                self._volume.forget_recent(
                    np.asarray(self._tenant_series.get(key[1], []), dtype=np.int64))
        if minute == MINUTES_PER_HOUR - 1:
            self._close_hour(ts // 3600, n)
            self._drop_idle(ts)
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

    def _hold_suspected(self, ts: int) -> None:
        """An open volume episode stays open while a window of one of its tenant's series is
        still under suspicion (near its threshold, not past it): a drip whose first page came
        from a short window is one episode, not a new page each time the alarms pause."""
        for index in np.flatnonzero(self._volume.suspected()).tolist():
            key = ("volume", self._keys[index][0])
            if self._book.get(key) is not None:
                self._book.extend(key, ts, False, 0.0)

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
                        {self._label(i) for i, k in enumerate(self._keys)
                         if k[0] == tenant and k[1] is not None and i != index}
                        | {f"{k[1]}:{k[2]}" for k in self._remembered if k[0] == tenant}
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
