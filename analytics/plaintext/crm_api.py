"""The CRM REST grammar: a request's method and target as (object, operation, template).

Each vendor's documented path shapes are parsed into the CRM object the call
reads or writes and one of the operations `read | query | create | update |
upsert | delete | bulk | admin`. Calls that change who can reach the data
(users, profiles, permission sets, roles, OAuth apps, metadata deploys) are
`admin` whatever their verb; `write` says whether a call changes the CRM (it
decides the direction of the data flow and an admin call's severity).

The template is the only form of the target that leaves this module: ids,
numbers, UUIDs, Salesforce ids, tokens and values are placeholders, query
strings keep their parameter names only. A shape no rule knows is object
`other` with its template, never dropped. Pure and bounded: a body is read only
where the path says it names the objects (composite, batch, bulk jobs).
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html import unescape
from typing import Any
from urllib.parse import parse_qs, unquote

READ, QUERY, CREATE, UPDATE, UPSERT, DELETE, BULK, ADMIN = (
    "read", "query", "create", "update", "upsert", "delete", "bulk", "admin")
OPERATIONS = (READ, QUERY, CREATE, UPDATE, UPSERT, DELETE, BULK, ADMIN)
OTHER = "other"
TEMPLATE_MAX = 256
SEGMENTS_MAX = 16
SUBREQUESTS_MAX = 200  # sub-requests of one composite / $batch call read
BODY_PARSE_MAX = 1 << 20  # request bodies parsed for the objects they name
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class ApiCall:
    object: str
    operation: str  # one of OPERATIONS
    template: str
    write: bool  # changes data in the CRM (to_crm), else reads it (from_crm)
    records: int | None = None  # records this call writes, when its body showed them
    # the id of an earlier call's result this call continues (a Bulk 2.0 job, a query
    # locator) when the path alone does not name the object; held in memory only
    ref: str | None = None

    @property
    def direction(self) -> str:
        return "to_crm" if self.write else "from_crm"


# -- templates ---------------------------------------------------------------------

_UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
                   r"[0-9a-fA-F]{12}$")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")
_SF_ID = re.compile(r"^[a-zA-Z0-9]{15}(?:[a-zA-Z0-9]{3})?$")
_HEX = re.compile(r"^[0-9a-fA-F]{12,}$")
_NAME = re.compile(r"^[A-Za-z$][A-Za-z0-9_.$-]{0,79}$")
_VERSION = re.compile(r"^v\d{1,2}(?:\.\d{1,2})?$")
_PARAM = re.compile(r"^[A-Za-z0-9_$.\[\]-]{1,40}$")
_DYN_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]{0,127})\((.*)\)$")


_WORD = re.compile(r"^[A-Za-z_$][A-Za-z_.$-]{0,47}$")  # no digit: always a name
_THREE_DIGITS = re.compile(r"(?:\D*\d){3}")
_FOUR_DIGITS = re.compile(r"(?:\D*\d){4}")


def is_sf_id(seg: str) -> bool:
    """A 15- or 18-character Salesforce record id (letters and at least 3 digits)."""
    return bool(_SF_ID.match(seg)) and _THREE_DIGITS.match(seg) is not None


def placeholder(seg: str) -> str | None:
    """The placeholder of a path segment that is a value, or None for a name."""
    if not seg or _WORD.match(seg):
        return None
    if _NUMBER.match(seg):
        return "{n}"
    if _UUID.match(seg):
        return "{uuid}"
    if is_sf_id(seg):
        return "{id}"
    if _HEX.match(seg) and any(c.isdigit() for c in seg):
        return "{hex}"
    if _VERSION.match(seg):
        return None
    if not _NAME.match(seg) or len(seg) > 48 or _FOUR_DIGITS.match(seg):
        return "{value}"
    return None


@functools.lru_cache(maxsize=4096)  # paths repeat: most segments are seen before
def template_segment(seg: str) -> str:
    if (m := _DYN_KEY.match(seg)) is not None:  # Dynamics entityset(key)
        return f"{m.group(1)}({{key}})" if m.group(2) else seg
    if seg.endswith(".json") and len(seg) > 5:  # Zendesk: /tickets/123.json
        return (placeholder(seg[:-5]) or seg[:-5]) + ".json"
    return placeholder(seg) or seg


def path_template(segments: list[str], query: dict[str, list[str]],
                  fixed: dict[int, str] | None = None) -> str:
    """/a/{id}/b?name1&name2 from the decoded segments (fixed: placeholders by index)."""
    parts = [(fixed or {}).get(i) or template_segment(s)
             for i, s in enumerate(segments[:SEGMENTS_MAX])]
    if len(segments) > SEGMENTS_MAX:
        parts.append("…")
    out = "/" + "/".join(parts)
    names = sorted(k for k in query if _PARAM.match(k))[:8]
    if names:
        out += "?" + "&".join(names)
    return out[:TEMPLATE_MAX]


# -- the request-target ------------------------------------------------------------

@dataclass(slots=True)
class Target:
    segments: list[str]  # decoded path segments, empty ones dropped
    query: dict[str, list[str]]
    method: str
    body: bytes
    _doc: Any = None
    _parsed: bool = False

    def doc(self) -> Any:
        """The body as JSON (parsed once), or None."""
        if not self._parsed:
            self._parsed = True
            self._doc = parse_json(self.body)
        return self._doc

    def param(self, name: str) -> str | None:
        for k, v in self.query.items():
            if k.lower() == name.lower() and v:
                return v[0]
        return None

    def template(self, fixed: dict[int, str] | None = None) -> str:
        return path_template(self.segments, self.query, fixed)

    @property
    def write(self) -> bool:
        return self.method not in _READ_METHODS


def parse_json(body: bytes) -> Any:
    if not body or len(body) > BODY_PARSE_MAX or body[:64].lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def split_target(method: str, target: str, body: bytes = b"") -> Target:
    if "://" in target[:16]:  # absolute-form
        rest = target.split("://", 1)[1]
        target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    path, _, qs = target.partition("?")
    path = path.split("#", 1)[0]
    segments = [unquote(s) for s in path.split("/") if s][: SEGMENTS_MAX + 1]
    try:
        query = parse_qs(qs[:8192], keep_blank_values=True, max_num_fields=64) if qs else {}
    except ValueError:
        query = {}
    return Target(segments, query, method.upper(), body)


def _by_method(t: Target, item: bool) -> str:
    """The operation a plain REST verb performs on a collection or on one item."""
    m = t.method
    if m in _READ_METHODS:
        return READ if item else QUERY
    if m == "POST":
        return CREATE
    if m in ("PUT", "PATCH", "MERGE"):
        return UPDATE
    if m == "DELETE":
        return DELETE
    return READ if not t.write else UPDATE


def _other(t: Target) -> ApiCall:
    return ApiCall(OTHER, _by_method(t, True), t.template(), t.write)


def _admin_or(call: ApiCall, admin: frozenset[str], name: str | None = None) -> ApiCall:
    """The call as `admin` when its object is administrative."""
    if (name or call.object).lower() in admin:
        return ApiCall(call.object, ADMIN, call.template, call.write, call.records)
    return call


# -- SOQL / COQL -------------------------------------------------------------------

_SOQL_TOKEN = re.compile(r"'(?:[^'\\]|\\.)*'|\(|\)|[A-Za-z_][A-Za-z0-9_.]*|[^\s()A-Za-z_']+")


def soql_from(query: str) -> str | None:
    """The object of the outermost FROM of a SOQL/COQL query (subqueries, string
    literals and case handled), or None."""
    depth = 0
    take = False
    for i, m in enumerate(_SOQL_TOKEN.finditer(query[:20000])):
        if i > 4000:
            break
        tok = m.group()
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth = max(0, depth - 1)
        elif take:
            return tok if _NAME.match(tok) else None
        elif depth == 0 and tok.lower() == "from":
            take = True
    return None


# -- Salesforce --------------------------------------------------------------------

SF_ADMIN = frozenset(s.lower() for s in (
    "User", "Profile", "PermissionSet", "PermissionSetAssignment", "PermissionSetGroup",
    "PermissionSetGroupComponent", "PermissionSetLicenseAssign", "ConnectedApplication",
    "UserRole", "ObjectPermissions", "FieldPermissions", "SetupEntityAccess",
    "OauthToken", "AuthProvider", "NamedCredential", "Metadata"))
# canonical spellings: sobject names are case-insensitive in the API
_SF_CANON = {s.lower(): s for s in (
    "Account", "Contact", "Lead", "Opportunity", "OpportunityLineItem", "Case",
    "CaseComment", "Task", "Event", "Campaign", "CampaignMember", "Contract", "Order",
    "OrderItem", "Product2", "Pricebook2", "PricebookEntry", "Quote", "Asset", "Note",
    "Attachment", "ContentVersion", "ContentDocument", "ContentDocumentLink",
    "EmailMessage", "FeedItem", "Individual", "Group", "GroupMember",
    "ApexClass", "ApexTrigger", "AsyncApexJob", *(
        "User", "Profile", "PermissionSet", "PermissionSetAssignment",
        "PermissionSetGroup", "PermissionSetGroupComponent", "PermissionSetLicenseAssign",
        "ConnectedApplication", "UserRole", "ObjectPermissions", "FieldPermissions",
        "SetupEntityAccess", "OauthToken", "AuthProvider", "NamedCredential"))}
# the 3-character key prefix of a record id names its object
_SF_PREFIX = {"001": "Account", "003": "Contact", "00Q": "Lead", "006": "Opportunity",
              "500": "Case", "00T": "Task", "00U": "Event", "005": "User", "00e": "Profile",
              "0PS": "PermissionSet", "0Pa": "PermissionSetAssignment", "00E": "UserRole",
              "0H4": "ConnectedApplication", "701": "Campaign", "800": "Contract",
              "801": "Order", "01t": "Product2", "02i": "Asset", "068": "ContentVersion"}
_SF_METADATA_WRITE = re.compile(
    rb"<(?:\w+:)?(deploy|createMetadata|updateMetadata|upsertMetadata|deleteMetadata|"
    rb"renameMetadata|deployRecentValidation|cancelDeploy)\b")
_SF_BULK1_OBJECT = re.compile(rb"<object>\s*([A-Za-z][A-Za-z0-9_]{0,79})\s*</object>")
_SF_BULK1_OP = re.compile(rb"<operation>\s*(\w+)\s*</operation>")


def sf_object(name: str) -> str:
    return _SF_CANON.get(name.lower(), name) if _NAME.match(name) else OTHER


def _sf_object_of_id(value: str) -> str | None:
    return _SF_PREFIX.get(value[:3]) if is_sf_id(value) else None


def _sf_records_of(doc: Any, path_object: str | None) -> list[tuple[str, int]]:
    """(object, records) of an sObject collection / tree body, by attributes.type."""
    counts: dict[str, int] = {}
    records = doc.get("records") if isinstance(doc, dict) else doc
    if not isinstance(records, list):
        return []
    stack: list[tuple[Any, str | None]] = [(r, path_object) for r in records[:10000]]
    seen = 0
    while stack and seen < 20000:
        rec, default = stack.pop()
        seen += 1
        if not isinstance(rec, dict):
            continue
        attrs = rec.get("attributes")
        kind = attrs.get("type") if isinstance(attrs, dict) else None
        obj = sf_object(kind) if isinstance(kind, str) else (default or OTHER)
        counts[obj] = counts.get(obj, 0) + 1
        for value in rec.values():  # composite/tree: child records nested by relationship
            if isinstance(value, dict) and isinstance(value.get("records"), list):
                stack.extend((child, None) for child in value["records"][:10000])
    return sorted(counts.items())


def _salesforce(t: Target) -> list[ApiCall]:
    s = t.segments
    low = [x.lower() for x in s]
    if low[:2] == ["services", "data"] and len(s) >= 3:
        return _sf_data(t, 3)
    if low[:2] == ["services", "async"]:  # Bulk 1.0
        return [_sf_bulk1(t)]
    if low[:3] == ["services", "soap", "m"]:  # Metadata API (SOAP)
        write = bool(_SF_METADATA_WRITE.search(t.body[:65536]))
        return [ApiCall("Metadata", ADMIN, t.template(), write)]
    if low[:3] in (["services", "soap", "u"], ["services", "soap", "c"]):
        return [_sf_soap(t)]  # the partner / enterprise SOAP API
    if low[:2] == ["services", "oauth2"]:
        name = low[2] if len(low) > 2 else "oauth"
        if name in ("token", "authorize", "userinfo", "revoke", "introspect"):
            return [ApiCall("oauth_token", _by_method(t, True), t.template(), t.write)]
        return [ApiCall("oauth", ADMIN, t.template(), t.write)]
    return [_other(t)]


_SF_SOAP_CALL = re.compile(
    rb"<(?:\w+:)?(query|queryAll|queryMore|create|update|upsert|delete|undelete|retrieve|"
    rb"search|login|describeSObjects?|describeGlobal|getUserInfo|merge|convertLead|"
    rb"setPassword|resetPassword)\b")
_SF_SOAP_QUERY = re.compile(rb"<(?:\w+:)?queryString>([^<]{1,20000})<")
_SF_SOAP_TYPE = re.compile(
    rb'(?:xsi:type="(?:\w+:)?([A-Za-z][A-Za-z0-9_]{0,79})"|<(?:\w+:)?(?:type|sObjectType)>'
    rb"\s*([A-Za-z][A-Za-z0-9_]{0,79})\s*<)")
_SF_SOAP_OPS = {"create": CREATE, "update": UPDATE, "upsert": UPSERT, "delete": DELETE,
                "undelete": UPDATE, "merge": UPDATE, "convertlead": UPDATE, "retrieve": READ,
                "search": QUERY, "describesobject": READ, "describesobjects": READ,
                "describeglobal": READ, "getuserinfo": READ}
_SF_GRAPHQL = re.compile(rb"uiapi\s*\{\s*query\s*\{\s*([A-Za-z][A-Za-z0-9_]{0,79})")


def _sf_soap(t: Target) -> ApiCall:
    """The partner/enterprise SOAP API: the call and its object from the envelope."""
    head = t.body[:65536]
    m = _SF_SOAP_CALL.search(head)
    name = m.group(1).decode().lower() if m else ""
    template = t.template()
    if name in ("query", "queryall"):
        q = _SF_SOAP_QUERY.search(head)
        obj = sf_object(soql_from(unescape(q.group(1).decode("utf-8", "replace"))) or OTHER) \
            if q else OTHER
        return _admin_or(ApiCall(obj, QUERY, template, False), SF_ADMIN)
    if name == "querymore":
        return ApiCall(OTHER, QUERY, template, False)
    if name == "login":
        return ApiCall("oauth_token", CREATE, template, True)
    if name in ("setpassword", "resetpassword"):
        return ApiCall("User", ADMIN, template, True)
    typed = _SF_SOAP_TYPE.search(head)
    obj = sf_object((typed.group(1) or typed.group(2)).decode()) if typed else OTHER
    op = _SF_SOAP_OPS.get(name, READ)
    return _admin_or(ApiCall(obj, op, template, op not in (READ, QUERY)), SF_ADMIN)


def _sf_ui_api(t: Target, i: int) -> ApiCall:
    """User Interface API: records by id (object from the id's key prefix), list views
    and object info by object name."""
    rest = t.segments[i:]
    low = [x.lower() for x in rest]
    template = t.template()
    if low[:1] == ["records"]:
        if len(rest) >= 2:
            obj = _sf_object_of_id(rest[1]) or OTHER
            return _admin_or(ApiCall(obj, _by_method(t, True), template, t.write), SF_ADMIN)
        doc = t.doc()
        api_name = doc.get("apiName") if isinstance(doc, dict) else None
        obj = sf_object(api_name) if isinstance(api_name, str) else OTHER
        return _admin_or(ApiCall(obj, CREATE, template, True), SF_ADMIN)
    if low[:1] in (["list-records"], ["list-ui"], ["object-info"], ["list-info"]) \
            and len(rest) >= 2:
        op = READ if low[0] == "object-info" else QUERY
        return _admin_or(ApiCall(sf_object(rest[1]), op, template, False), SF_ADMIN)
    if low[:1] in (["record-ui"], ["related-list-records"]) and len(rest) >= 2:
        obj = _sf_object_of_id(rest[1].split(",")[0]) or OTHER
        return ApiCall(obj, READ if low[0] == "record-ui" else QUERY, template, False)
    return _other(t)


def _sf_bulk1(t: Target) -> ApiCall:
    obj = OTHER
    if (m := _SF_BULK1_OBJECT.search(t.body[:8192])) is not None:
        obj = sf_object(m.group(1).decode())
    else:
        doc = t.doc()
        if isinstance(doc, dict) and isinstance(doc.get("object"), str):
            obj = sf_object(doc["object"])
    op = _SF_BULK1_OP.search(t.body[:8192])
    write = t.write and not (op is not None and op.group(1).lower() in (b"query", b"queryall"))
    return _admin_or(ApiCall(obj, BULK, t.template(), write), SF_ADMIN)


def _sf_data(t: Target, i: int) -> list[ApiCall]:
    """/services/data/vNN.N/<rest>, the rest starting at segment i."""
    low = [x.lower() for x in t.segments]
    rest = low[i:]
    head = rest[0] if rest else ""
    if head == "tooling":
        return [_sf_tooling(t, i + 1)]
    if head == "sobjects":
        return [_sf_sobjects(t, i + 1)]
    if head in ("query", "queryall"):
        q = t.param("q")
        if q is not None:
            obj = sf_object(soql_from(q) or OTHER)
            return [_admin_or(ApiCall(obj, QUERY, t.template(), False), SF_ADMIN)]
        # the next page of a query: /query/<locator>
        locator = t.segments[i + 1].split("-", 1)[0] if len(t.segments) > i + 1 else None
        return [ApiCall(OTHER, QUERY, t.template({i + 1: "{locator}"}), False, ref=locator)]
    if head in ("search", "parameterizedsearch"):
        return [ApiCall("search", QUERY, t.template(), False)]
    if head == "composite":
        return _sf_composite(t, i + 1)
    if head == "jobs" and len(rest) >= 2 and rest[1] in ("ingest", "query"):
        return [_sf_bulk2(t, i + 1, rest[1])]
    if head == "ui-api":
        return [_sf_ui_api(t, i + 1)]
    if head == "graphql":
        m = _SF_GRAPHQL.search(t.body[:65536])
        obj = sf_object(m.group(1).decode()) if m else OTHER
        return [_admin_or(ApiCall(obj, QUERY, t.template(), False), SF_ADMIN)]
    if head == "metadata" or head == "deployrequest":
        return [ApiCall("Metadata", ADMIN, t.template(), t.write)]
    if head == "actions" or head == "process":
        return [ApiCall(OTHER, _by_method(t, True), t.template(), t.write)]
    return [ApiCall(OTHER, _by_method(t, True), t.template(), t.write)]


def _sf_sobjects(t: Target, i: int) -> ApiCall:
    """sobjects[/{Object}[/{id} | /{extIdField}/{value} | /describe | /deleted ...]]."""
    s = t.segments
    rest = s[i:]
    if not rest:
        return ApiCall("sobjects", READ, t.template(), False)
    obj = sf_object(rest[0])
    fixed: dict[int, str] = {}
    if len(rest) == 1:
        op = CREATE if t.method == "POST" else READ
    elif rest[1].lower() in ("describe", "listviews", "quickactions", "layouts"):
        op = READ
    elif rest[1].lower() in ("deleted", "updated"):
        op = QUERY
    elif len(rest) >= 3 and not is_sf_id(rest[1]):
        # /{Object}/{extIdField}/{value}: upsert by external id
        fixed = {i + 2: "{value}"}
        op = UPSERT if t.method in ("PATCH", "POST", "PUT") else _by_method(t, True)
    else:
        fixed = {i + 1: "{id}"} if is_sf_id(rest[1]) else {}
        op = _by_method(t, True)
        if len(rest) >= 3:  # a relationship or blob field of the record
            op = READ if not t.write else op
    return _admin_or(ApiCall(obj, op, t.template(fixed), t.write), SF_ADMIN)


def _sf_tooling(t: Target, i: int) -> ApiCall:
    """Tooling API: reads are reads of its objects, anything that changes code or
    setup (sObject writes, executeAnonymous, deploys) is admin."""
    rest = t.segments[i:]
    low = [x.lower() for x in rest]
    if low[:1] in (["query"], ["search"]):
        q = t.param("q")
        obj = sf_object(soql_from(q) or OTHER) if q else OTHER
        return _admin_or(ApiCall(obj, QUERY, t.template(), False), SF_ADMIN)
    if low[:1] == ["executeanonymous"]:
        return ApiCall("ApexAnonymous", ADMIN, t.template(), True)
    call = _sf_sobjects(t, i + 1) if low[:1] == ["sobjects"] else _other(t)
    if t.write:
        return ApiCall(call.object, ADMIN, call.template, True)
    return call


def _sf_bulk2(t: Target, i: int, kind: str) -> ApiCall:
    """jobs/ingest and jobs/query (Bulk API 2.0): the object from the job's body."""
    doc = t.doc()
    obj = OTHER
    write = kind == "ingest" and t.write
    if isinstance(doc, dict):
        if isinstance(doc.get("object"), str):
            obj = sf_object(doc["object"])
        elif isinstance(doc.get("query"), str):
            obj = sf_object(soql_from(doc["query"]) or OTHER)
    job = t.segments[i + 1] if len(t.segments) > i + 1 else None
    fixed = {i + 1: "{job}"} if job else {}
    tail = [x.lower() for x in t.segments[i + 2 :]]
    # records move in batches uploaded and results downloaded; the job's own calls
    # (create, state, status) move none
    data = tail[:1] in (["batches"], ["results"], ["successfulresults"], ["failedresults"],
                        ["unprocessedrecords"])
    write = write and tail[:1] != ["successfulresults"] and tail[:1] != ["failedresults"] \
        and tail[:1] != ["unprocessedrecords"]
    return _admin_or(ApiCall(obj, BULK, t.template(fixed), write, None if data else 0, ref=job),
                     SF_ADMIN)


def _sf_composite(t: Target, i: int) -> list[ApiCall]:
    rest = t.segments[i:]
    low = [x.lower() for x in rest]
    doc = t.doc()
    kind = low[0] if low else ""
    template = t.template()
    if kind == "sobjects":  # sObject collections
        if len(rest) >= 2:
            obj = sf_object(rest[1])
            if len(rest) >= 3:  # /{Object}/{extIdField}: upsert
                op = UPSERT
            else:
                op = READ if not t.write else (CREATE if t.method == "POST" else
                                               _by_method(t, False))
            counted = dict(_sf_records_of(doc, obj)) if t.write else {}
            return [_admin_or(ApiCall(obj, op, template, t.write, counted.get(obj)), SF_ADMIN)]
        if t.method == "DELETE":
            ids = [x.strip() for x in (t.param("ids") or "").split(",") if x.strip()]
            by_object: dict[str, int] = {}
            for value in ids[:200]:
                o = _sf_object_of_id(value) or OTHER
                by_object[o] = by_object.get(o, 0) + 1
            return [_admin_or(ApiCall(o, DELETE, template, True, n), SF_ADMIN)
                    for o, n in sorted(by_object.items())] or [
                ApiCall(OTHER, DELETE, template, True)]
        op = CREATE if t.method == "POST" else UPDATE
        calls = [_admin_or(ApiCall(o, op, template, True, n), SF_ADMIN)
                 for o, n in _sf_records_of(doc, None)]
        return calls or [ApiCall(OTHER, op, template, True)]
    if kind == "tree" and len(rest) >= 2:
        calls = [_admin_or(ApiCall(o, CREATE, template, True, n), SF_ADMIN)
                 for o, n in _sf_records_of(doc, sf_object(rest[1]))]
        return calls or [ApiCall(sf_object(rest[1]), CREATE, template, True)]
    subs: list[tuple[str, str, Any]] = []
    if kind == "batch" and isinstance(doc, dict):
        subs = [(r.get("method", "GET"), r.get("url", ""), r.get("richInput"))
                for r in _dicts(doc.get("batchRequests"))]
    elif kind == "graph" and isinstance(doc, dict):
        subs = [(r.get("method", "GET"), r.get("url", ""), r.get("body"))
                for g in _dicts(doc.get("graphs")) for r in _dicts(g.get("compositeRequest"))]
    elif kind == "" and isinstance(doc, dict):
        subs = [(r.get("method", "GET"), r.get("url", ""), r.get("body"))
                for r in _dicts(doc.get("compositeRequest"))]
    calls = []
    for method, url, body in subs[:SUBREQUESTS_MAX]:
        if not isinstance(method, str) or not isinstance(url, str):
            continue
        if not url.startswith("/"):  # composite/batch: "v59.0/sobjects/..."
            url = "/services/data/" + url
        raw = json.dumps(body).encode() if body is not None else b""
        for sub in _salesforce(split_target(method, url, raw)):
            calls.append(ApiCall(sub.object, sub.operation, template, sub.write,
                                 sub.records if sub.records is not None else
                                 (1 if sub.write else None)))
    return calls or [ApiCall(OTHER, _by_method(t, True), template, t.write)]


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, list):
        for v in value[:SUBREQUESTS_MAX]:
            if isinstance(v, dict):
                yield v


# -- HubSpot -----------------------------------------------------------------------

_HS_BATCH = {"read": READ, "create": CREATE, "update": UPDATE, "upsert": UPSERT,
             "archive": DELETE, "delete": DELETE}
_HS_LEGACY = frozenset({"contacts", "companies", "deals", "engagements", "owners", "tickets"})
HS_ADMIN = frozenset({"users", "roles", "teams", "settings", "oauth", "account-info",
                      "account_info"})


def _hubspot(t: Target) -> list[ApiCall]:
    s, low = t.segments, [x.lower() for x in t.segments]
    if len(s) >= 3 and low[0] == "crm" and low[2] == "objects" and len(s) >= 4:
        obj = low[3]
        rest = low[4:]
        if not rest:
            op = _by_method(t, False)
        elif rest[0] == "batch" and len(rest) >= 2:
            op = _HS_BATCH.get(rest[1], _by_method(t, False))
            return [ApiCall(obj, op, t.template(), op != READ)]
        elif rest[0] == "search":
            return [ApiCall(obj, QUERY, t.template(), False)]
        elif rest[0] == "merge":
            op = UPDATE
        elif rest[0] == "gdpr-delete":
            op = DELETE
        else:
            op = _by_method(t, True)
            if len(rest) >= 2 and rest[1] == "associations":
                obj = "associations"
        return [ApiCall(obj, op, t.template(), t.write)]
    if len(s) >= 3 and low[0] == "crm" and low[2] == "associations":
        op = _HS_BATCH.get(low[-1], _by_method(t, False)) if "batch" in low else \
            _by_method(t, False)
        return [ApiCall("associations", op, t.template(), op not in (READ, QUERY))]
    if len(s) >= 3 and low[0] == "crm" and low[2] in ("imports", "exports"):
        return [ApiCall(low[2], BULK, t.template(), low[2] == "imports" and t.write)]
    if low[:1] == ["settings"]:
        obj = low[2] if len(low) >= 3 else "settings"
        return [ApiCall(obj, ADMIN, t.template(), t.write)]
    if low[:1] == ["oauth"]:
        if low[-1:] == ["token"]:  # the routine token grant / refresh
            return [ApiCall("oauth_token", CREATE, t.template(), t.write)]
        return [ApiCall("oauth", ADMIN, t.template(t_token_fixed(t, 3)), t.write)]
    if low[:1] == ["account-info"]:
        return [ApiCall("account-info", ADMIN, t.template(), t.write)]
    if len(s) >= 3 and low[0] == "crm":  # /crm/v3/owners, /crm/v3/properties/...
        call = ApiCall(low[2], _by_method(t, len(s) > 3), t.template(), t.write)
        return [_admin_or(call, HS_ADMIN)]
    if len(s) >= 2 and low[0] in _HS_LEGACY and _VERSION.match(low[1]):  # /contacts/v1/...
        return [ApiCall(low[0], _by_method(t, len(s) > 3), t.template(), t.write)]
    return [_other(t)]


def t_token_fixed(t: Target, index: int) -> dict[int, str]:
    """/oauth/v1/access-tokens/<token>: the token is a value whatever it looks like."""
    return {index: "{token}"} if len(t.segments) > index else {}


# -- Dynamics 365 (Dataverse Web API) ----------------------------------------------

DYN_ADMIN = frozenset({"systemusers", "roles", "teams", "businessunits", "fieldsecurityprofiles",
                       "systemuserroles_association", "teamroles_association",
                       "teammembership_association", "applicationusers"})
_DYN_MULTIPLE = re.compile(r"(?:Microsoft\.Dynamics\.CRM\.)?(Create|Update|Upsert|Delete)"
                           r"Multiple$", re.I)
_DYN_BATCH_LINE = re.compile(rb"^(GET|POST|PATCH|PUT|DELETE) (\S{1,2048}) HTTP/1\.[01]\r?$",
                             re.M)


def _dynamics(t: Target) -> list[ApiCall]:
    s, low = t.segments, [x.lower() for x in t.segments]
    if not (low[:2] == ["api", "data"] and len(s) >= 3):
        return [_other(t)]
    rest = s[3:]
    if not rest:
        return [ApiCall("service", READ, t.template(), False)]
    if rest[0] == "$batch":
        return _dyn_batch(t)
    first = rest[0]
    m = _DYN_KEY.match(first)
    entity = (m.group(1) if m else first).lower()
    keyed = m is not None and bool(m.group(2))
    if entity in ("$metadata", "entitydefinitions", "globaloptionsetdefinitions",
                  "relationshipdefinitions"):
        return [ApiCall(entity, ADMIN if t.write else READ, t.template(), t.write)]
    if len(rest) >= 2 and _DYN_MULTIPLE.match(rest[-1]) is not None:
        doc = t.doc()
        targets = doc.get("Targets") if isinstance(doc, dict) else None
        n = len(targets) if isinstance(targets, list) else None
        return [_admin_or(ApiCall(entity, BULK, t.template(), True, n), DYN_ADMIN)]
    if keyed:
        key = m.group(2) if m else ""
        if t.method == "PATCH" and "=" in key:  # an alternate key: upsert
            op = UPSERT
        else:
            op = _by_method(t, True)
        if len(rest) >= 2 and not t.write:
            op = READ
    else:
        op = _by_method(t, False)
    call = ApiCall(entity, op, t.template(), t.write)
    if len(rest) >= 2 and (rest[1].lower() in DYN_ADMIN):  # systemusers(id)/roles ref
        return [ApiCall(entity, ADMIN, call.template, call.write)]
    return [_admin_or(call, DYN_ADMIN)]


def _dyn_batch(t: Target) -> list[ApiCall]:
    calls = []
    for m in list(_DYN_BATCH_LINE.finditer(t.body[:BODY_PARSE_MAX]))[:SUBREQUESTS_MAX]:
        url = m.group(2).decode("latin-1")
        sub = split_target(m.group(1).decode(), url)
        if "api" not in [x.lower() for x in sub.segments[:1]]:  # relative to the service root
            sub = split_target(m.group(1).decode(), "/api/data/v9.2/" + url.lstrip("/"))
        for c in _dynamics(sub):
            calls.append(ApiCall(c.object, c.operation, t.template(), c.write,
                                 1 if c.write else None))
    return calls or [ApiCall("$batch", BULK, t.template(), True)]


# -- Zendesk -----------------------------------------------------------------------

_ZD_MANY = {"create_many": CREATE, "update_many": UPDATE, "destroy_many": DELETE,
            "create_or_update": UPSERT, "create_or_update_many": UPSERT}
ZD_ADMIN = frozenset({"custom_roles", "oauth", "account", "roles"})
_ZD_ROLE = re.compile(rb'"(?:role|role_type|custom_role_id)"\s*:')
_ZD_SEARCH_TYPE = re.compile(r"\btype:(\w+)")


def _zendesk(t: Target) -> list[ApiCall]:
    s, low = t.segments, [x.lower() for x in t.segments]
    if low[:2] != ["api", "v2"] or len(s) < 3:
        return [_other(t)]
    rest = [x.removesuffix(".json") for x in low[2:]]
    head = rest[0]
    if head == "incremental" and len(rest) >= 2:
        return [ApiCall(rest[1], BULK, t.template(), False)]
    if head == "search" or head == "search/count":
        found = _ZD_SEARCH_TYPE.search(t.param("query") or "")
        obj = (found.group(1).lower() + "s") if found else "search"
        return [ApiCall(obj, QUERY, t.template(), False)]
    if head in ZD_ADMIN:
        return [ApiCall(head, ADMIN, t.template(), t.write)]
    obj = head
    tail = rest[1:]
    if tail and tail[-1] in _ZD_MANY:
        op = _ZD_MANY[tail[-1]]
    elif tail and tail[0] == "search":
        op = QUERY
    elif tail and tail[0] == "show_many":
        op = READ
    else:
        op = _by_method(t, bool(tail))
    call = ApiCall(obj, op, t.template(), t.write)
    if obj == "users" and t.write and _ZD_ROLE.search(t.body[:65536]):
        return [ApiCall(obj, ADMIN, call.template, True)]  # a user's role changes
    return [call]


# -- Zoho CRM ----------------------------------------------------------------------

ZOHO_ADMIN = frozenset({"users", "roles", "profiles", "org"})


def _zoho(t: Target) -> list[ApiCall]:
    s, low = t.segments, [x.lower() for x in t.segments]
    if low[:1] != ["crm"] or len(s) < 3:
        return [_other(t)]
    if low[1] == "bulk":  # /crm/bulk/v2/read | write
        doc = t.doc()
        obj = OTHER
        if isinstance(doc, dict):
            q = doc.get("query")
            module = q.get("module") if isinstance(q, dict) else None
            if module is None:
                res = doc.get("resource")
                if isinstance(res, list) and res and isinstance(res[0], dict):
                    module = res[0].get("module")
            if isinstance(module, dict):
                module = module.get("api_name")
            if isinstance(module, str) and _NAME.match(module):
                obj = module
        kind = low[3] if len(low) > 3 else ""
        return [ApiCall(obj, BULK, t.template(), kind == "write" and t.write)]
    rest = s[2:]
    head = rest[0]
    lhead = head.lower()
    if lhead == "coql":
        doc = t.doc()
        q = doc.get("select_query") if isinstance(doc, dict) else None
        obj = (soql_from(q) or OTHER) if isinstance(q, str) else OTHER
        return [_admin_or(ApiCall(obj, QUERY, t.template(), False), ZOHO_ADMIN)]
    if lhead == "settings":
        sub = rest[1].lower() if len(rest) > 1 else "settings"
        if sub in ZOHO_ADMIN or t.write:
            return [ApiCall(sub, ADMIN, t.template(), t.write)]
        return [ApiCall(f"settings.{sub}", READ, t.template(), False)]
    tail = [x.lower() for x in rest[1:]]
    if tail[:1] == ["search"]:
        op = QUERY
    elif tail[:1] == ["upsert"]:
        op = UPSERT
    elif tail[:1] == ["bulk"]:
        op = BULK
    elif tail[:1] == ["deleted"]:
        op = QUERY
    else:
        op = _by_method(t, bool(tail))
    return [_admin_or(ApiCall(head, op, t.template(), t.write and op != QUERY), ZOHO_ADMIN)]


# -- Pipedrive ---------------------------------------------------------------------

PD_ADMIN = frozenset({"users", "permissionsets", "roles", "userconnections", "usersettings",
                      "oauth"})


def _pipedrive(t: Target) -> list[ApiCall]:
    s = t.segments
    low = [x.lower() for x in s]
    if low[:1] == ["v1"]:
        rest = s[1:]
    elif low[:2] == ["api", "v2"] or low[:2] == ["api", "v1"]:
        rest = s[2:]
    else:
        return [_other(t)]
    if not rest:
        return [_other(t)]
    obj = rest[0]
    tail = [x.lower() for x in rest[1:]]
    if obj.lower() == "itemsearch" or tail[:1] == ["search"]:
        return [_admin_or(ApiCall(obj if tail else "search", QUERY, t.template(), False),
                          PD_ADMIN)]
    op = _by_method(t, bool(tail))
    records = None
    if op == DELETE and not tail and (ids := t.param("ids")):  # bulk delete ?ids=1,2,3
        records = len([x for x in ids.split(",") if x.strip()][:10000])
    return [_admin_or(ApiCall(obj, op, t.template(), t.write, records), PD_ADMIN)]


# -- entry -------------------------------------------------------------------------

_VENDORS: dict[str, Callable[[Target], list[ApiCall]]] = {
    "salesforce": _salesforce, "hubspot": _hubspot, "dynamics": _dynamics,
    "dynamics365": _dynamics, "zendesk": _zendesk, "zoho": _zoho, "pipedrive": _pipedrive,
}


def classify(vendor: str, method: str, target: str, body: bytes = b"",
             errors: Counter[str] | None = None) -> list[ApiCall]:
    """The calls a request makes: one, or one per object of a composite/batch call.
    `errors` counts the requests a grammar gave up on (kept as `other`), by vendor."""
    t = split_target(method, target, body)
    grammar = _VENDORS.get(vendor)
    if grammar is None:
        return [_other(t)]
    try:
        calls = grammar(t)
    except (ValueError, TypeError, AttributeError, RecursionError, IndexError, KeyError):
        calls = []  # a body shaped against the grammar: kept as `other`, counted
        if errors is not None:
            errors[f"grammar_gave_up_{vendor}"] += 1
    return calls or [_other(t)]
