"""The live agent's side of detection: minute buckets into the streaming detector.

The same StreamingDetector that `leaktap analyze` drives over a file is fed
here with the CRM volume the agent counts, one closed minute at a time, so an
incident is decided live exactly as it would be from the stored buckets. At
start the detector is warmed with the stored history (its incidents were
handled by the run that lived through them and are not raised again).
Unsanctioned destinations are also checked at every poll, not only when the
minute closes, so the page leaves within seconds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from leaktap.analytics.allowlist import UNKNOWN_INSTANCE, allows
from leaktap.analytics.buckets import Bucket
from leaktap.analytics.incidents import UNSANCTIONED_DESTINATION, Incident, dedup_key
from leaktap.analytics.stream import StreamingDetector
from leaktap.controller.config import LeaktapConfig
from leaktap.controller.storage import BucketKey, Store, Volume, minute_of

logger = logging.getLogger(__name__)

# series the detector keeps state for, destinations and tenant totals (about 30 KB each);
# beyond it a new series takes the slot of the least recently active destination, and
# series idle for detection.series_idle_days are dropped (analytics/stream.py)
DETECTOR_SERIES_MAX = 2000


class LiveDetection:
    """Feeds closed minutes to the detector and hands incidents to `on_incident`."""

    def __init__(
        self, config: LeaktapConfig, store: Store, on_incident: Callable[[Incident], Any]
    ) -> None:
        self.settings = config.detection
        # an instance the attribution could not tell (a shared host, an address shared
        # by several instances) is not evidence of an unsanctioned one (allowlist.allows)
        self.allow = {t.name: frozenset(t.allow) for t in config.tenants if t.allow}
        self.detector = StreamingDetector(
            self.settings, allow=self.allow, max_series=DETECTOR_SERIES_MAX)
        self.store = store
        self.on_incident = on_incident
        self._minute: int | None = None
        self._rows: dict[tuple[str, str, str], list[int]] = {}
        self._immediate: dict[tuple[str, str, str], float] = {}  # series -> last paged
        self._lock = threading.Lock()
        # the detector is scored on the worker and read by the API (baselines)
        self._detector_lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, int, dict[Any, list[int]]] | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    def set_allow(self, allow: dict[str, frozenset[str]]) -> None:
        """New allow lists (a config reload), for the poll's check and the detector."""
        allow = {t: a for t, a in allow.items() if a}
        with self._lock:
            self.allow = allow
            self._immediate.clear()
        with self._detector_lock:
            self.detector.set_allow(allow)

    def warm_start(self, now: float) -> int:
        """Feed the stored history up to the current minute; returns rows fed."""
        weeks = self.settings.baseline_weeks + 1
        until = minute_of(now)
        rows = self.store.buckets(until - weeks * 7 * 86400, until)
        per_minute: dict[tuple[int, str, str, str], list[int]] = {}
        for r in rows:
            if r["crm_vendor"] is None:
                continue
            key = (r["ts"], r["tenant"], r["crm_vendor"], r["crm_instance"] or UNKNOWN_INSTANCE)
            acc = per_minute.setdefault(key, [0, 0])
            acc[0] += r["bytes_out"]
            acc[1] += r["bytes_in"]
        started = time.monotonic()
        for (ts, tenant, vendor, instance), (out, in_) in sorted(per_minute.items()):
            self.detector.observe(Bucket(ts, tenant, vendor, instance, out, in_))
        if per_minute:
            self.detector.advance(until)
        # episodes of the history were paged by the run that saw them
        self.detector.close_all()
        self._minute = until
        logger.info("detector warmed with %d minute rows in %.1f s",
                    len(per_minute), time.monotonic() - started)
        return len(per_minute)

    def start(self) -> None:
        """Score closed minutes on a thread: a daily baseline refit takes seconds."""
        self._worker = threading.Thread(target=self._score_loop, name="lt-detect", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout=30)

    def add(self, buckets: dict[BucketKey, Volume], now: float) -> None:
        """Account one poll's buckets; hand the previous minute over when it ends."""
        minute = minute_of(now)
        immediate: list[Incident] = []
        with self._lock:
            if self._minute is None:
                self._minute = minute
            if minute > self._minute:
                self._queue.put((self._minute, minute, self._rows))
                self._rows = {}
                self._minute = minute
                # a series quiet for a whole episode gap pages anew anyway: forget it
                gap = self.settings.unsanctioned.episode_gap_minutes * 60
                self._immediate = {k: t for k, t in self._immediate.items() if now - t < gap}
            for key, vol in buckets.items():
                if key.crm_vendor is None:
                    continue
                series = (key.tenant, key.crm_vendor, key.crm_instance or UNKNOWN_INSTANCE)
                acc = self._rows.setdefault(series, [0, 0])
                acc[0] += vol.bytes_out
                acc[1] += vol.bytes_in
                if vol.bytes_out:
                    immediate += self._unsanctioned_now(series, minute, now)
        for incident in immediate:
            self.on_incident(incident)

    def _score_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            closed, minute, rows = item
            try:
                with self._detector_lock:
                    for (tenant, vendor, instance), (out, in_) in sorted(rows.items()):
                        self.detector.observe(Bucket(closed, tenant, vendor, instance, out, in_))
                    raised = self.detector.advance(minute)
                # the detector's unsanctioned incident for an episode the poll already
                # paged has the same first minute, hence the same dedup key: it folds
                for incident in raised:
                    self.on_incident(incident)
            except Exception:  # noqa: BLE001 - keep scoring the next minutes
                logger.exception("scoring minute %d", closed)

    def series_stats(self) -> tuple[int, dict[str, int], int]:
        """Series the detector keeps, series dropped by reason, rows of refused new series.
        Read without the detector lock: plain counters, at worst a minute behind."""
        detector = self.detector
        return detector.series_count, dict(detector.evicted), detector.rows_refused

    def baseline(
        self, tenant: str, minutes: list[int], z: float
    ) -> list[tuple[float, float, float] | None]:
        """The detector's expected bytes and band for the tenant's CRM total per minute.
        Waits for a minute being scored (a daily refit can take seconds)."""
        with self._detector_lock:
            band: list[tuple[float, float, float] | None] = self.detector.baseline(
                tenant, minutes, z)
        return band

    def _unsanctioned_now(self, series: tuple[str, str, str], minute: int,
                          now: float) -> list[Incident]:
        tenant, vendor, instance = series
        allowed = self.allow.get(tenant)
        if not allowed or not self.settings.unsanctioned.enabled:
            return []
        if allows(allowed, vendor, instance):
            return []
        gap = self.settings.unsanctioned.episode_gap_minutes * 60
        last = self._immediate.get(series)
        self._immediate[series] = now
        if last is not None and now - last < gap:
            return []  # same episode: paged already
        return [Incident(
            kind=UNSANCTIONED_DESTINATION, tenant=tenant, crm_vendor=vendor,
            crm_instance=instance, first_ts=minute, last_ts=minute, raised_ts=minute,
            severity="high", score=1.0,
            summary=f"{tenant} sent data to {vendor}:{instance}, which is not in its allow list",
            dedup_key=dedup_key(UNSANCTIONED_DESTINATION, tenant, vendor, instance, minute),
            evidence={"allowed": sorted(allowed), "detected": "immediately, on the flow"},
        )]
