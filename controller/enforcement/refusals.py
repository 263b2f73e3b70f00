"""Which addresses a tenant is refused at connect time, from what DNS taught.

An address is refused to an enforcing tenant only when every name the DNS cache
holds for it is a CRM instance outside the tenant's allow list. One allowed
instance, one shared vendor host (sign-in, regional API) or one name that is no
CRM at all behind the same address (a CDN, a shared pod) and the address is not
refused: that connection is judged on its ClientHello in TC egress instead,
where the server name tells the instances apart.

A binding is judged by the first name of its CNAME chain that the catalogue
knows (the name the client asked for, else an alias of it), so a CRM instance
published through an infrastructure alias is still that instance.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from leaktap.analytics.allowlist import allows
from leaktap.controller.attribution.catalogue import CrmCatalogue, CrmMatch
from leaktap.controller.config import TenantConfig


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an address is refused: the (first) unsanctioned instance DNS named for it."""

    vendor: str
    instance: str
    host: str


def _crm_of_chain(catalogue: CrmCatalogue, chain: Sequence[str]) -> CrmMatch | None:
    for name in chain:
        found = catalogue.lookup(name)
        if found is not None:
            return found
    return None


def refused_addresses(
    bindings: Mapping[str, Sequence[Sequence[str]]],
    catalogue: CrmCatalogue,
    tenants: Sequence[TenantConfig],
) -> dict[str, dict[str, Refusal]]:
    """tenant -> {address: Refusal} for the tenants in dry-run or block mode.

    `bindings`: address -> the name chains DNS gave for it (DnsCache.live_bindings)."""
    enforcing = [t for t in tenants if t.enforce != "monitor"]
    out: dict[str, dict[str, Refusal]] = {t.name: {} for t in enforcing}
    if not enforcing:
        return out
    for ip, chains in bindings.items():
        matches = [_crm_of_chain(catalogue, chain) for chain in chains]
        instances = [m for m in matches if m is not None and not m.shared and m.instance]
        if not instances or len(instances) != len(matches):
            continue  # a non-CRM name, a shared host or an unnamed instance shares it
        for tenant in enforcing:
            if any(allows(tenant.allow, m.vendor, m.instance) for m in instances):
                continue
            first = instances[0]
            assert first.instance is not None
            out[tenant.name][ip] = Refusal(first.vendor, first.instance, first.host)
    return out


def crm_addresses(bindings: Mapping[str, Sequence[Sequence[str]]],
                  catalogue: CrmCatalogue) -> set[str]:
    """Addresses DNS named for any CRM host (instance or shared)."""
    return {ip for ip, chains in bindings.items()
            if any(_crm_of_chain(catalogue, chain) is not None for chain in chains)}


def kernel_address(ip: str) -> tuple[int, bytes]:
    """(AF_INET | AF_INET6, 16 address bytes) as the connect programs key them."""
    addr = ipaddress.ip_address(ip)
    family = 2 if addr.version == 4 else 10
    return family, addr.packed.ljust(16, b"\0")


def v4_mapped(ip: str) -> str | None:
    """The ::ffff:a.b.c.d form a dual-stack socket connects to an IPv4 address with."""
    addr = ipaddress.ip_address(ip)
    return f"::ffff:{addr}" if addr.version == 4 else None
