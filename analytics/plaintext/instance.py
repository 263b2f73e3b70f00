"""The CRM instance a plaintext request names, for flows to shared vendor hosts.

A shared host (login.salesforce.com, api.hubapi.com, www.zohoapis.eu) names the
vendor only; the request itself often names the customer:

- Salesforce: `instance_url=https://acme.my.salesforce.com` in the path or query
  gives the My Domain name ("acme"); else the org id that opens every session id
  (`00D` + 12 characters, then `!`) in `Authorization: Bearer|OAuth` or a `sid` cookie.
- HubSpot: the portal (hub) id in a path (`/submit/<id>/`, `/portals/<id>`) or a
  `portalId` / `hubId` query parameter.
- Zoho CRM: the `X-CRM-ORG` header (the org id).

The vendor comes from the request's host; the caller checks that it agrees with
the flow's SNI/DNS name before using the instance. Values are only recognised,
never logged: an org id is an identifier, not a secret (the session id is).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_VENDOR_BY_SUFFIX = (
    ("salesforce.com", "salesforce"), ("force.com", "salesforce"),
    ("hubapi.com", "hubspot"), ("hubspot.com", "hubspot"), ("hsforms.com", "hubspot"),
    ("zohoapis.", "zoho"), ("zoho.", "zoho"),
)
_SF_INSTANCE_URL = re.compile(
    r"instance_url=(?:https?(?::|%3a)(?:/|%2f){2})?"
    r"([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)\.(?:sandbox\.)?my\.salesforce\.com",
    re.IGNORECASE,
)
# a session id starts with the 15-character org id, then "!"; an 18-character id
# carries a 3-character checksum suffix that is not part of the 15-character form
_SF_SESSION = re.compile(r"(?:^|[\s=;,])(00D[0-9A-Za-z]{12})(?:[0-9A-Za-z]{3})?!")
_HUBSPOT_PATH = re.compile(
    r"/(?:submit|portals?|hubs?|integrations/v1|forms/v2/forms)/([0-9]{1,12})(?:[/?]|$)"
)
_HUBSPOT_QUERY = re.compile(r"[?&](?:portalId|portal_id|hubId|hub_id)=([0-9]{1,12})(?:&|$)")
_ZOHO_ORG = re.compile(r"^[0-9]{1,20}$")


def _vendor(host: str | None) -> str | None:
    if not host:
        return None
    host = host.lower().rstrip(".")
    for suffix, vendor in _VENDOR_BY_SUFFIX:
        if suffix.endswith("."):
            labels = host.split(".")
            if any(f"{label}." == suffix for label in labels[:-1]):
                return vendor
        elif host == suffix or host.endswith("." + suffix):
            return vendor
    return None


def _first(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k == name), None)


def _salesforce(path: str, headers: Sequence[tuple[str, str]]) -> str | None:
    m = _SF_INSTANCE_URL.search(path)
    if m:
        return m.group(1).lower()
    for name in ("authorization", "cookie"):
        for key, value in headers:
            if key == name and (m := _SF_SESSION.search(value)):
                return m.group(1)
    return None


def _hubspot(path: str) -> str | None:
    m = _HUBSPOT_QUERY.search(path) or _HUBSPOT_PATH.search(path.split("?", 1)[0] + "?")
    return m.group(1) if m else None


def _zoho(headers: Sequence[tuple[str, str]]) -> str | None:
    org = (_first(headers, "x-crm-org") or "").strip()
    return org if _ZOHO_ORG.match(org) else None


def instance_from_request(
    method: str, path: str, headers: Sequence[tuple[str, str]], host: str | None
) -> tuple[str, str] | None:
    """(vendor, instance) the request names, or None. `headers` have lower-case names."""
    del method  # every method may carry the name; kept for the recogniser's signature
    vendor = _vendor(host)
    if vendor == "salesforce":
        instance = _salesforce(path, headers)
    elif vendor == "hubspot":
        instance = _hubspot(path)
    elif vendor == "zoho":
        instance = _zoho(headers)
    else:
        return None
    return (vendor, instance) if instance else None
