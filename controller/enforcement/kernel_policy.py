"""The enforcement policy as the TC egress program reads it, and its decisions.

Interface for the controller side (config reload, SOCK_DESTROY, alerts,
audit, metrics, doctor):

- ``KernelPolicy.from_config(config, catalogue)`` compiles tenants, allow
  lists and ``enforcement`` into map contents (pure Python, no kernel).
  Raises ``ConfigError`` for what cannot be compiled.
- ``policy.apply(tables)`` replaces the running policy in the loaded or
  pinned maps (``tables``: anything with ``table(name)``, e.g. loader.Probes).
  Flow counters are never touched; applying the same policy twice changes
  nothing. New entries are written before stale ones are deleted, so a
  reload never opens a gap for a tenant present in both policies.
- ``policy.refresh_cgroups(tables, cgroups)`` re-resolves the tenants'
  cgroup globs against ``{cgroup id: cgroup v2 path}`` (call on new cgroups;
  a child created under an already matched cgroup is covered in the kernel
  before that, through its ancestors).
- ``set_crm_addresses(tables, addrs)`` replaces the set of CRM addresses
  (from the DNS cache and the catalogue) the QUIC/ECH/unreadable-hello
  verdicts use.
- ``policy.unenforceable_rules`` lists the catalogue rules the kernel cannot
  represent (regex rules, mid-label globs); doctor reports them.
- Decisions reach user space as ring events of kind ``enforcement``
  (LT_EV_ENFORCE), rare by construction. ``RingDrainer`` (kernel/ringbuf.py)
  passes them, undecoded, to its ``on_enforcement: Callable[[bytes], None]``
  attribute (None: counted in ``RingDrainer.enforcement_dropped``); the agent
  sets ``drainer.on_enforcement = lambda raw: handle(policy.decode_decision(raw))``.
  Per-(tenant, action) totals are also kept in the kernel (``decision_counts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from leaktap.controller.attribution.catalogue import CrmCatalogue
from leaktap.controller.config import LeaktapConfig

Action = Literal["blocked", "would_block"]
Reason = Literal["unsanctioned_instance", "shared_host", "quic", "ech", "address"]


@dataclass(frozen=True)
class EnforcementDecision:
    """One verdict of the kernel against a flow of a dry-run or block tenant."""

    ts: float
    tenant: str
    action: Action
    reason: Reason
    vendor: str | None
    crm_instance: str | None
    host: str | None
    proto: int
    saddr: str
    sport: int
    daddr: str
    dport: int
    cgroup_id: int


class KernelPolicy:
    """Tenants, allow lists and edge-case settings compiled into map entries."""

    @classmethod
    def from_config(cls, config: LeaktapConfig, catalogue: CrmCatalogue) -> KernelPolicy:
        raise NotImplementedError

    def apply(self, tables: Any) -> None:
        raise NotImplementedError

    def tenant_index(self, name: str) -> int | None:
        raise NotImplementedError

    def decode_decision(self, raw: bytes) -> EnforcementDecision:
        raise NotImplementedError


def set_crm_addresses(tables: Any, addrs: Any) -> None:
    """Replace the kernel's set of CRM addresses (iterable of IP address strings)."""
    raise NotImplementedError
