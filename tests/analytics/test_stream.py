"""The streaming detector on hand-built series: each detector, episodes, causality."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from leaktap.analytics.buckets import Bucket
from leaktap.analytics.incidents import Incident, dedup_key
from leaktap.analytics.settings import DetectionSettings
from leaktap.analytics.stream import StreamingDetector

MONDAY = 1_704_067_200
WEEK = 10080
NOON = 12 * 60


def weekly_rates(minutes: int, rng: np.random.Generator, sigma: float = 0.2) -> np.ndarray:
    """Business-hours bytes/minute with weekends, night idling and log-normal noise."""
    minute = np.arange(minutes)
    hour = (minute % 1440) / 60
    day = (minute // 1440) % 7
    level = 0.06 + 0.94 * np.clip(np.minimum((hour - 7) / 3, (19 - hour) / 3), 0, 1)
    level = level * np.where(day >= 5, 0.3, 1.0)
    rates = 4e6 * level * np.exp(rng.normal(0, sigma, minutes))
    return rates * (rng.random(minutes) > np.where(level < 0.1, 0.1, 0.0))


def rows(
    rates: np.ndarray, tenant: str = "acme", instance: str = "acme-prod",
    inbound: np.ndarray | None = None, start: int = 0,
) -> Iterator[Bucket]:
    inbound = rates * 2 if inbound is None else inbound
    for m in np.flatnonzero(rates[start:] + inbound[start:] > 0) + start:
        yield Bucket(MONDAY + 60 * int(m), tenant, "salesforce", instance,
                     int(rates[m]), int(inbound[m]))


def run(
    buckets: Iterator[Bucket], settings: DetectionSettings | None = None,
    allow: dict[str, list[str]] | None = None,
    on_minute: Callable[[StreamingDetector, int], None] | None = None,
) -> list[Incident]:
    detector = StreamingDetector(settings, allow)
    for bucket in buckets:
        detector.observe(bucket)
    detector.flush()
    return detector.close_all()


def merged(*streams: Iterator[Bucket]) -> list[Bucket]:
    return sorted((b for s in streams for b in s), key=lambda b: b.ts)


@pytest.fixture(scope="module")
def three_weeks() -> np.ndarray:
    return weekly_rates(3 * WEEK, np.random.default_rng(3))


def test_quiet_weeks_raise_nothing(three_weeks: np.ndarray) -> None:
    assert run(rows(three_weeks)) == []


def test_burst_pages_within_minutes_once(three_weeks: np.ndarray) -> None:
    rates = three_weeks.copy()
    start = 2 * WEEK + 1440 + NOON  # week 3, Tuesday noon
    rates[start:start + 10] *= 8
    incidents = run(rows(rates))
    assert len(incidents) == 1
    burst = incidents[0]
    assert burst.kind == "volume_anomaly"
    assert (burst.tenant, burst.crm_vendor, burst.crm_instance) == ("acme", "salesforce", "acme-prod")
    assert 0 <= burst.raised_ts - (MONDAY + 60 * start) <= 3 * 60
    assert burst.first_ts == MONDAY + 60 * start
    assert burst.last_ts >= MONDAY + 60 * (start + 9)
    assert burst.evidence["baseline"] == "seasonal"
    assert burst.evidence["weeks_of_history"] == 2
    assert burst.severity in {"medium", "high"}
    assert burst.dedup_key == hashlib.sha256(
        f"volume_anomaly|acme|salesforce|acme-prod|{burst.first_ts}".encode()).hexdigest()


def test_slow_drip_pages_once(three_weeks: np.ndarray) -> None:
    rates = three_weeks.copy()
    start = 2 * WEEK + 2 * 1440 + 9 * 60  # week 3, Wednesday 09:00
    rates[start:start + 6 * 60] *= 2.2
    incidents = run(rows(rates))
    assert [i.kind for i in incidents] == ["volume_anomaly"]
    assert MONDAY + 60 * start <= incidents[0].raised_ts <= MONDAY + 60 * (start + 180)
    assert incidents[0].last_ts >= MONDAY + 60 * (start + 300)


def test_weekend_night_transfer_pages(three_weeks: np.ndarray) -> None:
    rates = three_weeks.copy()
    start = 2 * WEEK + 5 * 1440 + 2 * 60  # week 3, Saturday 02:00
    rates[start:start + 45] += 4e6  # weekday-noon level
    incidents = run(rows(rates))
    assert len(incidents) == 1
    assert incidents[0].raised_ts - (MONDAY + 60 * start) <= 120


def test_weekly_batch_and_growth_do_not_page() -> None:
    rng = np.random.default_rng(8)
    minutes = 4 * WEEK
    rates = weekly_rates(minutes, rng) * np.exp(0.03 * np.arange(minutes) / 1440)
    for week in range(4):  # Sunday 02:10 every week, 25 minutes at 10x weekday noon
        start = week * WEEK + 6 * 1440 + 2 * 60 + 10 + int(rng.integers(-4, 5))
        rates[start:start + 25] += 4e7
    assert run(rows(rates)) == []


def test_egress_ratio_pages_when_a_flow_stops_pulling(three_weeks: np.ndarray) -> None:
    inbound = three_weeks * 2
    start = 2 * WEEK + 3 * 1440 + 11 * 60  # week 3, Thursday 11:00
    inbound[start:start + 30] /= 40
    incidents = run(rows(three_weeks, inbound=inbound))
    assert [i.kind for i in incidents] == ["egress_ratio"]
    assert incidents[0].raised_ts - (MONDAY + 60 * start) <= 15 * 60
    assert incidents[0].evidence["detector"] == "ratio"


def test_new_destination_after_warmup_only(three_weeks: np.ndarray) -> None:
    early = [Bucket(MONDAY + 60 * (2 * 1440 + m), "acme", "hubspot", "side", 500_000, 0)
             for m in range(3)]
    late_start = 2 * WEEK + 600
    late = [Bucket(MONDAY + 60 * (late_start + m), "acme", "zoho", "leak", 40_000, 100)
            for m in range(5)]
    tiny = [Bucket(MONDAY + 60 * (late_start + 2000), "acme", "zoho", "ping", 100, 100)]
    incidents = run(iter(merged(rows(three_weeks), iter(early), iter(late), iter(tiny))))
    assert [(i.kind, i.crm_instance) for i in incidents] == [("new_destination", "leak")]
    new = incidents[0]
    assert new.first_ts == MONDAY + 60 * late_start
    # 40 kB a minute reaches the 64 KiB floor in the second minute
    assert new.raised_ts == MONDAY + 60 * (late_start + 1)
    assert new.last_ts == MONDAY + 60 * (late_start + 4)
    assert new.evidence["known_destinations"] == ["hubspot:side", "salesforce:acme-prod"]


def test_unsanctioned_is_immediate_and_once_per_episode() -> None:
    allow = {"acme": ["salesforce:acme-prod"]}
    start = 30  # during warm-up: policy needs no learning
    sessions = [range(start, start + 20), range(start + 100, start + 110),  # gap 80 min: same
                range(start + 600, start + 605)]  # gap > 240 min: a new episode
    rogue = [Bucket(MONDAY + 60 * m, "acme", "hubspot", "other", 9000, 10)
             for s in sessions for m in s]
    normal = [Bucket(MONDAY + 60 * m, "acme", "salesforce", "acme-prod", 9000, 10)
              for m in range(800)]
    incidents = run(iter(merged(iter(rogue), iter(normal))), allow=allow)
    assert [i.kind for i in incidents] == ["unsanctioned_destination"] * 2
    first, second = incidents
    assert first.raised_ts == first.first_ts == MONDAY + 60 * start
    assert first.last_ts == MONDAY + 60 * (start + 109)
    assert second.first_ts == MONDAY + 60 * (start + 600)
    assert first.dedup_key != second.dedup_key
    assert first.severity == "high"
    assert first.evidence["bytes_out"] == 30 * 9000


def test_no_allow_list_means_no_policy() -> None:
    rogue = [Bucket(MONDAY + 60 * m, "acme", "hubspot", "other", 9000, 10) for m in range(10)]
    assert run(iter(rogue), allow={"acme": []}) == []
    assert run(iter(rogue), allow={"other-tenant": ["salesforce:x"]}) == []


def test_live_usage_pages_at_the_minute_it_closes(three_weeks: np.ndarray) -> None:
    """The agent's way: a minute's rows, then advance(); raised_ts is that minute."""
    rates = three_weeks.copy()
    start = 2 * WEEK + 1440 + NOON
    rates[start:start + 10] *= 12
    detector = StreamingDetector()
    raised: list[Incident] = []
    by_minute: dict[int, list[Bucket]] = {}
    for bucket in rows(rates):
        by_minute.setdefault(bucket.ts, []).append(bucket)
    for ts in range(MONDAY, MONDAY + 60 * (start + 10), 60):
        for bucket in by_minute.get(ts, []):
            raised += detector.observe(bucket)
        page = detector.advance(ts + 60)
        assert all(i.raised_ts == ts for i in page)
        raised += page
    assert len(raised) == 1
    assert raised[0] in detector.open_incidents()
    assert raised[0].raised_ts <= MONDAY + 60 * (start + 2)


def test_idle_gap_is_counted_as_zero_minutes() -> None:
    detector = StreamingDetector()
    detector.observe(Bucket(MONDAY, "acme", "salesforce", "x", 1, 1))
    detector.observe(Bucket(MONDAY + 3 * 3600, "acme", "salesforce", "x", 1, 1))
    assert detector._volume.minute_index == 180  # noqa: SLF001 - every idle minute closed
    with pytest.raises(ValueError, match="older"):
        detector.observe(Bucket(MONDAY, "acme", "salesforce", "x", 1, 1))


def test_dedup_key_is_the_hash_of_the_episode_identity() -> None:
    assert dedup_key("new_destination", "acme", "zoho", "leak", 60) == hashlib.sha256(
        b"new_destination|acme|zoho|leak|60").hexdigest()
    assert dedup_key("volume_anomaly", "acme", None, None, 60) == hashlib.sha256(
        b"volume_anomaly|acme|||60").hexdigest()
