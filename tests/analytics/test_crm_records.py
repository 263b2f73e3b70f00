"""Record counts of CRM responses and requests (issue 14.1's counts), cut bodies and
hostile bodies included; data classes of the fields (14.3)."""

from __future__ import annotations

import json

import pytest

from leaktap.analytics.plaintext.crm_data_classes import data_classes
from leaktap.analytics.plaintext.crm_records import Count, count_request, count_response
from tests.analytics.crm_fixtures import ALL_CALLS, SECRET_CARD, SECRET_IBAN, Call, sf_record


@pytest.mark.parametrize("call", [c for c in ALL_CALLS if c.direction == "from_crm"
                                  and c.status < 300],
                         ids=lambda c: f"{c.vendor}-{c.method}-{c.target[:40]}")
def test_vendor_responses_give_their_record_count(call: Call) -> None:
    assert count_response(call.vendor, call.response, False) == Count(call.records)


@pytest.mark.parametrize("call", [c for c in ALL_CALLS if c.direction == "to_crm"
                                  and c.request and c.operation != "admin"],
                         ids=lambda c: f"{c.vendor}-{c.method}-{c.target[:40]}")
def test_write_requests_give_their_record_count(call: Call) -> None:
    assert count_request(call.vendor, call.method, call.request, False) == Count(call.records)


def test_single_records_count_one_per_vendor() -> None:
    assert count_response("salesforce", json.dumps(sf_record("Lead", 1)).encode(),
                          False) == Count(1)
    assert count_response("hubspot", b'{"id":"1","properties":{"a":"b"}}', False) == Count(1)
    assert count_response("dynamics365", b'{"@odata.context":"https://x/api/data/v9.2/$metadata'
                          b'#accounts/$entity","accountid":"1"}', False) == Count(1)
    assert count_response("zendesk", b'{"ticket":{"id":1}}', False) == Count(1)
    assert count_response("pipedrive", b'{"success":true,"data":{"id":1}}', False) == Count(1)
    assert count_response("pipedrive", b'{"success":true,"data":null}', False) == Count(0)
    assert count_response("salesforce", b'{"sobjects":[]}', False) == Count(None)
    assert count_response("salesforce", b"", False) == Count(None)


def _records_body(n: int) -> bytes:
    return json.dumps({"totalSize": n, "done": False, "nextRecordsUrl": "/q/01g-2000",
                       "records": [sf_record("Contact", i) for i in range(n)]}).encode()


def test_cut_responses_count_their_complete_records_as_a_lower_bound() -> None:
    full = _records_body(10)
    for cut in (len(full) // 3, len(full) // 2, len(full) - 10):
        prefix = full[:cut]
        complete = sum(1 for i in range(10)
                       if json.dumps(sf_record("Contact", i)).encode() in prefix
                       and prefix.index(json.dumps(sf_record("Contact", i)).encode())
                       + len(json.dumps(sf_record("Contact", i))) < cut)
        assert count_response("salesforce", prefix, True) == Count(complete, partial=True)
    # done:true before the cut: the page holds the whole result, totalSize is exact
    whole = json.dumps({"totalSize": 10, "done": True,
                        "records": [sf_record("Contact", i) for i in range(10)]}).encode()
    assert count_response("salesforce", whole[:200], True) == Count(10)
    hub = json.dumps({"results": [{"id": str(i), "properties": {}} for i in range(50)],
                      "paging": {}}).encode()
    got = count_response("hubspot", hub[: len(hub) // 2], True)
    assert got.partial and got.records == hub[: len(hub) // 2].count(b"}}, ")
    zd = json.dumps({"tickets": [{"id": i} for i in range(20)], "count": 20}).encode()
    assert count_response("zendesk", zd[:40], True) == Count(zd[:40].count(b"}, "),
                                                            partial=True)
    assert count_response("zoho", b'{"data": [{"id": "1"}, {"id": "2"}, {"id"', True) == Count(
        2, partial=True)
    assert count_response("dynamics365", b'{"@odata.context":"x","value":[{"a":1},{"a"',
                          True) == Count(1, partial=True)
    assert count_response("salesforce", b'{"attributes": {"type": "Acc', True) == Count(None)


def test_bulk_csv_results_count_rows_after_the_header() -> None:
    csv = b'"Id","Email"\n"003A","a@b.c"\n"003B","d@e.f"\n"003C","g@h.i"\n'
    assert count_response("salesforce", csv, False) == Count(3)
    assert count_response("salesforce", csv[:-5], True) == Count(2, partial=True)
    assert count_request("salesforce", "PUT", csv, False) == Count(3)


def test_hostile_bodies_are_bounded_and_never_raise() -> None:
    deep = b'{"records": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    assert count_response("salesforce", deep, False).records in (None, 0)
    assert count_response("salesforce", deep[:300_000], True).records in (None, 0)
    huge = b'{"records": [' + b",".join([b"{}"] * 1_000_000) + b"]}"
    assert count_response("salesforce", huge, False) == Count(1_000_000)
    assert count_response("salesforce", huge[:-10], True) == Count(999_997, partial=True)
    assert count_response("zendesk", b"{" + b'"a":[' * 50_000, True).records in (None, 0)
    assert count_response("hubspot", b"\xff\xfe{garbage", True) == Count(None)
    assert count_request("hubspot", "POST", b'{"inputs": [' + b"[" * 100_000, True) == Count(
        0, partial=True)
    assert data_classes(json.loads(b"[" * 500 + b"]" * 500)) == frozenset()


def test_data_classes_name_the_kinds_of_values_never_the_values() -> None:
    doc = {"records": [{**sf_record("Contact", 0), "Card__c": SECRET_CARD,
                        "Iban__c": SECRET_IBAN, "CreatedDate": "2024-01-01T10:00:00Z",
                        "Id": "003XX0000041TmiQAA", "NumberOfEmployees": "12"}]}
    assert data_classes(doc) == {"email", "phone", "national_id", "card", "iban", "free_text"}
    assert data_classes({"Name": "Acme", "Created": "2024-01-01", "AccountId": "0015000000"
                         "12345"}) == frozenset()
    assert data_classes({"note": f"card on file {SECRET_CARD} thanks"}) == {"card"}


def test_identifier_and_time_keys_are_skipped_but_words_ending_alike_are_not() -> None:
    phone = "+1 415 555 0199"
    assert data_classes({"Id": phone, "AccountId": phone, "created_at": phone,
                         "LastModifiedDate": phone, "url": phone}) == frozenset()
    assert data_classes({"Paid": phone}) == {"phone"}
    assert data_classes({"Valid": "jane@example.org"}) == {"email"}
