"""The CRM REST grammar (issue 14.2): each vendor's documented path shapes to
(object, operation, direction), templates free of values, unknown shapes kept."""

from __future__ import annotations

import json

import pytest

from leaktap.analytics.plaintext import crm_api
from leaktap.analytics.plaintext.crm_api import classify, soql_from

V = "/services/data/v59.0"
SF_ID = "001XX000003DHPhYAO"
GUID = "00000000-0000-0000-0000-000000000001"


def one(vendor: str, method: str, target: str, body: bytes = b"") -> tuple[str, str, str]:
    calls = classify(vendor, method, target, body)
    assert len(calls) == 1, calls
    return calls[0].object, calls[0].operation, calls[0].direction


SALESFORCE = [
    ("GET", f"{V}/sobjects/Account/{SF_ID}", b"", ("Account", "read", "from_crm")),
    ("PATCH", f"{V}/sobjects/Account/{SF_ID}", b"{}", ("Account", "update", "to_crm")),
    ("DELETE", f"{V}/sobjects/account/{SF_ID}", b"", ("Account", "delete", "to_crm")),
    ("POST", f"{V}/sobjects/Contact", b"{}", ("Contact", "create", "to_crm")),
    ("PATCH", f"{V}/sobjects/Contact/Ext_Id__c/ABC-123", b"{}", ("Contact", "upsert", "to_crm")),
    ("GET", f"{V}/sobjects/Contact/describe", b"", ("Contact", "read", "from_crm")),
    ("GET", f"{V}/sobjects/Case/updated?start=2024-01-01T00%3A00%3A00Z", b"",
     ("Case", "query", "from_crm")),
    ("GET", f"{V}/sobjects/My_Object__c/{SF_ID}", b"", ("My_Object__c", "read", "from_crm")),
    ("GET", f"{V}/query?q=SELECT+Id+FROM+Opportunity", b"", ("Opportunity", "query", "from_crm")),
    ("GET", f"{V}/queryAll/?q=select%20id%20from%20LEAD", b"", ("Lead", "query", "from_crm")),
    ("GET", f"{V}/query/01gD0000002HU6KIAW-2000", b"", ("other", "query", "from_crm")),
    ("GET", f"{V}/query?q=SELECT+Id+FROM+User+WHERE+IsActive+%3D+true", b"",
     ("User", "admin", "from_crm")),
    ("POST", f"{V}/sobjects/User", b"{}", ("User", "admin", "to_crm")),
    ("PATCH", f"{V}/sobjects/Profile/00eXX000000abcdQAA", b"{}", ("Profile", "admin", "to_crm")),
    ("POST", f"{V}/sobjects/PermissionSet", b"{}", ("PermissionSet", "admin", "to_crm")),
    ("POST", f"{V}/sobjects/PermissionSetAssignment", b"{}",
     ("PermissionSetAssignment", "admin", "to_crm")),
    ("GET", f"{V}/sobjects/ConnectedApplication/0H4XX0000000001AAA", b"",
     ("ConnectedApplication", "admin", "from_crm")),
    ("POST", f"{V}/jobs/ingest", b'{"object":"Contact","operation":"insert"}',
     ("Contact", "bulk", "to_crm")),
    ("PUT", f"{V}/jobs/ingest/7505fEXAMPLE4C2AAM/batches", b"Id,Name\n1,a\n",
     ("other", "bulk", "to_crm")),
    ("POST", f"{V}/jobs/query", b'{"operation":"query","query":"SELECT Id FROM Account"}',
     ("Account", "bulk", "from_crm")),
    ("GET", f"{V}/jobs/query/7505fEXAMPLE4C2AAM/results", b"", ("other", "bulk", "from_crm")),
    ("POST", "/services/async/59.0/job",
     b"<jobInfo><operation>insert</operation><object>Lead</object></jobInfo>",
     ("Lead", "bulk", "to_crm")),
    ("GET", f"{V}/tooling/query?q=SELECT+Id+FROM+ApexClass", b"",
     ("ApexClass", "query", "from_crm")),
    ("POST", f"{V}/tooling/sobjects/ApexClass", b"{}", ("ApexClass", "admin", "to_crm")),
    ("GET", f"{V}/tooling/executeAnonymous?anonymousBody=System.debug(1)", b"",
     ("ApexAnonymous", "admin", "to_crm")),
    ("POST", "/services/Soap/m/59.0", b"<soapenv:Body><met:deploy><met:ZipFile>",
     ("Metadata", "admin", "to_crm")),
    ("POST", "/services/Soap/m/59.0", b"<soapenv:Body><met:listMetadata>",
     ("Metadata", "admin", "from_crm")),
    ("POST", f"{V}/metadata/deployRequest", b"", ("Metadata", "admin", "to_crm")),
    ("POST", "/services/oauth2/token", b"grant_type=refresh_token",
     ("oauth_token", "create", "to_crm")),
    ("POST", "/services/Soap/u/59.0", b'<soapenv:Body><urn:query><urn:queryString>SELECT Id '
     b"FROM Contact WHERE Name = &apos;x&apos;</urn:queryString></urn:query>",
     ("Contact", "query", "from_crm")),
    ("POST", "/services/Soap/c/59.0/00DXX0000008abc", b'<soapenv:Body><urn:create><urn:sObjects '
     b'xsi:type="urn1:Lead"><LastName>x</LastName></urn:sObjects></urn:create>',
     ("Lead", "create", "to_crm")),
    ("POST", "/services/Soap/u/59.0", b"<soapenv:Body><urn:update><urn:sObjects><urn1:type>User"
     b"</urn1:type></urn:sObjects></urn:update>", ("User", "admin", "to_crm")),
    ("POST", "/services/Soap/u/59.0", b"<soapenv:Body><urn:login><urn:username>",
     ("oauth_token", "create", "to_crm")),
    ("GET", f"{V}/ui-api/records/{SF_ID}?fields=Account.Name", b"",
     ("Account", "read", "from_crm")),
    ("PATCH", f"{V}/ui-api/records/003XX000004TmiQAAS", b'{"fields":{}}',
     ("Contact", "update", "to_crm")),
    ("POST", f"{V}/ui-api/records", b'{"apiName":"Opportunity","fields":{}}',
     ("Opportunity", "create", "to_crm")),
    ("GET", f"{V}/ui-api/list-records/Case/AllOpenCases", b"", ("Case", "query", "from_crm")),
    ("POST", f"{V}/graphql", b'{"query":"query accounts { uiapi { query { Account(first: 10) '
     b'{ edges { node { Id } } } } } }"}', ("Account", "query", "from_crm")),
    ("GET", f"{V}/limits", b"", ("other", "read", "from_crm")),
    ("GET", "/services/apexrest/Cases/123", b"", ("other", "read", "from_crm")),
]


@pytest.mark.parametrize(("method", "target", "body", "expected"), SALESFORCE)
def test_salesforce_grammar(method: str, target: str, body: bytes,
                            expected: tuple[str, str, str]) -> None:
    assert one("salesforce", method, target, body) == expected


HUBSPOT = [
    ("GET", "/crm/v3/objects/contacts?limit=10", ("contacts", "query", "from_crm")),
    ("POST", "/crm/v3/objects/contacts", ("contacts", "create", "to_crm")),
    ("GET", "/crm/v3/objects/contacts/512", ("contacts", "read", "from_crm")),
    ("PATCH", "/crm/v3/objects/deals/512", ("deals", "update", "to_crm")),
    ("DELETE", "/crm/v3/objects/deals/512", ("deals", "delete", "to_crm")),
    ("POST", "/crm/v3/objects/contacts/batch/read", ("contacts", "read", "from_crm")),
    ("POST", "/crm/v3/objects/contacts/batch/upsert", ("contacts", "upsert", "to_crm")),
    ("POST", "/crm/v3/objects/companies/batch/archive", ("companies", "delete", "to_crm")),
    ("POST", "/crm/v3/objects/tickets/search", ("tickets", "query", "from_crm")),
    ("POST", "/crm/v3/objects/2-123456/batch/create", ("2-123456", "create", "to_crm")),
    ("PUT", "/crm/v4/objects/contacts/512/associations/companies/77",
     ("associations", "update", "to_crm")),
    ("POST", "/crm/v3/associations/contacts/companies/batch/create",
     ("associations", "create", "to_crm")),
    ("POST", "/crm/v3/imports", ("imports", "bulk", "to_crm")),
    ("POST", "/crm/v3/exports/export/async", ("exports", "bulk", "from_crm")),
    ("GET", "/settings/v3/users", ("users", "admin", "from_crm")),
    ("POST", "/settings/v3/users", ("users", "admin", "to_crm")),
    ("PUT", "/settings/v3/users/77", ("users", "admin", "to_crm")),
    ("GET", "/oauth/v1/access-tokens/CJSP5qf1KhICAQEYs-gDIIGOBii1hQIyGQAf3xBKmlwHjX7OI",
     ("oauth", "admin", "from_crm")),
    ("POST", "/oauth/v1/token", ("oauth_token", "create", "to_crm")),
    ("GET", "/account-info/v3/details", ("account-info", "admin", "from_crm")),
    ("GET", "/crm/v3/owners", ("owners", "query", "from_crm")),
    ("GET", "/contacts/v1/lists/all/contacts/all", ("contacts", "read", "from_crm")),
    ("GET", "/cms/v3/blogs/posts", ("other", "read", "from_crm")),
]


@pytest.mark.parametrize(("method", "target", "expected"), HUBSPOT)
def test_hubspot_grammar(method: str, target: str, expected: tuple[str, str, str]) -> None:
    assert one("hubspot", method, target) == expected


DYNAMICS = [
    ("GET", "/api/data/v9.2/accounts?$select=name", ("accounts", "query", "from_crm")),
    ("POST", "/api/data/v9.2/accounts", ("accounts", "create", "to_crm")),
    ("GET", f"/api/data/v9.2/accounts({GUID})", ("accounts", "read", "from_crm")),
    ("PATCH", f"/api/data/v9.2/accounts({GUID})", ("accounts", "update", "to_crm")),
    ("PATCH", "/api/data/v9.2/contacts(emailaddress1='a%40b.com')",
     ("contacts", "upsert", "to_crm")),
    ("DELETE", f"/api/data/v9.2/leads({GUID})", ("leads", "delete", "to_crm")),
    ("GET", f"/api/data/v9.2/accounts({GUID})/contact_customer_accounts",
     ("accounts", "read", "from_crm")),
    ("POST", "/api/data/v9.2/contacts/Microsoft.Dynamics.CRM.CreateMultiple",
     ("contacts", "bulk", "to_crm")),
    ("GET", "/api/data/v9.2/systemusers?$select=fullname", ("systemusers", "admin", "from_crm")),
    ("POST", f"/api/data/v9.2/systemusers({GUID})/systemuserroles_association/$ref",
     ("systemusers", "admin", "to_crm")),
    ("POST", "/api/data/v9.2/roles", ("roles", "admin", "to_crm")),
    ("PATCH", f"/api/data/v9.2/teams({GUID})", ("teams", "admin", "to_crm")),
    ("POST", "/api/data/v9.2/EntityDefinitions", ("entitydefinitions", "admin", "to_crm")),
    ("GET", "/api/data/v9.2/WhoAmI", ("whoami", "query", "from_crm")),
]


@pytest.mark.parametrize(("method", "target", "expected"), DYNAMICS)
def test_dynamics_grammar(method: str, target: str, expected: tuple[str, str, str]) -> None:
    assert one("dynamics365", method, target) == expected


def test_dynamics_batch_is_split_into_its_requests() -> None:
    body = (b"--batch_1\r\nContent-Type: application/http\r\n\r\n"
            b"POST /api/data/v9.2/tasks HTTP/1.1\r\nContent-Type: application/json\r\n\r\n"
            b'{"subject":"x"}\r\n--batch_1\r\nContent-Type: application/http\r\n\r\n'
            b"GET accounts(" + GUID.encode() + b") HTTP/1.1\r\n\r\n--batch_1--\r\n")
    calls = classify("dynamics365", "POST", "/api/data/v9.2/$batch", body)
    assert [(c.object, c.operation, c.direction) for c in calls] == [
        ("tasks", "create", "to_crm"), ("accounts", "read", "from_crm")]
    assert {c.template for c in calls} == {"/api/data/v9.2/$batch"}


ZENDESK = [
    ("GET", "/api/v2/tickets.json", b"", ("tickets", "query", "from_crm")),
    ("GET", "/api/v2/tickets/35436.json", b"", ("tickets", "read", "from_crm")),
    ("PUT", "/api/v2/tickets/35436", b"{}", ("tickets", "update", "to_crm")),
    ("DELETE", "/api/v2/tickets/35436.json", b"", ("tickets", "delete", "to_crm")),
    ("POST", "/api/v2/tickets/create_many.json", b"{}", ("tickets", "create", "to_crm")),
    ("PUT", "/api/v2/users/create_or_update_many.json", b"{}", ("users", "upsert", "to_crm")),
    ("DELETE", "/api/v2/tickets/destroy_many.json?ids=1,2", b"", ("tickets", "delete", "to_crm")),
    ("GET", "/api/v2/incremental/tickets/cursor.json?start_time=1", b"",
     ("tickets", "bulk", "from_crm")),
    ("GET", "/api/v2/incremental/users.json?start_time=1", b"", ("users", "bulk", "from_crm")),
    ("GET", "/api/v2/search.json?query=type%3Aticket+status%3Aopen", b"",
     ("tickets", "query", "from_crm")),
    ("PUT", "/api/v2/users/9873843.json", b'{"user":{"role":"admin"}}',
     ("users", "admin", "to_crm")),
    ("PUT", "/api/v2/users/9873843.json", b'{"user":{"name":"x"}}',
     ("users", "update", "to_crm")),
    ("POST", "/api/v2/custom_roles", b"{}", ("custom_roles", "admin", "to_crm")),
    ("POST", "/api/v2/oauth/clients.json", b"{}", ("oauth", "admin", "to_crm")),
]


@pytest.mark.parametrize(("method", "target", "body", "expected"), ZENDESK)
def test_zendesk_grammar(method: str, target: str, body: bytes,
                         expected: tuple[str, str, str]) -> None:
    assert one("zendesk", method, target, body) == expected


ZOHO = [
    ("GET", "/crm/v6/Leads?fields=Last_Name", b"", ("Leads", "query", "from_crm")),
    ("GET", "/crm/v2/Leads/4150868000000225013", b"", ("Leads", "read", "from_crm")),
    ("POST", "/crm/v6/Contacts", b"{}", ("Contacts", "create", "to_crm")),
    ("PUT", "/crm/v6/Contacts/4150868000000225013", b"{}", ("Contacts", "update", "to_crm")),
    ("DELETE", "/crm/v6/Deals?ids=1,2", b"", ("Deals", "delete", "to_crm")),
    ("GET", "/crm/v6/Accounts/search?criteria=(Account_Name:equals:x)", b"",
     ("Accounts", "query", "from_crm")),
    ("POST", "/crm/v6/Contacts/upsert", b"{}", ("Contacts", "upsert", "to_crm")),
    ("POST", "/crm/v6/coql", b'{"select_query":"select Last_Name from Contacts where '
     b'(Last_Name = \'x\')"}', ("Contacts", "query", "from_crm")),
    ("POST", "/crm/bulk/v6/read", b'{"query":{"module":{"api_name":"Leads"}}}',
     ("Leads", "bulk", "from_crm")),
    ("POST", "/crm/bulk/v2/write", b'{"resource":[{"type":"data","module":"Deals"}]}',
     ("Deals", "bulk", "to_crm")),
    ("GET", "/crm/v6/users?type=AllUsers", b"", ("users", "admin", "from_crm")),
    ("POST", "/crm/v6/users", b"{}", ("users", "admin", "to_crm")),
    ("GET", "/crm/v6/settings/roles", b"", ("roles", "admin", "from_crm")),
    ("PUT", "/crm/v6/settings/profiles/1", b"{}", ("profiles", "admin", "to_crm")),
    ("GET", "/crm/v6/settings/fields?module=Leads", b"", ("settings.fields", "read",
                                                          "from_crm")),
]


@pytest.mark.parametrize(("method", "target", "body", "expected"), ZOHO)
def test_zoho_grammar(method: str, target: str, body: bytes,
                      expected: tuple[str, str, str]) -> None:
    assert one("zoho", method, target, body) == expected


PIPEDRIVE = [
    ("GET", "/v1/deals?start=0", ("deals", "query", "from_crm")),
    ("GET", "/v1/deals/42", ("deals", "read", "from_crm")),
    ("POST", "/v1/persons", ("persons", "create", "to_crm")),
    ("PUT", "/v1/persons/42", ("persons", "update", "to_crm")),
    ("DELETE", "/v1/deals?ids=1,2,3", ("deals", "delete", "to_crm")),
    ("GET", "/v1/persons/search?term=x", ("persons", "query", "from_crm")),
    ("GET", "/api/v2/deals/42", ("deals", "read", "from_crm")),
    ("PATCH", "/api/v2/deals/42", ("deals", "update", "to_crm")),
    ("GET", "/v1/users", ("users", "admin", "from_crm")),
    ("POST", "/v1/users", ("users", "admin", "to_crm")),
    ("GET", "/v1/permissionSets/abc/assignments", ("permissionSets", "admin", "from_crm")),
    ("GET", "/v1/roles/3", ("roles", "admin", "from_crm")),
]


@pytest.mark.parametrize(("method", "target", "expected"), PIPEDRIVE)
def test_pipedrive_grammar(method: str, target: str, expected: tuple[str, str, str]) -> None:
    assert one("pipedrive", method, target) == expected


def test_salesforce_composite_calls_take_their_objects_and_records_from_the_body() -> None:
    collection = {"allOrNone": True, "records": [
        {"attributes": {"type": "Account"}, "Name": "a"},
        {"attributes": {"type": "Contact"}, "LastName": "b"},
        {"attributes": {"type": "Account"}, "Name": "c"}]}
    calls = classify("salesforce", "POST", f"{V}/composite/sobjects",
                     json.dumps(collection).encode())
    assert [(c.object, c.operation, c.records) for c in calls] == [
        ("Account", "create", 2), ("Contact", "create", 1)]
    calls = classify("salesforce", "DELETE",
                     f"{V}/composite/sobjects?ids=001XX000003DHPhYAO,003XX000004TmiQAAS,"
                     "003XX000004TmiRAAS&allOrNone=false")
    assert [(c.object, c.operation, c.records) for c in calls] == [
        ("Account", "delete", 1), ("Contact", "delete", 2)]
    composite = {"compositeRequest": [
        {"method": "POST", "url": f"{V}/sobjects/Account", "referenceId": "r1",
         "body": {"Name": "x"}},
        {"method": "GET", "url": f"{V}/sobjects/Account/@{{r1.id}}", "referenceId": "r2"},
        {"method": "POST", "url": f"{V}/sobjects/PermissionSetAssignment", "referenceId": "r3",
         "body": {}}]}
    calls = classify("salesforce", "POST", f"{V}/composite", json.dumps(composite).encode())
    assert [(c.object, c.operation, c.direction) for c in calls] == [
        ("Account", "create", "to_crm"), ("Account", "read", "from_crm"),
        ("PermissionSetAssignment", "admin", "to_crm")]
    batch = {"batchRequests": [{"method": "PATCH", "url": f"v59.0/sobjects/Lead/{SF_ID}",
                                "richInput": {"Status": "x"}},
                               {"method": "GET", "url": "v59.0/query?q=SELECT+Id+FROM+Case"}]}
    calls = classify("salesforce", "POST", f"{V}/composite/batch", json.dumps(batch).encode())
    assert [(c.object, c.operation) for c in calls] == [("Lead", "update"), ("Case", "query")]
    tree = {"records": [{"attributes": {"type": "Account", "referenceId": "a1"}, "Name": "x",
                         "Contacts": {"records": [
                             {"attributes": {"type": "Contact", "referenceId": "c1"}},
                             {"attributes": {"type": "Contact", "referenceId": "c2"}}]}}]}
    calls = classify("salesforce", "POST", f"{V}/composite/tree/Account",
                     json.dumps(tree).encode())
    assert [(c.object, c.operation, c.records) for c in calls] == [
        ("Account", "create", 1), ("Contact", "create", 2)]
    graph = {"graphs": [{"graphId": "g1", "compositeRequest": [
        {"method": "POST", "url": f"{V}/sobjects/Opportunity", "referenceId": "o"}]}]}
    calls = classify("salesforce", "POST", f"{V}/composite/graph", json.dumps(graph).encode())
    assert [(c.object, c.operation) for c in calls] == [("Opportunity", "create")]


@pytest.mark.parametrize(("query", "expected"), [
    ("SELECT Id FROM Account", "Account"),
    ("select id from account where name = 'x'", "account"),
    ("SELECT Id, (SELECT Id FROM Contacts) FROM Account", "Account"),
    ("SELECT Id FROM Contact WHERE AccountId IN (SELECT Id FROM Account) LIMIT 5", "Contact"),
    ("SELECT Name FROM Lead WHERE Company = 'from FROM x' ", "Lead"),
    ("SELECT Name FROM Lead WHERE Company = 'it\\'s FROM Case'", "Lead"),
    ("SELECT TYPEOF What WHEN Account THEN Phone END FROM Event", "Event"),
    ("SELECT COUNT() FROM Opportunity GROUP BY StageName", "Opportunity"),
    ("SELECT Id FROM", None),
    ("DELETE everything", None),
])
def test_soql_from_takes_the_outer_object(query: str, expected: str | None) -> None:
    assert soql_from(query) == expected


def test_soql_case_and_url_encoding_give_one_canonical_object() -> None:
    for target in (f"{V}/query?q=SELECT+Id+FROM+contact", f"{V}/query?q=select%20id%20FROM%20"
                   "CONTACT", f"{V}/query?q=SELECT%20Id%20FROM%20Contact%20WHERE%20Email"
                   "%3D%27a%40b.com%27"):
        assert one("salesforce", "GET", target) == ("Contact", "query", "from_crm")


@pytest.mark.parametrize(("vendor", "target", "template"), [
    ("salesforce", f"{V}/sobjects/Contact/003XX000004TmiQAAS?fields=Email,Phone",
     f"{V}/sobjects/Contact/{{id}}?fields"),
    ("salesforce", f"{V}/sobjects/Contact/Email__c/jane%40example.org",
     f"{V}/sobjects/Contact/Email__c/{{value}}"),
    ("salesforce", f"{V}/query?q=SELECT+Id+FROM+Contact+WHERE+Email%3D%27jane%40example.org%27",
     f"{V}/query?q"),
    ("hubspot", "/crm/v3/objects/contacts/512/associations/companies/77",
     "/crm/v3/objects/contacts/{n}/associations/companies/{n}"),
    ("dynamics365", f"/api/data/v9.2/accounts({GUID})", "/api/data/v9.2/accounts({key})"),
    ("zendesk", "/api/v2/users/9873843/tickets/requested.json",
     "/api/v2/users/{n}/tickets/requested.json"),
    ("pipedrive", "/v1/files/8b0a7c5e-1f2d-4e3c-9a8b-7c6d5e4f3a2b/download",
     "/v1/files/{uuid}/download"),
    ("zoho", "/crm/v6/Leads/4150868000000225013", "/crm/v6/Leads/{n}"),
    ("unknowncrm", "/x/jane.doe@example.org/0123456789abcdef0123/tok_AbCdEf1234567890XyZ",
     "/x/{value}/{hex}/{value}"),
])
def test_templates_hold_no_values(vendor: str, target: str, template: str) -> None:
    calls = classify(vendor, "GET", target)
    assert calls[0].template == template


def test_unknown_shapes_are_kept_as_other_with_their_template() -> None:
    for vendor in ("salesforce", "hubspot", "dynamics365", "zendesk", "zoho", "pipedrive",
                   "freshsales"):
        calls = classify(vendor, "POST", "/weird/endpoint/12345?token=abc")
        assert [(c.object, c.operation, c.template) for c in calls] == [
            ("other", "create", "/weird/endpoint/{n}?token")]


def test_hostile_requests_are_bounded_and_never_raise() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    long_path = "/services/data/v59.0/" + "/".join(["a"] * 10_000)
    many = json.dumps({"compositeRequest": [
        {"method": "GET", "url": f"{V}/sobjects/Account/{SF_ID}"}] * 50_000}).encode()
    for vendor, method, target, body in [
        ("salesforce", "POST", f"{V}/composite/sobjects", deep),
        ("salesforce", "GET", long_path, b""),
        ("salesforce", "POST", f"{V}/composite", many),
        ("salesforce", "GET", f"{V}/query?q=" + "(" * 50_000, b""),
        ("dynamics365", "POST", "/api/data/v9.2/$batch", b"GET x HTTP/1.1\r\n" * 100_000),
        ("zendesk", "GET", "/api/v2/" + "%" * 5000, b""),
        ("hubspot", "GET", "", b""),
        ("salesforce", "GET", "https://acme.my.salesforce.com", b""),
    ]:
        calls = classify(vendor, method, target, body)
        assert calls and all(c.operation in crm_api.OPERATIONS for c in calls)
        assert all(len(c.template) <= crm_api.TEMPLATE_MAX for c in calls)
        assert len(calls) <= crm_api.SUBREQUESTS_MAX


def test_a_grammar_that_gives_up_keeps_the_call_as_other_and_counts_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import Counter

    def broken(t: crm_api.Target) -> list[crm_api.ApiCall]:
        raise TypeError("a shape the grammar did not expect")

    monkeypatch.setitem(crm_api._VENDORS, "salesforce", broken)
    errors: Counter[str] = Counter()
    calls = classify("salesforce", "POST", f"{V}/composite/12345", b"{}", errors)
    assert [(c.object, c.operation, c.template) for c in calls] == [
        ("other", "create", f"{V}/composite/{{n}}")]
    assert errors == {"grammar_gave_up_salesforce": 1}
