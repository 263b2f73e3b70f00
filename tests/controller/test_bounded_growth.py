"""Bounded growth (issue 17.5): a day of a busy node, time-warped with a fake clock.

50,000 short-lived cgroups and 10,000 distinct destinations (bursts of made-up
server names, as a process under an attacker's control would produce) go
through the real alert lifecycle, outbox, pruning, per-cgroup reaping, metric
series caps and live detection. At the end every table, map and series count
is bounded by the rate times the retention, never by the input, and every byte
counted in the per-cgroup map is still accounted.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from leaktap.analytics.alert_settings import AlertsSettings
from leaktap.analytics.alerts import STORM_PREFIX, AlertManager, Finding, SinkRoute
from leaktap.analytics.outbox import OutboxDispatcher
from leaktap.analytics.sinks.file import FileSettings, FileSink
from leaktap.analytics.stream import StreamingDetector
from leaktap.controller.api.main import create_app
from leaktap.controller.config import parse_config
from leaktap.controller.detection import DETECTOR_SERIES_MAX, LiveDetection
from leaktap.controller.kernel.cgroups import (
    CGROUP_SERIES_MAX,
    CgroupAccounting,
    CgroupReaper,
    cgroup_ids,
)
from leaktap.controller.series import OTHER, SeriesCap
from leaktap.controller.storage import BucketKey, Store, Volume, minute_of

T0 = 1_704_067_200.0  # 2024-01-01 00:00 UTC
DAY = 86400
HOUR = 3600
READER = "reader-token-0123456789"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as c:
        return {t: c.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("alerts", "alert_changes", "alert_keys", "outbox")}


def test_a_day_of_destination_storms_leaves_bounded_alert_tables(tmp_path: Path) -> None:
    store = Store(tmp_path / "lt.db")
    clock = Clock(T0)
    settings = AlertsSettings()  # storm: > 20 destinations in 10 min; auto-resolve after 1 h
    retention_s = 6 * HOUR  # short, so that a day reaches the steady state
    sink = FileSink(FileSettings(type="file", path=str(tmp_path / "alerts.jsonl"), fsync=False))
    outbox = OutboxDispatcher(store.path, [sink], clock=clock)
    alerts = AlertManager(store.path, [SinkRoute("file")], settings, clock=clock)
    # every 28.8 min one tenant makes up 200 server names in 42 s
    per_burst, bursts, every = 200, 50, DAY // 50
    storms: list[dict[str, Any]] = []
    peak = dict.fromkeys(counts(store.path), 0)
    n = 0
    for burst in range(bursts):
        start = T0 + burst * every
        tenant = f"tenant{burst % 10}"
        for i in range(per_burst):
            clock.t = start + i * 42 / per_burst
            alerts.record(Finding(
                kind="unsanctioned_destination", tenant=tenant, severity="high",
                summary=f"{tenant} -> salesforce:x{n}", crm_vendor="salesforce",
                crm_instance=f"x{n}", ts=clock.t, evidence={"sni": f"x{n}.my.salesforce.com"}))
            n += 1
        while outbox.deliver_due("file"):
            pass
        storm = [a for a in alerts.list_alerts(tenant=tenant, limit=1000)
                 if a["dedup_key"].startswith(STORM_PREFIX) and a["raised_ts"] >= start]
        storms += storm
        # the agent's hourly housekeeping, compressed: auto-resolve, deliver, prune
        for step in (600, 1200, every):
            clock.t = start + step
            alerts.tick()
            while outbox.deliver_due("file"):
                pass
            if step == every and burst % 2 == 1:
                alerts.prune(clock.t - retention_s)
        peak = {t: max(peak[t], v) for t, v in counts(store.path).items()}
    assert n == 10_000
    # one storm alert per burst, paged once, listing the top destinations and the count
    assert len(storms) == bursts
    for storm in storms:
        ev = storm["evidence"]
        assert storm["destination"] is None and storm["count"] == per_burst - 20
        assert ev["distinct_destinations"] == per_burst and len(ev["top_destinations"]) == 20
    # the bound: what the retention, auto-resolve and prune cadence keep, per burst
    kept_bursts = (retention_s + settings.auto_resolve_after_s + HOUR) // every + 1
    per_burst_alerts = settings.storm.distinct_destinations + 1
    final = counts(store.path)
    # before: 10,000 alerts, 20,000 changes, 20,000 outbox rows, all kept for good
    assert peak["alerts"] <= kept_bursts * per_burst_alerts, peak
    assert peak["alert_changes"] <= 2 * peak["alerts"] and peak["outbox"] <= peak["alert_changes"]
    assert peak["alert_keys"] <= kept_bursts * (2 * per_burst + 1), peak
    assert 0 < final["alerts"] <= peak["alerts"]
    with sqlite3.connect(store.path) as c:
        assert c.execute("SELECT COUNT(*) FROM outbox WHERE state != 'delivered'").fetchone()[0] \
            == 0
    outbox.stop()
    alerts.close()
    store.close()


class FakeCgroupMap:
    """lt_cgtot as user space sees it (id -> (bytes, packets)), updated like the kernel."""

    def __init__(self, max_entries: int = 16_384) -> None:
        self.entries: dict[int, tuple[int, int]] = {}
        self.max_entries = max_entries
        self.refused = 0  # BPF_NOEXIST inserts into a full map (bytes lost)

    def count(self, cgid: int, nbytes: int) -> bool:
        if cgid not in self.entries and len(self.entries) >= self.max_entries:
            self.refused += 1
            return False
        b, p = self.entries.get(cgid, (0, 0))
        self.entries[cgid] = (b + nbytes, p + 1)
        return True

    def remove(self, ids: list[int]) -> dict[int, tuple[int, int]]:
        return {cgid: self.entries.pop(cgid) for cgid in ids if cgid in self.entries}


def test_a_day_of_50000_short_lived_cgroups_keeps_the_totals_map_bounded() -> None:
    rng = random.Random(17)
    clock = Clock(0.0)
    live: set[int] = {1}  # the root cgroup
    kernel = FakeCgroupMap()
    reaper = CgroupReaper(lambda: set(live), scan_every_s=60, clock=clock)
    accounting = CgroupAccounting(reaper)
    counted = 0
    born = 0
    deaths: list[tuple[float, int]] = []  # (time, id)
    next_id = 10_000
    peak_entries = peak_live = 0
    poll_s = 5
    for tick in range(DAY // poll_s):
        clock.t = tick * poll_s
        # ~2.9 cgroups born per poll, each living 1 to 10 minutes
        polls = DAY // poll_s
        for _ in range((tick + 1) * 50_000 // polls - tick * 50_000 // polls):
            next_id += rng.randint(1, 3)  # inode numbers are sparse
            live.add(next_id)
            deaths.append((clock.t + rng.uniform(60, 600), next_id))
            born += 1
        for cgid in live:
            nbytes = rng.randint(60, 3000)
            if kernel.count(cgid, nbytes):
                counted += nbytes
        kernel.count(0, 100)  # forwarded traffic without a cgroup is never reaped
        counted += 100
        while deaths and deaths[0][0] <= clock.t:
            live.discard(deaths.pop(0)[1])
            deaths.sort()
        live_totals = accounting.update(dict(kernel.entries), kernel.remove)
        assert set(live_totals) == set(kernel.entries)
        peak_entries = max(peak_entries, len(kernel.entries))
        peak_live = max(peak_live, len(live))
    assert born == 50_000
    assert kernel.refused == 0  # before: the 16,384-entry map filled in ~8 hours
    assert reaper.removed >= 50_000 - len(live) - 200
    # at most two scan intervals of deaths (plus the scan's own) wait for their removal
    churn = 3 * (2 * 60 + 60) // poll_s * 3
    assert peak_entries <= peak_live + 1 + churn, (peak_entries, peak_live)
    series = accounting.series()
    assert len(series) <= CGROUP_SERIES_MAX + 1 and OTHER in series
    assert len(accounting.cap.admitted) <= CGROUP_SERIES_MAX
    # every byte accounted: the exported series sum to everything the map counted
    assert sum(b for b, _ in series.values()) == counted
    assert sum(b for b, _ in kernel.entries.values()) + reaper.retired[0] == counted


def test_metrics_cap_series_and_count_what_they_fold(tmp_path: Path) -> None:
    egress_cap: SeriesCap[tuple[str, str, str]] = SeriesCap(1000)
    egress: dict[tuple[str, str, str], tuple[int, int]] = {}
    for n in range(10_000):  # the agent's poll: a new destination is admitted or folded
        dest = ("acme", "salesforce", f"x{n}")
        if dest not in egress and not egress_cap.admits(dest):
            dest = (OTHER, OTHER, OTHER)
        b, p = egress.get(dest, (0, 0))
        egress[dest] = (b + 10, p + 1)
    accounting = CgroupAccounting(None, series_max=3)
    accounting.update({n: (n, 1) for n in range(1, 8)}, lambda ids: {})
    store = Store(tmp_path / "lt.db")
    agent = SimpleNamespace(
        stats={}, totals={}, cgroup_totals={}, cgroup_accounting=accounting,
        egress_series=egress_cap, egress_by_destination=egress, unattributed_bytes=0, table=[],
        interfaces=[], attached=True, plaintext=None, probes=SimpleNamespace(attach_modes={}),
        alerts=None, outbox=None, ready=lambda: (True, "ok"),
    )
    with TestClient(create_app(agent, readers=[READER], admins=[], manage=False)) as client:
        text = client.get("/metrics", headers={"Authorization": f"Bearer {READER}"}).text
    store.close()
    samples = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text)
               for s in f.samples]
    egress_series = [s for s in samples if s[0] == "leaktap_egress_bytes_total"]
    assert len(egress_series) == 1001  # before: 10,000
    assert sum(v for _, _, v in egress_series) == 100_000
    cgroup_series = {s[1]["cgroup_id"]: s[2] for s in samples
                     if s[0] == "leaktap_cgroup_egress_bytes_total"}
    assert cgroup_series == {"1": 1, "2": 2, "3": 3, OTHER: 4 + 5 + 6 + 7}
    folded = {s[1]["metric"]: s[2] for s in samples
              if s[0] == "leaktap_metric_series_folded_total"}
    assert folded == {"leaktap_egress_bytes": 9000, "leaktap_cgroup_egress_bytes": 4}


def test_live_detection_state_stays_bounded_over_a_day(tmp_path: Path) -> None:
    config = parse_config("""
tenants:
  - name: acme
    match: {sni: "{tenant}.my.salesforce.com"}
    allow: ["salesforce:acme"]
""")
    store = Store(tmp_path / "lt.db")
    paged: list[Any] = []
    detection = LiveDetection(config, store, paged.append)
    for minute in range(24 * 60):  # 10,000 destinations over the day, ~7 a minute
        now = T0 + minute * 60 + 30
        buckets = {
            BucketKey(minute_of(now), "acme", "salesforce", f"x{n}", f"x{n}.my.salesforce.com"):
            Volume(bytes_out=1000, packets_out=2)
            for n in range(minute * 10_000 // 1440, (minute + 1) * 10_000 // 1440)
        }
        detection.add(buckets, now)
    gap = detection.settings.unsanctioned.episode_gap_minutes * 60
    assert len(paged) == 10_000  # each one paged, by name, at the poll
    # before: 10,000 entries each, kept for good
    assert len(detection._immediate) <= 10_000 * (gap + 120) // DAY + 10
    store.close()


def detector_sizes(detector: StreamingDetector) -> dict[str, int]:
    """Entries of every per-series structure of the detector (array: its series axis)."""
    volume, history = detector._volume, detector._history
    sizes = {f"volume.{name}": a.shape[-1] for name, (a, _) in volume._arrays.items()}
    sizes |= {f"fit.{name}": getattr(volume.fit, name).shape[-1] for name in vars(volume.fit)}
    assert volume.bank is not None
    # the window bank keeps two columns per series (its volume and its out/in mix)
    sizes |= {f"bank.{name}": a.shape[-1] // 2 for name, a in vars(volume.bank).items()
              if isinstance(a, np.ndarray) and a.ndim and name.startswith(
                  ("ring", "blocks", "snap", "short_sums", "long_sums", "open_block", "ref",
                   "scale", "learned", "suspect_run"))}
    sizes |= {"history.stats": history.stats.shape[-1],
              "history.minutes_out": history.minutes_out.shape[-1],
              "history.hour_in": len(history.hour_in),
              "history.minutes_seen": len(history.minutes_seen)}
    sizes |= {name: len(getattr(detector, name)) for name in (
        "_keys", "_index", "_last_seen", "_total_of", "_tenant_first", "_unsanctioned",
        "_pending", "_open_dest", "_free")}
    sizes["_tenant_series"] = sum(len(v) for v in detector._tenant_series.values())
    sizes["book"] = len(detector._book.open_incidents())
    return sizes


def test_live_detection_drops_idle_series_and_keeps_a_busy_baseline(tmp_path: Path) -> None:
    """A week of one busy series, then 28 hours: 50,000 short-lived workloads each sending
    to its own destination for 1 to 10 minutes over 12 hours (about 70 new series a
    minute), then quiet. The table stays at the cap while the churn lasts (least recently
    active evicted), empties of it once idle (12 hours here), and the busy series keeps
    its baseline through it and still pages a burst at the end."""
    config = parse_config("""
tenants:
  - name: acme
    match: {sni: "{tenant}.my.salesforce.com"}
detection: {series_idle_days: 0.5}
""")
    store = Store(tmp_path / "lt.db")
    paged: list[Any] = []
    detection = LiveDetection(config, store, paged.append)
    detector = detection.detector
    cap = DETECTOR_SERIES_MAX
    rng = np.random.default_rng(17)
    # the churn starts after a week of the busy series alone
    churn_minutes, quiet_minutes, burst_minutes = 12 * 60, 16 * 60, 10
    end_minute = (7 * DAY) // 60 + churn_minutes + quiet_minutes
    born = 0
    alive: list[tuple[int, str, str]] = []  # (last minute, tenant, instance)
    peak: dict[str, int] = {}

    def score_queued() -> None:  # the worker's loop, run here until the queue is empty
        detection._queue.put(None)
        detection._score_loop()

    for minute in range(end_minute + burst_minutes + 1):
        now = T0 + minute * 60 + 30
        ts = minute_of(now)
        out = int(2e6 * rng.lognormal(0, 0.2))
        if minute >= end_minute:
            out *= 10  # the burst
        buckets = {BucketKey(ts, "acme", "salesforce", "acme", "acme.my.salesforce.com"):
                   Volume(bytes_out=out, packets_out=100, bytes_in=out // 10, packets_in=100)}
        churn = minute - (7 * DAY) // 60
        if 0 <= churn < churn_minutes:
            for _ in range((churn + 1) * 50_000 // churn_minutes - born):
                alive.append((minute + int(rng.integers(1, 11)), f"t{born % 10}", f"w{born}"))
                born += 1
            alive = [a for a in alive if a[0] > minute]
            for _, tenant, instance in alive:
                buckets[BucketKey(ts, tenant, "salesforce", instance, f"{instance}.example")] = \
                    Volume(bytes_out=5000, packets_out=5)
        detection.add(buckets, now)
        if minute % 60 == 0:
            score_queued()
            sizes = detector_sizes(detector)
            peak = {k: max(peak.get(k, 0), v) for k, v in sizes.items()}
    score_queued()
    assert born == 50_000
    # every per-series structure stayed within the cap (before: folded at 2,000 destinations
    # for good, and nothing was ever dropped)
    assert max(peak.values()) <= cap, peak
    assert peak["_index"] == cap  # the churn filled the table
    evicted = dict(detector.evicted)
    assert evicted["capacity"] >= 50_000 - cap
    assert evicted["idle"] >= cap - 10  # what the churn left, once idle 12 hours
    assert detector.rows_refused == 0
    assert set(detector._index) == {("acme", None, None), ("acme", "salesforce", "acme")}
    assert len(detector._remembered) <= 20_000
    # the busy series kept its history (a week and a day of hours) and its seasonal fit
    busy = detector._index[("acme", "salesforce", "acme")]
    hours = ~np.isnan(detector._history.stats[:, 0, busy])
    assert hours.sum() >= 8 * 24 - 2
    assert detector._volume.fit.weeks[:, busy].min() >= 1
    # and pages the burst at its second minute at the latest; nothing of acme before
    burst_ts = minute_of(T0 + end_minute * 60)
    acme = [(i.kind, i.first_ts - burst_ts, i.raised_ts - burst_ts) for i in paged
            if i.tenant == "acme"]
    assert acme and all(kind == "volume_anomaly" and first >= 0 and raised <= 120
                        for kind, first, raised in acme), acme
    assert [i for i in paged if i.tenant != "acme"] == []  # the churn: in warm-up
    # /metrics tells the series kept and the evictions by reason
    agent = SimpleNamespace(
        stats={}, totals={}, cgroup_totals={}, egress_by_destination={}, unattributed_bytes=0,
        table=[], interfaces=[], attached=True, plaintext=None,
        probes=SimpleNamespace(attach_modes={}), alerts=None, outbox=None,
        ready=lambda: (True, "ok"), detection=detection,
    )
    with TestClient(create_app(agent, readers=[READER], admins=[], manage=False)) as client:
        text = client.get("/metrics", headers={"Authorization": f"Bearer {READER}"}).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("leaktap_detector_series", ())] == 2
    assert samples[("leaktap_detector_series_evicted_total", (("reason", "capacity"),))] == \
        evicted["capacity"]
    assert samples[("leaktap_detector_series_evicted_total", (("reason", "idle"),))] == \
        evicted["idle"]
    assert samples[("leaktap_detector_rows_refused_total", ())] == 0
    store.close()


def test_cgroup_ids_are_the_cgroup2_directory_inodes(tmp_path: Path) -> None:
    # the same walk on any directory tree: ids are the directories' inode numbers
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "file").write_text("x")
    expected = {p.stat().st_ino for p in (tmp_path, tmp_path / "a", tmp_path / "a" / "b",
                                          tmp_path / "c")}
    assert cgroup_ids(tmp_path) == expected


def test_prune_keeps_open_alerts_and_deliveries_that_did_not_arrive(tmp_path: Path) -> None:
    store = Store(tmp_path / "lt.db")
    clock = Clock(T0)
    alerts = AlertManager(store.path, [SinkRoute("file")], AlertsSettings(), clock=clock)

    def raise_alert(n: int) -> int:
        change = alerts.record(Finding(kind="bulk_export", tenant=f"t{n}", severity="high",
                                       summary="x", ts=clock.t))
        assert change is not None
        return change.alert_id

    done, failed, still_open = raise_alert(1), raise_alert(2), raise_alert(3)
    alerts.resolve(done, "api:alice")
    alerts.resolve(failed, "api:alice")
    with sqlite3.connect(store.path) as c:
        c.execute("UPDATE outbox SET state = 'delivered' WHERE alert_id != ?", (failed,))
        c.execute("UPDATE outbox SET state = 'failed' WHERE alert_id = ?", (failed,))
    clock.t += DAY
    deleted = alerts.prune(clock.t - 1)
    assert deleted == {"alerts": 1, "alert_changes": 2, "alert_keys": 1, "outbox": 2}
    assert alerts.get(done) is None
    assert alerts.get(failed) is not None and alerts.get(still_open) is not None
    assert alerts.prune(clock.t - 1)["alerts"] == 0
    alerts.close()
    store.close()
