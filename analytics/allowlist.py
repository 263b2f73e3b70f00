"""Whether a tenant's allow list covers a CRM destination.

Entries are "vendor:instance" or "vendor:*" (any instance: vendors whose hosts
are all shared, e.g. HubSpot). A destination whose instance is not named (a
shared sign-in or API host, an address behind several instances) is covered by
any entry of its vendor: it is evidence of the vendor, not of another instance.

A plaintext request names some instances by an id (a Salesforce org id, a
HubSpot portal id, a Zoho org id) where the allow list may name them by host
(My Domain "acme"); an id is compared only with the vendor's id entries, and a
list without any counts it like an unnamed instance.
"""

from __future__ import annotations

import re
from collections.abc import Collection

# the series key of an instance the attribution could not name
UNKNOWN_INSTANCE = "unknown"

_ID_FORMS = {
    "salesforce": re.compile(r"00D[0-9A-Za-z]{12}"),
    "hubspot": re.compile(r"[0-9]{1,12}"),
    "zoho": re.compile(r"[0-9]{1,20}"),
}


def _is_id(vendor: str | None, instance: str) -> bool:
    form = _ID_FORMS.get(vendor or "")
    return form is not None and form.fullmatch(instance) is not None


def allows(policy: Collection[str], vendor: str | None, instance: str | None) -> bool:
    if f"{vendor}:*" in policy or (instance is not None and f"{vendor}:{instance}" in policy):
        return True
    prefix = f"{vendor}:"
    entries = [entry[len(prefix):] for entry in policy if entry.startswith(prefix)]
    if not entries:
        return False
    if instance is None or instance == UNKNOWN_INSTANCE:
        return True
    if _is_id(vendor, instance):
        return not any(_is_id(vendor, entry) for entry in entries)
    return False
