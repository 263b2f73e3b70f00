"""The data-flow map (issue 14.3-14.5) fed paired exchanges directly: totals per
flow, batched writes, the crm_admin_action, new_data_flow and crm_access_refused
findings, and the attempted transfers handed to the audit."""

from __future__ import annotations

import dataclasses
from typing import Any

from leaktap.analytics.alerts import Finding
from leaktap.analytics.plaintext.dataflows import (
    DataFlowMap,
    DataFlowSettings,
    ExchangeAudit,
    outcome_of,
    status_class,
)
from tests.analytics.crm_fixtures import ALL_CALLS, EXE, FIXTURES, T0, Call, exchange

HOUR = 3600.0


def by_name(calls: list[Call], target_part: str) -> Call:
    return next(c for c in calls if target_part in c.target)


class Recorder:
    def __init__(self, settings: DataFlowSettings | None = None) -> None:
        self.findings: list[Finding] = []
        self.audits: list[ExchangeAudit] = []
        self.writes: list[list[dict[str, Any]]] = []
        self.map = DataFlowMap(settings or DataFlowSettings(warmup_s=HOUR),
                               on_finding=self.findings.append, on_audits=self.audits.extend,
                               write=self.writes.append, clock=lambda: T0)

    def kinds(self) -> list[str]:
        return [f.kind for f in self.findings]


def test_totals_per_flow_are_exact_and_written_in_batches() -> None:
    r = Recorder()
    query = by_name(FIXTURES["salesforce"], "query?q=SELECT")
    for i in range(5):
        r.map.on_exchange(exchange(query, ts=T0 + i))
    r.map.on_exchange(exchange(query, ts=T0 + 9, status=500))
    r.map.on_exchange(exchange(query, ts=T0 + 10, status=None))
    assert r.writes == []  # nothing written per call
    assert r.map.flush() == 1
    [row] = r.writes[0]
    assert (row["object"], row["operation"], row["direction"]) == ("Contact", "query",
                                                                   "from_crm")
    assert (row["requests"], row["records"], row["records_unknown"]) == (7, 15, 0)
    assert (row["status_2xx"], row["status_5xx"], row["status_none"]) == (5, 1, 1)
    assert row["response_bytes"] == 7 * len(query.response)
    assert (row["first_seen"], row["last_seen"]) == (T0, T0 + 10)
    assert row["data_classes"] == ["email", "free_text", "national_id", "phone"]
    assert row["templates"] == ["/services/data/v59.0/query?q"]
    assert r.map.flush() == 0  # nothing changed since


def test_every_fixture_gives_its_object_operation_and_records() -> None:
    r = Recorder()
    for call in ALL_CALLS:
        r.map.on_exchange(exchange(call))
    r.map.flush()
    got: dict[tuple[str, str, str, str], tuple[int, int]] = {}
    for row in r.writes[0]:
        got[(row["crm_vendor"], row["object"], row["operation"], row["direction"])] = (
            row["requests"], row["records"])
    expected: dict[tuple[str, str, str, str], tuple[int, int]] = {}
    for c in ALL_CALLS:
        key = (c.vendor, c.object, c.operation, c.direction)
        n, records = expected.get(key, (0, 0))
        expected[key] = (n + 1, records + c.records)
    assert got == expected


def test_admin_calls_alert_high_for_writes_and_low_for_reads() -> None:
    r = Recorder()
    psa = by_name(FIXTURES["salesforce"], "PermissionSetAssignment")
    r.map.on_exchange(exchange(psa))
    r.map.on_exchange(exchange(psa, ts=T0 + 5))  # same key: the lifecycle counts it
    r.map.on_exchange(exchange(by_name(FIXTURES["zoho"], "settings/profiles")))
    admin = [f for f in r.findings if f.kind == "crm_admin_action"]
    assert [(f.severity, f.evidence["object"], f.evidence["access"]) for f in admin] == [
        ("high", "PermissionSetAssignment", "write"), ("high", "PermissionSetAssignment",
                                                       "write"), ("low", "profiles", "read")]
    assert admin[0].dedup_key == admin[1].dedup_key != admin[2].dedup_key
    assert admin[0].evidence["path"] == "/services/data/v59.0/sobjects/PermissionSetAssignment"
    assert (admin[0].tenant, admin[0].crm_vendor, admin[0].crm_instance) == (
        "acme", "salesforce", "acme")


def test_new_data_flow_only_after_the_warm_up_and_once_per_flow() -> None:
    r = Recorder()
    cases = by_name(FIXTURES["salesforce"], "queryAll")
    contacts = by_name(FIXTURES["salesforce"], "query?q=SELECT")
    r.map.on_exchange(exchange(cases, ts=T0))
    r.map.on_exchange(exchange(cases, ts=T0 + HOUR / 2))
    assert r.findings == []
    r.map.on_exchange(exchange(contacts, ts=T0 + HOUR + 1))  # an assistant that read Cases
    r.map.on_exchange(exchange(contacts, ts=T0 + HOUR + 2))
    r.map.on_exchange(exchange(cases, ts=T0 + HOUR + 3))
    assert r.kinds() == ["new_data_flow"]
    f = r.findings[0]
    assert (f.severity, f.evidence["object"], f.evidence["operation"],
            f.evidence["direction"]) == ("medium", "Contact", "query", "from_crm")
    # another executable of the tenant is in its own warm-up
    r.map.on_exchange(exchange(contacts, ts=T0 + HOUR + 4, exe="/usr/bin/other"))
    assert r.kinds() == ["new_data_flow"]


def test_a_restart_keeps_what_was_learned() -> None:
    first = Recorder()
    cases = by_name(FIXTURES["salesforce"], "queryAll")
    first.map.on_exchange(exchange(cases, ts=T0))
    first.map.flush()
    second = Recorder()
    assert second.map.load(first.writes[0]) == 1
    second.map.on_exchange(exchange(cases, ts=T0 + 2 * HOUR))
    assert second.findings == []  # known before the restart: not new
    second.map.on_exchange(exchange(by_name(FIXTURES["salesforce"], "sobjects/Case"),
                                    ts=T0 + 2 * HOUR))
    assert second.kinds() == ["new_data_flow"]  # the warm-up counted from the stored start
    second.map.flush()
    row = next(w for w in second.writes[0] if w["operation"] == "query")
    assert (row["requests"], row["records"]) == (2, 4)


def test_refused_storm_of_one_process_is_a_finding() -> None:
    r = Recorder(DataFlowSettings(warmup_s=HOUR, refused_storm_count=5,
                                  refused_storm_window_s=60))
    lead = by_name(FIXTURES["salesforce"], "FROM+Lead")  # answered 403
    for i in range(4):
        r.map.on_exchange(exchange(lead, ts=T0 + i))
    r.map.on_exchange(exchange(lead, ts=T0 + 4, pid=7))  # another process: its own count
    assert "crm_access_refused" not in r.kinds()
    r.map.on_exchange(exchange(lead, ts=T0 + 5))
    storms = [f for f in r.findings if f.kind == "crm_access_refused"]
    assert len(storms) == 1 and storms[0].severity == "high"
    assert (storms[0].evidence["refused"], storms[0].evidence["last_status"]) == (5, 403)
    # slow refusals (outside the window) are no storm
    slow = Recorder(DataFlowSettings(warmup_s=HOUR, refused_storm_count=3,
                                     refused_storm_window_s=10))
    for i in range(6):
        slow.map.on_exchange(exchange(lead, ts=T0 + 20 * i))
    assert "crm_access_refused" not in slow.kinds()


def test_attempted_transfers_reach_the_audit_with_their_outcome() -> None:
    r = Recorder()
    contacts = by_name(FIXTURES["salesforce"], "query?q=SELECT")
    r.map.on_exchange(exchange(contacts))  # 200: a transfer, not an attempt
    for status in (401, 403, 404, 503, None):
        r.map.on_exchange(exchange(contacts, status=status))
    assert r.audits == []  # handed over in one batch at the flush
    r.map.flush()
    assert [(a.status, a.outcome) for a in r.audits] == [
        (401, "refused"), (403, "refused"), (404, "failed"), (503, "failed"),
        (None, "unanswered")]
    a = r.audits[0]
    assert (a.operation, a.path, a.method, a.comm, a.allowed) == (
        "salesforce:query.Contact", "/services/data/v59.0/query?q", "GET", "crm-sync", False)
    assert set(a.as_dict()) >= {"status", "outcome", "tenant", "path", "request_bytes"}


def test_bound_on_flows_counts_what_it_drops() -> None:
    r = Recorder(DataFlowSettings(warmup_s=HOUR, keys_max=2))
    for call in FIXTURES["hubspot"]:
        r.map.on_exchange(exchange(call))
    assert len(r.map.flows) == 2
    # five calls, four flows (list and search are both contacts/query): two kept, two dropped
    assert r.map.stats["dropped_keys_over_bound"] == 2
    assert r.map.flows[next(iter(r.map.flows))].requests == 2


def test_status_classes_and_outcomes() -> None:
    assert [status_class(s) for s in (200, 204, 302, 401, 404, 500, None)] == [
        "2xx", "2xx", "3xx", "4xx", "4xx", "5xx", "none"]
    assert [outcome_of(s) for s in (200, 302, 401, 403, 429, 500, None)] == [
        None, None, "refused", "refused", "failed", "failed", "unanswered"]


def test_cut_responses_count_complete_records() -> None:
    r = Recorder()
    deals = by_name(FIXTURES["pipedrive"], "/v1/deals?start")
    r.map.on_exchange(exchange(deals, response_cut=len(deals.response) // 2))
    r.map.on_exchange(dataclasses.replace(exchange(deals), exe=EXE))
    r.map.flush()
    [row] = r.writes[0]
    assert row["requests"] == 2
    half = deals.response[: len(deals.response) // 2]
    assert row["records"] == 3 + half.count(b'}]}}, ')  # complete deals of the cut body
    assert r.map.stats["records_partial"] == 1


def test_bulk_jobs_and_query_pages_take_the_object_of_the_call_that_started_them() -> None:
    from tests.analytics.crm_fixtures import body, sf_record

    r = Recorder()
    v = "/services/data/v59.0"
    job = "7505f00000ABCDEAAA"
    calls = [
        ("POST", f"{v}/jobs/ingest", body({"object": "Contact", "operation": "insert"}), 200,
         body({"id": job, "object": "Contact", "operation": "insert", "state": "Open"})),
        ("PUT", f"{v}/jobs/ingest/{job}/batches",
         b"LastName,Email\nDoe,jane.secret@example.org\nRoe,r@example.org\nPoe,p@x.org\n",
         201, b""),
        ("PATCH", f"{v}/jobs/ingest/{job}", body({"state": "UploadComplete"}), 200,
         body({"id": job, "object": "Contact", "state": "UploadComplete"})),
        ("POST", f"{v}/jobs/query", body({"operation": "query",
                                         "query": "SELECT Id, Email FROM Lead"}), 200,
         body({"id": "750QX0000001AAAAAA", "object": "Lead", "state": "UploadComplete"})),
        ("GET", f"{v}/jobs/query/750QX0000001AAAAAA/results", b"", 200,
         b'"Id","Email"\n"00QX1","a@example.org"\n"00QX2","b@example.org"\n'),
        ("GET", f"{v}/query?q=SELECT+Id+FROM+Case", b"", 200,
         body({"totalSize": 5, "done": False, "nextRecordsUrl": f"{v}/query/01gXX00001AB-2",
               "records": [sf_record("Case", i) for i in range(2)]})),
        ("GET", f"{v}/query/01gXX00001AB-2", b"", 200,
         body({"totalSize": 5, "done": True, "records": [sf_record("Case", i)
                                                           for i in range(3)]})),
        ("GET", f"{v}/jobs/query/750QX0000009ZZZZZZ/results", b"", 200, b"Id,Name\n1,a\n"),
    ]
    for i, (method, target, request, status, response) in enumerate(calls):
        from leaktap.analytics.plaintext.crm_calls import CrmExchange

        r.map.on_exchange(CrmExchange(
            ts=T0 + i, tenant="acme", pid=1, exe=EXE, vendor="salesforce", instance="acme",
            host="acme.my.salesforce.com", method=method, target=target,
            request_body=request, request_bytes=len(request), status=status,
            response_body=response, response_bytes=len(response), response_truncated=False))
    r.map.flush()
    got = {(w["object"], w["operation"], w["direction"]): (w["requests"], w["records"])
           for w in r.writes[0]}
    assert got == {
        ("Contact", "bulk", "to_crm"): (3, 3),  # create and state move none, the upload 3
        ("Lead", "bulk", "from_crm"): (2, 2),
        ("Case", "query", "from_crm"): (2, 5),
        ("other", "bulk", "from_crm"): (1, 1),  # a job this map never saw started
    }
    contact = next(w for w in r.writes[0] if w["object"] == "Contact")
    assert contact["data_classes"] == ["email"]  # from the CSV upload
    assert r.map.stats["refs_unknown"] == 1


def test_a_storm_of_attempts_is_bounded_between_flushes() -> None:
    from leaktap.analytics.plaintext import dataflows

    r = Recorder()
    lead = by_name(FIXTURES["salesforce"], "FROM+Lead")
    for i in range(dataflows.ATTEMPTS_MAX + 25):
        r.map.on_exchange(exchange(lead, ts=T0 + i / 1000))
    r.map.flush()
    assert len(r.audits) == dataflows.ATTEMPTS_MAX
    assert r.map.stats["attempts_dropped_over_bound"] == 25
    r.map.on_exchange(exchange(lead, ts=T0 + 100))
    r.map.flush()
    assert len(r.audits) == dataflows.ATTEMPTS_MAX + 1


def test_attempts_go_one_by_one_to_on_audit_without_a_batch_callback() -> None:
    audits: list[ExchangeAudit] = []
    fmap = DataFlowMap(on_audit=audits.append)
    lead = by_name(FIXTURES["salesforce"], "FROM+Lead")
    fmap.on_exchange(exchange(lead))
    assert [(a.status, a.outcome) for a in audits] == [(403, "refused")]


def test_pruned_flows_are_forgotten_with_what_was_learned_from_them() -> None:
    r = Recorder()
    cases = by_name(FIXTURES["salesforce"], "queryAll")
    contacts = by_name(FIXTURES["salesforce"], "query?q=SELECT")
    r.map.on_exchange(exchange(cases, ts=T0))
    r.map.on_exchange(exchange(contacts, ts=T0 + 10 * HOUR))
    assert r.kinds() == ["new_data_flow"]
    assert r.map.prune(T0 + 5 * HOUR) == 1  # the Case flow is past the retention
    assert [k[4] for k in r.map.flows] == ["Contact"]
    r.map.on_exchange(exchange(cases, ts=T0 + 20 * HOUR))  # reading Cases again is new
    assert r.kinds() == ["new_data_flow", "new_data_flow"]
