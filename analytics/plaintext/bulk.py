"""Bulk-export and mass-operation API calls of the CRMs, by method and path.

Operation names are `<vendor>:<family>[.<detail>]`; a tenant's allowed list
holds exact names, prefixes ending at a dot boundary (`salesforce:bulk2`
allows `salesforce:bulk2.query`), or fnmatch globs.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from leaktap.analytics.plaintext.http import Request

_SF_BULK1 = re.compile(r"^/services/async/\d+(?:\.\d+)?/job(?:/[A-Za-z0-9]{15,18})?(/batch)?")
_SF_BULK2 = re.compile(r"^/services/data/v\d+(?:\.\d+)?/jobs/(ingest|query)(/[^?]*)?")
_HUBSPOT = re.compile(r"^/crm/v3/exports/export/async(/[^?]*)?")
_DYN_BATCH = re.compile(r"^/api/data/v\d+(?:\.\d+)*/\$batch")
_DYN_MULTI = re.compile(
    r"^/api/data/v\d+(?:\.\d+)*/(?:[^/?]+/)?(?:Microsoft\.Dynamics\.CRM\.)?"
    r"(Create|Update|Upsert|Delete)Multiple\b")
_ZENDESK = re.compile(r"^/api/v2/incremental/([a-z_]+)")
_SF_OPERATION = re.compile(
    rb'(?:<operation>\s*|"operation"\s*:\s*")(query|queryAll|insert|update|upsert|delete|'
    rb"hardDelete)\b")


@dataclass(frozen=True, slots=True)
class BulkCall:
    vendor: str
    operation: str  # vendor:family[.detail]
    action: str  # create | upload | results | status | call


def _sf_operation(body: bytes) -> str | None:
    m = _SF_OPERATION.search(body[:8192])
    return m.group(1).decode().lower() if m else None


def classify(request: Request, body: bytes = b"") -> BulkCall | None:
    """The bulk operation a request performs, or None for an ordinary call."""
    path, method = request.path, request.method
    if m := _SF_BULK2.match(path):
        kind, rest = m.group(1), m.group(2) or ""
        if rest.endswith("/results"):
            action = "results"
        elif rest.endswith("/batches"):
            action = "upload"
        elif method == "POST" and rest.strip("/") == "":
            action = "create"
        else:
            action = "status"
        return BulkCall("salesforce", f"salesforce:bulk2.{kind}", action)
    if m := _SF_BULK1.match(path):
        if m.group(1):
            return BulkCall("salesforce", "salesforce:bulk1.batch", "upload")
        op = _sf_operation(body) if method == "POST" else None
        return BulkCall("salesforce", f"salesforce:bulk1.{op or 'job'}",
                        "create" if op else "status")
    if m := _HUBSPOT.match(path):
        action = "create" if method == "POST" and not m.group(1) else "status"
        return BulkCall("hubspot", "hubspot:export", action)
    if _DYN_BATCH.match(path):
        return BulkCall("dynamics", "dynamics:batch", "call")
    if m := _DYN_MULTI.match(path):
        return BulkCall("dynamics", f"dynamics:{m.group(1).lower()}multiple", "call")
    if m := _ZENDESK.match(path):
        return BulkCall("zendesk", f"zendesk:incremental.{m.group(1)}", "call")
    return None


def allowed(operation: str, patterns: Iterable[str]) -> bool:
    for p in patterns:
        if operation == p or operation.startswith(p + ".") or fnmatch.fnmatchcase(operation, p):
            return True
    return False
