"""Tenant of a flow from the configured match rules.

Rules are tried rule kind by rule kind, strongest evidence first: the cgroup
glob of every tenant (config order), then uids, then source CIDRs, then SNI
patterns. A process in tenant B's cgroup that talks to acme.my.salesforce.com is
B's traffic, even when tenant A's SNI pattern would claim it: attributing it to
A would hide exactly the cross-tenant access leaktap is meant to show.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence

from leaktap.controller.attribution.catalogue import host_pattern_regex, normalize_hostname
from leaktap.controller.config import UNASSIGNED_TENANT, TenantConfig

logger = logging.getLogger(__name__)

_CGROUP_CACHE_MAX = 4096
UNASSIGNED: str = UNASSIGNED_TENANT
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TenantResolver:
    """resolve(cgroup_path, uid, src_ip, sni) -> tenant name or "unassigned"."""

    def __init__(self, tenants: Sequence[TenantConfig]) -> None:
        self._cgroups: list[tuple[re.Pattern[str], str]] = []
        self._uids: dict[int, str] = {}
        self._nets: list[tuple[IpNetwork, str]] = []
        self._sni: list[tuple[re.Pattern[str], str, bool]] = []
        self._by_lower: dict[str, str] = {}
        for t in tenants:
            self._by_lower.setdefault(t.name.lower(), t.name)
            m = t.match
            if m.cgroup is not None:
                self._cgroups.append((re.compile(fnmatch.translate(m.cgroup)), t.name))
            for uid in m.uids:
                self._uids.setdefault(uid, t.name)  # first tenant in config order wins
            for cidr in m.cidrs:
                self._nets.append((ipaddress.ip_network(cidr, strict=False), t.name))
            if m.sni is not None:
                captures = "{tenant}" in m.sni
                rx = host_pattern_regex(m.sni, captures=("tenant",))
                self._sni.append((re.compile(rx, re.IGNORECASE), t.name, captures))
        self._cgroup_cache: OrderedDict[str, str | None] = OrderedDict()

    def resolve(
        self,
        cgroup_path: str | None = None,
        uid: int | None = None,
        src_ip: str | None = None,
        sni: str | None = None,
    ) -> str:
        """The tenant of a flow; "unassigned" when no rule matches."""
        if cgroup_path and self._cgroups:
            found = self._by_cgroup(cgroup_path)
            if found is not None:
                return found
        if uid is not None and uid in self._uids:
            return self._uids[uid]
        if src_ip and self._nets:
            try:
                addr = ipaddress.ip_address(src_ip)
            except ValueError:
                addr = None
            if addr is not None:
                for net, name in self._nets:
                    if addr.version == net.version and addr in net:
                        return name
        if sni and self._sni:
            host = normalize_hostname(sni)
            for rx, name, captures in self._sni:
                m = rx.fullmatch(host)
                if m is None:
                    continue
                if not captures:
                    return name
                captured = self._by_lower.get(str(m.group("tenant")).lower())
                if captured is not None:
                    return captured
        return UNASSIGNED

    def _by_cgroup(self, path: str) -> str | None:
        if path in self._cgroup_cache:
            return self._cgroup_cache[path]
        found = next((name for rx, name in self._cgroups if rx.match(path)), None)
        self._cgroup_cache[path] = found
        if len(self._cgroup_cache) > _CGROUP_CACHE_MAX:
            self._cgroup_cache.popitem(last=False)
        return found
