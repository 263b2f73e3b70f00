"""CRM API calls per vendor, shaped like each vendor's documented requests and
responses, with the object, operation, direction and record count each must give.

Record values carry personal data (e-mail, phone, national id, card, IBAN, free
text) and query strings carry values, so the redaction tests can look for them
everywhere leaktap stores or sends something.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from leaktap.analytics.plaintext.crm_calls import CrmExchange

T0 = 1_767_000_000.0
EXE = "/opt/assistant/bin/crm-sync"
SECRET_EMAIL = "jane.secret@example.org"
SECRET_PHONE = "+1 415 555 0199"
SECRET_SSN = "219-09-9999"
SECRET_CARD = "4111 1111 1111 1111"
SECRET_IBAN = "DE89 3704 0044 0532 0130 00"
SECRET_NOTE = "Customer asked about the renewal and wants a discount on the order"
SECRET_QUERY_VALUE = "Acme Secret Holdings"
SECRET_RECORD_ID = "003XX0000041TmiQAA"
# every value above, as they must never appear at rest
SECRETS = (SECRET_EMAIL, SECRET_PHONE, SECRET_SSN, SECRET_CARD, SECRET_IBAN, SECRET_NOTE,
           SECRET_QUERY_VALUE, SECRET_RECORD_ID, "Secret+Holdings", "Secret%20Holdings")


def person(i: int) -> dict[str, Any]:
    return {"Email": SECRET_EMAIL if i == 0 else f"p{i}@example.org",
            "Phone": SECRET_PHONE, "SSN__c": SECRET_SSN, "Description": SECRET_NOTE}


def sf_record(kind: str, i: int) -> dict[str, Any]:
    rid = SECRET_RECORD_ID if i == 0 else f"003XX00000{i:05d}AAA"
    return {"attributes": {"type": kind, "url": f"/services/data/v59.0/sobjects/{kind}/{rid}"},
            "Id": rid, **person(i)}


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@dataclass(frozen=True, slots=True)
class Call:
    vendor: str
    method: str
    target: str
    response: bytes
    object: str
    operation: str
    direction: str
    records: int
    request: bytes = b""
    status: int = 200


def _sf() -> list[Call]:
    v = "salesforce"
    q = "SELECT Id, Email, (SELECT Id FROM Cases) FROM Contact WHERE Account.Name = " \
        f"'{SECRET_QUERY_VALUE}'"
    from urllib.parse import quote_plus
    return [
        Call(v, "GET", f"/services/data/v59.0/query?q={quote_plus(q)}",
             body({"totalSize": 3, "done": True,
                   "records": [sf_record("Contact", i) for i in range(3)]}),
             "Contact", "query", "from_crm", 3),
        Call(v, "GET", f"/services/data/v59.0/sobjects/Contact/{SECRET_RECORD_ID}",
             body({**sf_record("Contact", 0), "Card__c": SECRET_CARD}), "Contact", "read",
             "from_crm", 1),
        Call(v, "GET", "/services/data/v59.0/queryAll?q=select+id+from+case+where+isdeleted"
             "+%3D+true", body({"totalSize": 2, "done": True, "records": [
                 {"attributes": {"type": "Case"}, "Id": "500XX0000001AAAAA1"},
                 {"attributes": {"type": "Case"}, "Id": "500XX0000002AAAAA1"}]}),
             "Case", "query", "from_crm", 2),
        Call(v, "POST", "/services/data/v59.0/sobjects/Case", body({
            "id": "500XX0000003AAAAA1", "success": True, "errors": []}),
             "Case", "create", "to_crm", 1, request=body({"Subject": SECRET_NOTE}), status=201),
        Call(v, "POST", "/services/data/v59.0/composite/sobjects", body([
            {"id": "001XX0000001AAAAA1", "success": True, "errors": []}] * 3),
             "Account", "create", "to_crm", 3, request=body({"allOrNone": False, "records": [
                 {"attributes": {"type": "Account"}, "Name": f"A{i}"} for i in range(3)]})),
        Call(v, "POST", "/services/data/v59.0/sobjects/PermissionSetAssignment", body({
            "id": "0PaXX0000001AAAAA1", "success": True, "errors": []}),
             "PermissionSetAssignment", "admin", "to_crm", 1,
             request=body({"AssigneeId": "005XX0000001AAAAA1",
                           "PermissionSetId": "0PSXX0000001AAAAA1"}), status=201),
        Call(v, "GET", "/services/data/v59.0/query?q=SELECT+Id+FROM+Lead", body([{
            "message": "insufficient access rights on object id",
            "errorCode": "INSUFFICIENT_ACCESS_OR_READONLY"}]),
             "Lead", "query", "from_crm", 0, status=403),
    ]


def _hubspot() -> list[Call]:
    v = "hubspot"
    contact = {"id": "512", "properties": {"email": SECRET_EMAIL, "phone": SECRET_PHONE},
               "createdAt": "2024-01-01T00:00:00Z", "archived": False}
    return [
        Call(v, "GET", "/crm/v3/objects/contacts?limit=4&properties=email",
             body({"results": [contact] * 4, "paging": {"next": {"after": "4"}}}),
             "contacts", "query", "from_crm", 4),
        Call(v, "POST", "/crm/v3/objects/contacts/search", body({
            "total": 120, "results": [contact] * 2}), "contacts", "query", "from_crm", 2,
             request=body({"filterGroups": [{"filters": [{"propertyName": "email",
                                                          "value": SECRET_EMAIL}]}]})),
        Call(v, "GET", "/crm/v3/objects/deals/9001", body({
            "id": "9001", "properties": {"amount": "100"}}), "deals", "read", "from_crm", 1),
        Call(v, "POST", "/crm/v3/objects/companies/batch/create", body({
            "status": "COMPLETE", "results": [{"id": "1"}] * 5}),
             "companies", "create", "to_crm", 5,
             request=body({"inputs": [{"properties": {"name": f"c{i}"}} for i in range(5)]}),
             status=201),
        Call(v, "POST", "/settings/v3/users", body({"id": "77"}), "users", "admin", "to_crm",
             1, request=body({"email": SECRET_EMAIL, "roleId": "1"}), status=201),
    ]


def _dynamics() -> list[Call]:
    v = "dynamics365"
    account = {"@odata.etag": "W/\"1\"", "accountid": "8f1c5b8e-4b8f-4c3a-9d3e-1a2b3c4d5e6f",
               "name": "Contoso", "emailaddress1": SECRET_EMAIL}
    return [
        Call(v, "GET", "/api/data/v9.2/accounts?$select=name,emailaddress1&$count=true",
             body({"@odata.context": "https://contoso.crm.dynamics.com/api/data/v9.2/"
                   "$metadata#accounts(name,emailaddress1)", "@odata.count": 6,
                   "value": [account] * 6}), "accounts", "query", "from_crm", 6),
        Call(v, "GET", "/api/data/v9.2/contacts(8f1c5b8e-4b8f-4c3a-9d3e-1a2b3c4d5e6f)",
             body({"@odata.context": "https://contoso.crm.dynamics.com/api/data/v9.2/"
                   "$metadata#contacts/$entity", "contactid": "x", "telephone1": SECRET_PHONE}),
             "contacts", "read", "from_crm", 1),
        Call(v, "PATCH", "/api/data/v9.2/contacts(8f1c5b8e-4b8f-4c3a-9d3e-1a2b3c4d5e6f)",
             b"", "contacts", "update", "to_crm", 1,
             request=body({"telephone1": SECRET_PHONE}), status=204),
        Call(v, "POST", "/api/data/v9.2/systemusers(8f1c5b8e-4b8f-4c3a-9d3e-1a2b3c4d5e6f)/"
             "systemuserroles_association/$ref", b"", "systemusers", "admin", "to_crm", 1,
             request=body({"@odata.id": "roles(00000000-0000-0000-0000-000000000001)"}),
             status=204),
    ]


def _zendesk() -> list[Call]:
    v = "zendesk"
    ticket = {"id": 35436, "subject": "Help", "description": SECRET_NOTE,
              "url": "https://acme.zendesk.com/api/v2/tickets/35436.json"}
    return [
        Call(v, "GET", "/api/v2/tickets.json?page[size]=7", body({
            "tickets": [ticket] * 7, "meta": {"has_more": True}, "count": 7000}),
             "tickets", "query", "from_crm", 7),
        Call(v, "GET", "/api/v2/tickets/35436.json", body({"ticket": ticket}),
             "tickets", "read", "from_crm", 1),
        Call(v, "GET", "/api/v2/incremental/tickets/cursor.json?start_time=1332034771",
             body({"tickets": [ticket] * 8, "after_cursor": "MTU3NjYxMzUzOS4wfHw0Njd8",
                   "end_of_stream": True}), "tickets", "bulk", "from_crm", 8),
        Call(v, "POST", "/api/v2/tickets/create_many.json", body({"job_status": {
            "id": "82de0b044094f0c67893ac9fe64f1a99", "status": "queued"}}),
             "tickets", "create", "to_crm", 2,
             request=body({"tickets": [{"subject": "a"}, {"subject": "b"}]})),
        Call(v, "PUT", "/api/v2/users/9873843.json", body({"user": {"id": 9873843}}),
             "users", "admin", "to_crm", 1, request=body({"user": {"role": "admin"}})),
    ]


def _zoho() -> list[Call]:
    v = "zoho"
    lead = {"id": "4150868000000225013", "Last_Name": "Doe", "Email": SECRET_EMAIL,
            "IBAN": SECRET_IBAN}
    return [
        Call(v, "GET", "/crm/v6/Leads?fields=Last_Name,Email&per_page=9", body({
            "data": [lead] * 9, "info": {"per_page": 9, "count": 9, "page": 1,
                                         "more_records": True}}),
             "Leads", "query", "from_crm", 9),
        Call(v, "POST", "/crm/v6/coql", body({"data": [lead] * 2, "info": {
            "count": 2, "more_records": False}}), "Leads", "query", "from_crm", 2,
             request=body({"select_query": "select Last_Name from Leads where Email = "
                           f"'{SECRET_EMAIL}'"})),
        Call(v, "POST", "/crm/v6/Contacts/upsert", body({"data": [
            {"code": "SUCCESS", "status": "success"}] * 3}), "Contacts", "upsert", "to_crm", 3,
             request=body({"data": [{"Last_Name": f"n{i}"} for i in range(3)],
                           "duplicate_check_fields": ["Email"]})),
        Call(v, "GET", "/crm/v6/settings/profiles", body({"profiles": [{"id": "1"}]}),
             "profiles", "admin", "from_crm", 1),
    ]


def _pipedrive() -> list[Call]:
    v = "pipedrive"
    deal = {"id": 1, "title": "Deal", "person_id": {"email": [{"value": SECRET_EMAIL}]}}
    return [
        Call(v, "GET", "/v1/deals?start=0&limit=3", body({
            "success": True, "data": [deal] * 3, "additional_data": {"pagination": {
                "start": 0, "limit": 3, "more_items_in_collection": True, "next_start": 3}}}),
             "deals", "query", "from_crm", 3),
        Call(v, "GET", "/api/v2/persons/77", body({"success": True, "data": {"id": 77}}),
             "persons", "read", "from_crm", 1),
        Call(v, "DELETE", "/v1/deals?ids=4,5,6,7", body({"success": True, "data": {
            "id": [4, 5, 6, 7]}}), "deals", "delete", "to_crm", 4),
        Call(v, "GET", "/v1/permissionSets", body({"success": True, "data": [{"id": "x"}]}),
             "permissionSets", "admin", "from_crm", 1),
    ]


FIXTURES: dict[str, list[Call]] = {
    "salesforce": _sf(), "hubspot": _hubspot(), "dynamics365": _dynamics(),
    "zendesk": _zendesk(), "zoho": _zoho(), "pipedrive": _pipedrive(),
}
ALL_CALLS = [c for calls in FIXTURES.values() for c in calls]


def exchange(call: Call, *, tenant: str = "acme", exe: str = EXE, ts: float = T0,
             pid: int = 4242, instance: str | None = "acme", status: int | None = -1,
             response_cut: int | None = None) -> CrmExchange:
    """The exchange a read side would hand over for `call` (status -1: the call's own)."""
    response = call.response
    truncated = False
    if response_cut is not None and response_cut < len(response):
        response, truncated = response[:response_cut], True
    return CrmExchange(
        ts=ts, tenant=tenant, pid=pid, exe=exe, vendor=call.vendor, instance=instance,
        host=f"{instance or 'api'}.example.test", method=call.method, target=call.target,
        request_body=call.request, request_bytes=len(call.request),
        status=call.status if status == -1 else status, response_body=response,
        response_bytes=len(call.response), response_truncated=truncated,
    )
