"""Detection quality on the synthetic scenario, fixed seeds (the full run is perf/)."""

from __future__ import annotations

import statistics

from leaktap.analytics.incidents import Incident
from tests.analytics import scenario


def test_every_injected_event_is_caught(
    evaluated: list[tuple[scenario.Scenario, list[Incident]]],
) -> None:
    for scen, incidents in evaluated:
        result = scenario.evaluate(scen, incidents)
        assert result.missed == [], f"seed {scen.seed}"
        assert all(result.injected[kind] >= 3 for kind in scenario.KINDS)
        assert result.recall == dict.fromkeys(scenario.KINDS, 1.0)


def test_false_incidents_per_tenant_week(
    evaluated: list[tuple[scenario.Scenario, list[Incident]]],
) -> None:
    false = sum(len(scenario.evaluate(s, i).false_incidents) for s, i in evaluated)
    tenant_weeks = sum(scenario.evaluate(s, i).tenant_weeks for s, i in evaluated)
    assert tenant_weeks == 2 * 10 * 3
    assert false / tenant_weeks <= 0.1


def test_bursts_page_within_three_minutes_median(
    evaluated: list[tuple[scenario.Scenario, list[Incident]]],
) -> None:
    minutes = [m for s, i in evaluated for m in scenario.evaluate(s, i).burst_minutes_to_alert]
    assert len(minutes) == 6
    assert statistics.median(minutes) <= 3
    assert max(minutes) <= 10


def test_unsanctioned_destinations_page_for_tenants_with_an_allow_list(
    evaluated: list[tuple[scenario.Scenario, list[Incident]]],
) -> None:
    checked = 0
    for scen, incidents in evaluated:
        for event in scen.events:
            if event.kind == "new_destination" and event.tenant in scen.allow:
                checked += 1
                assert any(
                    i.kind == "unsanctioned_destination" and i.crm_instance == event.instance
                    and i.raised_ts == event.start_ts
                    for i in incidents
                )
        assert not any(
            i.kind == "unsanctioned_destination" and i.tenant not in scen.allow for i in incidents
        )
    assert checked >= 1


def test_incidents_are_one_per_episode(
    evaluated: list[tuple[scenario.Scenario, list[Incident]]],
) -> None:
    for _, incidents in evaluated:
        keys = [i.dedup_key for i in incidents]
        assert len(keys) == len(set(keys))
        for incident in incidents:
            assert incident.first_ts <= incident.raised_ts <= incident.last_ts
