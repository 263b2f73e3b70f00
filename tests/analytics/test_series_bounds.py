"""Bounded series state of the streaming detector (issue 17.5): idle series dropped,
the least recently active evicted at the cap, a reused slot clean in every structure."""

from __future__ import annotations

import numpy as np

from leaktap.analytics.buckets import Bucket
from leaktap.analytics.incidents import Incident
from leaktap.analytics.settings import DetectionSettings
from leaktap.analytics.stream import StreamingDetector

MONDAY = 1_704_067_200
DAY = 1440  # minutes


def _feed(detector: StreamingDetector, rows: list[Bucket]) -> list[Incident]:
    raised: list[Incident] = []
    for bucket in rows:
        raised += detector.observe(bucket)
    return raised


def test_a_reused_slot_starts_clean_and_inherits_no_incident() -> None:
    # two slots only: the tenant's total and one destination
    detector = StreamingDetector(
        DetectionSettings(warmup_days=0.5), allow={"acme": ["salesforce:allowed"]},
        max_series=2)
    rng = np.random.default_rng(3)
    old_end = 9 * DAY  # "old" sends a quiet 10 kB a minute for 9 days (a seasonal fit)
    old = [Bucket(MONDAY + 60 * m, "acme", "salesforce", "old", int(1e4 * v), 100)
           for m, v in enumerate(rng.lognormal(0, 0.2, old_end))]
    raised = _feed(detector, old)
    assert [i.kind for i in raised] == ["unsanctioned_destination"]  # old is not allowed
    assert [i.crm_instance for i in detector.open_incidents()] == ["old"]
    slot_old = detector._index[("acme", "salesforce", "old")]  # noqa: SLF001
    slot_total = detector._index[("acme", None, None)]  # noqa: SLF001
    assert detector._volume.fit.weeks[:, slot_old].max() >= 1  # noqa: SLF001
    assert not np.isnan(detector._history.stats[:, :, slot_old]).all()  # noqa: SLF001
    # 30 minutes later "new", also not allowed, sends its normal 50 MB a minute: 5000x what
    # "old" learned, a page at once if it read old's baseline or episode in that slot
    start = old_end + 30
    new = [Bucket(MONDAY + 60 * m, "acme", "salesforce", "new", 50_000_000, 1_000_000)
           for m in range(start, start + 60)]
    raised = _feed(detector, new)
    assert detector._index[("acme", "salesforce", "new")] == slot_old  # noqa: SLF001
    assert detector._index[("acme", None, None)] == slot_total  # noqa: SLF001
    # old's episode ended when it was dropped; new pages its own, and nothing else
    closed = detector.pop_closed()
    assert [(i.kind, i.crm_instance) for i in closed] == [("unsanctioned_destination", "old")]
    assert closed[0].last_ts < MONDAY + 60 * old_end
    assert [(i.kind, i.crm_instance, i.first_ts) for i in raised] == [
        ("unsanctioned_destination", "new", MONDAY + 60 * start)]
    assert detector.evicted == {"idle": 0, "capacity": 2}  # the destination and its total
    assert detector.series_count == 2 and detector.slots == 2
    # every per-series structure of the slot is a new series' one
    history = detector._history.stats[:, :, slot_old]  # noqa: SLF001
    stored = detector._history.hour_ids >= MONDAY // 3600 + start // 60  # noqa: SLF001
    assert np.isnan(history[~stored]).all()  # none of old's hours
    assert detector._volume.fit.weeks[:, slot_old].max() == 0  # noqa: SLF001
    assert detector._volume.level[slot_old] == 0.0  # noqa: SLF001
    bank = detector._volume.bank  # noqa: SLF001
    assert bank is not None  # two columns per series: the volume's and the out/in mix's
    assert bank.learned[:, [2 * slot_old, 2 * slot_old + 1]].max() <= 60
    assert detector._volume.first_minute[slot_old] == start  # noqa: SLF001


def test_a_new_series_in_a_reused_slot_does_not_page_its_first_normal_volume() -> None:
    detector = StreamingDetector(DetectionSettings(warmup_days=0.5), max_series=3)
    rng = np.random.default_rng(5)
    # the tenant's busy series keeps its slot and its total (1 GB a minute: a new series'
    # 30 MB does not move it); "old" idles at 10 kB a minute
    rows = []
    for m, (a, b) in enumerate(rng.lognormal(0, 0.2, (9 * DAY, 2)).tolist()):
        rows += [Bucket(MONDAY + 60 * m, "acme", "salesforce", "busy", int(1e9 * a), 10**7),
                 Bucket(MONDAY + 60 * m, "acme", "salesforce", "old", int(1e4 * b), 100)]
    assert _feed(detector, rows) == []
    slot_old = detector._index[("acme", "salesforce", "old")]  # noqa: SLF001
    start = 9 * DAY + 30
    new = []
    for m in range(start, start + 180):
        new += [Bucket(MONDAY + 60 * m, "acme", "salesforce", "busy", 10**9, 10**7),
                Bucket(MONDAY + 60 * m, "acme", "salesforce", "new", 30_000_000, 600_000)]
    raised = _feed(detector, new)
    detector.flush()
    assert detector._index[("acme", "salesforce", "new")] == slot_old  # noqa: SLF001
    # a new destination of a known tenant, nothing about its volume (it has no baseline)
    assert [(i.kind, i.crm_instance) for i in raised] == [("new_destination", "new")]
    assert detector.evicted == {"idle": 0, "capacity": 1}


def test_idle_series_are_dropped_and_a_returning_one_is_not_new() -> None:
    settings = DetectionSettings(warmup_days=0.01, series_idle_days=0.5)  # 12 hours
    detector = StreamingDetector(settings)
    rows = []
    for m in range(2 * DAY):
        rows.append(Bucket(MONDAY + 60 * m, "acme", "salesforce", "busy", 100_000, 1000))
        if m < 60 or 11 * 60 <= m < 11 * 60 + 5:  # pauses 10 hours: kept
            rows.append(Bucket(MONDAY + 60 * m, "acme", "salesforce", "pauser", 100_000, 1000))
        if m < 60:  # then silent: dropped at the first hour close past 12 hours idle
            rows.append(Bucket(MONDAY + 60 * m, "acme", "salesforce", "gone", 100_000, 1000))
            rows.append(Bucket(MONDAY + 60 * m, "beta", "salesforce", "beta", 100_000, 1000))
    split = MONDAY + 60 * 900  # 15:00
    raised = _feed(detector, [b for b in rows if b.ts < split])
    keys = set(detector._index)  # noqa: SLF001
    assert ("acme", "salesforce", "gone") not in keys  # idle from 01:00
    assert ("acme", "salesforce", "pauser") in keys  # back at 11:00
    raised += _feed(detector, [b for b in rows if b.ts >= split])
    keys = set(detector._index)  # noqa: SLF001
    assert ("acme", "salesforce", "pauser") not in keys  # idle from 11:05 on day 1
    # beta's only destination went, and its total with it
    assert ("beta", None, None) not in keys and "beta" not in detector._tenant_series  # noqa: SLF001
    assert keys == {("acme", "salesforce", "busy"), ("acme", None, None)}
    assert detector.evicted == {"idle": 4, "capacity": 0}
    assert detector.series_count == 2 and detector.slots == 6
    # (the pauser's return after 10 idle hours may page its volume: cold start)
    assert [i for i in raised if i.kind == "new_destination"] == []
    # the one that comes back after 12 hours is no new destination, a new one is
    back = [Bucket(MONDAY + 60 * (2 * DAY + m), "acme", "salesforce", i, 200_000, 1000)
            for m in range(3) for i in ("gone", "fresh")]
    raised = _feed(detector, back)
    detector.flush()
    assert [(i.kind, i.crm_instance) for i in raised] == [("new_destination", "fresh")]
    assert "salesforce:gone" in raised[0].evidence["known_destinations"]
    assert detector.slots == 6  # the freed slots were reused


def test_a_series_pausing_less_than_the_idle_time_is_kept() -> None:
    detector = StreamingDetector(DetectionSettings(warmup_days=0, series_idle_days=0.5))
    rows = [Bucket(MONDAY + 60 * m, "acme", "salesforce", "x", 100_000, 1000)
            for m in range(0, 24 * 60, 11 * 60)]  # one minute every 11 hours
    _feed(detector, rows)
    detector.advance(MONDAY + 60 * 24 * 60)
    assert detector.evicted == {"idle": 0, "capacity": 0}
    assert detector.series_count == 2


def test_a_flood_beyond_the_cap_in_one_minute_is_refused_and_counted() -> None:
    detector = StreamingDetector(DetectionSettings(warmup_days=0), max_series=5)
    rows = [Bucket(MONDAY, "acme", "salesforce", f"x{n}", 1000, 10) for n in range(10)]
    _feed(detector, rows)
    detector.advance(MONDAY + 60)
    # the total and four destinations; six rows found every slot busy in that minute
    assert detector.series_count == 5 and detector.rows_refused == 6
    assert detector.evicted == {"idle": 0, "capacity": 0}
    total = detector._index[("acme", None, None)]  # noqa: SLF001
    minute = (MONDAY // 60) % 60
    # the refused rows still count in the tenant's total
    assert detector._history.minutes_out[minute, total] == 10 * 1000  # noqa: SLF001
    # a minute later the four least recently active make room for new ones
    rows = [Bucket(MONDAY + 60, "acme", "salesforce", f"y{n}", 1000, 10) for n in range(2)]
    _feed(detector, rows)
    detector.advance(MONDAY + 120)
    assert detector.evicted == {"idle": 0, "capacity": 2}
    assert {k[2] for k in detector._index if k[2]} == {"x2", "x3", "y0", "y1"}  # noqa: SLF001


def test_a_series_with_traffic_in_the_minute_is_not_evicted_whatever_the_row_order() -> None:
    detector = StreamingDetector(DetectionSettings(warmup_days=0), max_series=3)
    for instance in ("a", "b"):
        detector.observe(Bucket(MONDAY, "acme", "salesforce", instance, 1000, 10))
    # the next minute's new series comes before a's row (the agent feeds rows sorted by
    # name): a and b were both last active a minute ago, but a is active in this one
    detector.observe(Bucket(MONDAY + 60, "acme", "salesforce", "0-new", 1000, 10))
    detector.observe(Bucket(MONDAY + 60, "acme", "salesforce", "a", 1000, 10))
    detector.advance(MONDAY + 120)
    assert {k[2] for k in detector._index if k[2]} == {"0-new", "a"}  # noqa: SLF001
    assert detector.evicted == {"idle": 0, "capacity": 1}
