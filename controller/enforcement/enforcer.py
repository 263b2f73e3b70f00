"""The controller side of enforcement: one place that turns the kernel's decisions
into a prompt client error and records, keeps the kernel's policy in step with the
configuration and the DNS cache, and says which state the host is in.

Decisions come from two programs: TC egress judges the ClientHello (and QUIC,
ECH, shared hosts) with the policy of kernel_policy.py and reports through the
lt_events ring; the connect programs (connect_guard.py) refuse addresses DNS
named only for unsanctioned instances and report through their own ring. Both
end in `on_decision`, which, for a blocked TCP hello, destroys the client's
socket (sock_destroy.py), then records the decision: the audit table, the
per-(tenant, vendor, instance, action) counter and an `unsanctioned_destination`
alert with `evidence.action`.

Failure modes: `stop` detaches the connect programs (the TC programs go with
the probes): a clean stop fails open. A crash leaves both attached with the last
policy in their maps until the next start replaces them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from leaktap.analytics.incidents import UNSANCTIONED_DESTINATION, Incident, dedup_key
from leaktap.controller.attribution.catalogue import CrmCatalogue
from leaktap.controller.attribution.tenants import UNASSIGNED, TenantResolver
from leaktap.controller.config import LeaktapConfig
from leaktap.controller.enforcement.connect_guard import ConnectEvent, ConnectGuard
from leaktap.controller.enforcement.decision_log import DecisionLog
from leaktap.controller.enforcement.dry_run_pairs import DryRunPairs
from leaktap.controller.enforcement.kernel_policy import (
    EnforcementDecision,
    KernelPolicy,
    expire_blocked,
    set_crm_addresses,
)
from leaktap.controller.enforcement.refusals import (
    Refusal,
    crm_addresses,
    kernel_address,
    refused_addresses,
    v4_mapped,
)
from leaktap.controller.enforcement.sock_destroy import SocketDestroyer, cgroup_netns
from leaktap.controller.kernel.cgroups import cgroup_dirs
from leaktap.controller.series import OTHER, SeriesCap
from leaktap.controller.storage import minute_of

logger = logging.getLogger(__name__)

IPPROTO_TCP = 6
# (tenant, vendor, instance, action) label sets of the decisions metric; later ones: other
DECISION_SERIES_MAX = 1000
# a decision colours the unsanctioned alerts of its destination this long (an episode)
ACTION_MEMORY_S = 3600.0
# new cgroups are mapped to tenants this often (children of mapped ones are at once), and
# the refused addresses recomputed from the whole DNS cache (expired answers drop out)
REFRESH_EVERY_S = 5.0
# a blocked flow is forgotten by the kernel this long after its hello (its socket is
# destroyed at once; a retransmitted hello after that is judged, and refused, anew)
BLOCKED_FLOW_MAX_AGE_S = 30.0
OBSERVED = "observed"

DecisionKey = tuple[str, str, str, str]


def enforcing_tenants(config: LeaktapConfig) -> dict[str, str]:
    """tenant -> dry-run | block, for the tenants that enforce."""
    return {t.name: t.enforce for t in config.tenants if t.enforce != "monitor"}


class Enforcement:
    """Owns the connect guard, the decision records and the policy state."""

    def __init__(
        self,
        config: LeaktapConfig,
        store_path: str | Path,
        cgroup_mount: Path | None,
        cgroup_path: Callable[[int], str | None],
        on_incident: Callable[[Incident], Any],
        pin_root: str,
    ) -> None:
        self.config = config
        self.catalogue = CrmCatalogue(config.catalogue)
        self.log = DecisionLog(store_path)
        self.destroyer = SocketDestroyer()
        self.cgroup_mount = cgroup_mount
        self.cgroup_path = cgroup_path
        self.on_incident = on_incident
        self.pin_root = pin_root
        self.guard: ConnectGuard | None = None
        self.policy: KernelPolicy | None = None
        self.policy_loaded_at: float | None = None
        self.policy_error: str | None = None  # why the hello verdict is not in the kernel
        self.unenforceable_rules: list[str] = []
        # (tenant, vendor, instance, action) -> decisions since start, for /metrics
        self.counts: dict[DecisionKey, int] = {}
        self.series: SeriesCap[DecisionKey] = SeriesCap(DECISION_SERIES_MAX)
        self._last_action: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._refusals: dict[str, dict[str, Refusal]] = {}
        self._dry_runs = DryRunPairs()  # dry-run reports waiting for their partner
        self._dry_run_lock = threading.Lock()
        self._crm_addresses: frozenset[str] | None = None  # as last given to the kernel
        self._last_scan = 0.0
        self._lock = threading.Lock()
        self._probes: Any = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self, probes: Any, drainer: Any) -> None:
        """Before the probes attach: the policy is in the maps when the first packet
        is judged, and decisions have somewhere to go."""
        self._probes = probes
        drainer.on_enforcement = self._on_raw_decision
        self._apply_kernel_policy(self.config)
        self._sync_guard()
        self.update_addresses({})  # nothing learned yet: the kernel's sets start empty

    def stop(self) -> None:
        """Fail open: the connect programs are detached (the TC programs go with the
        probes, right after)."""
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        self.log.close()

    def _apply_kernel_policy(self, config: LeaktapConfig) -> None:
        try:
            policy = KernelPolicy.from_config(config, CrmCatalogue(config.catalogue))
            # the cgroup ids and paths of the real cgroup2 mount (hybrid hosts: not /sys/fs/cgroup)
            policy.apply(self._probes, dict(cgroup_dirs(self.cgroup_mount))
                         if self.cgroup_mount is not None else {})
        except NotImplementedError:
            self.policy_error = "the kernel's hello verdict is not available in this build"
            logger.warning("enforcement: %s (connect-time refusal only)", self.policy_error)
            return
        self.policy = policy
        self.policy_error = None
        self.policy_loaded_at = time.time()
        self.unenforceable_rules = [str(r) for r in policy.unenforceable_rules]
        if self.unenforceable_rules:  # one line; /readyz and doctor list them
            logger.warning("enforcement: %d catalogue rule(s) the kernel cannot recognise "
                           "(their hellos pass; addresses DNS names for them are still refused "
                           "at connect): %s", len(self.unenforceable_rules),
                           ", ".join(f"{r.vendor} ({r.source})"
                                     for r in policy.unenforceable_rules))

    def _sync_guard(self) -> None:
        """Load the connect programs when a tenant starts enforcing, unload them when
        none does, and refill their tenant maps."""
        wanted = bool(enforcing_tenants(self.config)) and self.cgroup_mount is not None
        if wanted and self.guard is None:
            guard = ConnectGuard(self.cgroup_mount, self._on_connect_event)  # type: ignore[arg-type]
            guard.load(self.pin_root)
            try:
                self._fill_guard(guard)
                guard.attach()
            except Exception:
                guard.close()
                raise
            self.guard = guard
        elif not wanted and self.guard is not None:
            self.guard.close()
            self.guard = None
        elif self.guard is not None:
            self._fill_guard(self.guard)
        if self.policy_loaded_at is None and self.guard is not None:
            self.policy_loaded_at = time.time()

    def _fill_guard(self, guard: ConnectGuard) -> None:
        guard.set_tenants(*self._tenant_maps(self._cgroup_dirs()))
        guard.set_refused(self._refused_keys())
        self._last_scan = time.monotonic()

    def _cgroup_dirs(self) -> list[tuple[int, str]]:
        """The cgroups, when a tenant map needs them (a walk of the whole hierarchy)."""
        if self.cgroup_mount is None or (
                self.policy is None and not any(t.match.cgroup for t in self.config.tenants)):
            return []
        return cgroup_dirs(self.cgroup_mount)

    # -- tenants and addresses in the connect programs' maps -----------------------

    def _tenant_index(self) -> dict[str, tuple[int, str]]:
        return {t.name: (i + 1, t.enforce) for i, t in enumerate(self.config.tenants)}

    def _tenant_maps(
        self, dirs: list[tuple[int, str]],
    ) -> tuple[dict[int, tuple[int, str]], dict[int, tuple[int, str]]]:
        index = self._tenant_index()
        uids: dict[int, tuple[int, str]] = {}
        for t in self.config.tenants:
            for uid in t.match.uids:
                uids.setdefault(uid, index[t.name])  # first tenant in config order wins
        cgroups: dict[int, tuple[int, str]] = {}
        if self.cgroup_mount is None or not any(t.match.cgroup for t in self.config.tenants):
            return cgroups, uids
        resolver = TenantResolver(self.config.tenants)
        claimed: set[str] = set()
        for cgroup_id, path in dirs:
            tenant = resolver.resolve(cgroup_path=path)
            if tenant != UNASSIGNED:
                cgroups[cgroup_id] = index[tenant]
                claimed.add(path)
            elif any(path.startswith(c.rstrip("/") + "/") for c in claimed):
                cgroups[cgroup_id] = (0, "monitor")  # below a claimed cgroup, unclaimed
        return cgroups, uids

    def _refused_keys(self) -> dict[tuple[int, int, bytes], int]:
        index = self._tenant_index()
        keys: dict[tuple[int, int, bytes], int] = {}
        for tenant, refused in self._refusals.items():
            if tenant not in index:
                continue
            for ip in refused:
                for form in filter(None, (ip, v4_mapped(ip))):
                    family, addr = kernel_address(form)
                    keys[(index[tenant][0], family, addr)] = 1
        return keys

    def update_addresses(self, bindings: Mapping[str, list[tuple[str, ...]]]) -> None:
        """Recompute the refused addresses from the DNS cache's live bindings (at every
        poll: expired answers drop out) and push the difference to the kernel."""
        refusals = refused_addresses(bindings, self.catalogue, self.config.tenants)
        with self._lock:
            self._refusals = refusals
        if self.guard is not None:
            self.guard.set_refused(self._refused_keys())
        if self.policy is not None:
            # the QUIC / ECH / unreadable-hello verdicts apply to CRM addresses
            crm = frozenset(crm_addresses(bindings, self.catalogue))
            if crm != self._crm_addresses:
                set_crm_addresses(self._probes, crm)
                self._crm_addresses = crm

    def on_dns_learned(self, ip: str, chains: list[tuple[str, ...]]) -> None:
        """A DNS answer arrived (`chains`: every live name chain of its address): judge
        that address at once, the client connects right after the answer."""
        if not self._enforcing or not any(
                self.catalogue.lookup(n) for chain in chains for n in chain):
            return
        one = refused_addresses({ip: chains}, self.catalogue, self.config.tenants)
        with self._lock:
            refusals = {t: dict(r) for t, r in self._refusals.items()}
            for tenant, refused in one.items():
                mine = refusals.setdefault(tenant, {})
                mine.pop(ip, None)
                mine.update(refused)
            self._refusals = refusals
        if self.guard is not None:
            self.guard.set_refused(self._refused_keys())
        if self.policy is not None and self._crm_addresses is not None \
                and ip not in self._crm_addresses:
            self._crm_addresses = self._crm_addresses | {ip}
            set_crm_addresses(self._probes, self._crm_addresses)

    def poll(self, bindings: Callable[[], Mapping[str, list[tuple[str, ...]]]]) -> None:
        """Each agent poll: every REFRESH_EVERY_S, the refused and CRM addresses from
        the whole DNS cache and the tenants of new cgroups."""
        if self.guard is None and self.policy is None:
            return
        if self.policy is not None:
            expire_blocked(self._probes, BLOCKED_FLOW_MAX_AGE_S)
        # addresses and cgroups only matter to tenants that enforce (a reload that
        # turns enforcement on pushes them at once)
        if self._enforcing and time.monotonic() - self._last_scan >= REFRESH_EVERY_S:
            self._last_scan = time.monotonic()
            self.update_addresses(bindings())  # the refused addresses, into the guard too
            dirs = self._cgroup_dirs()  # one walk for both programs' tenant maps
            if self.guard is not None:
                self.guard.set_tenants(*self._tenant_maps(dirs))
            if self.policy is not None and self.cgroup_mount is not None:
                # new cgroups' tenants (children of matched ones are covered in the kernel)
                self.policy.refresh_cgroups(self._probes, dict(dirs))

    @property
    def _enforcing(self) -> bool:
        return (self.guard is not None or self.policy is not None) and bool(
            enforcing_tenants(self.config))

    # -- decisions ------------------------------------------------------------------

    def _on_raw_decision(self, raw: bytes) -> None:
        if self.policy is None:
            return
        self.on_decision(self.policy.decode_decision(raw))

    def _on_connect_event(self, ev: ConnectEvent) -> None:
        tenant = next((t.name for i, t in enumerate(self.config.tenants) if i + 1 == ev.tenant),
                      UNASSIGNED)
        refusal = self._refusals.get(tenant, {}).get(ev.daddr.removeprefix("::ffff:"))
        self.on_decision(EnforcementDecision(
            ts=time.time(), tenant=tenant,
            action="blocked" if ev.mode == "block" else "would_block", reason="address",
            vendor=refusal.vendor if refusal else None,
            crm_instance=refusal.instance if refusal else None,
            host=refusal.host if refusal else None, proto=ev.proto,
            saddr="", sport=0, daddr=ev.daddr, dport=ev.dport, cgroup_id=ev.cgroup_id,
        ))

    def on_decision(self, d: EnforcementDecision) -> None:
        """A prompt error for a blocked client, then the records."""
        if d.action == "blocked" and d.proto == IPPROTO_TCP and d.sport:
            self.destroyer.destroy(d.proto, d.saddr, d.sport, d.daddr, d.dport,
                                   other_netns=self._netns_of(d.cgroup_id))
        if d.action == "would_block":
            if not self._record_dry_run(d):
                return  # the connection's other report: counted and alerted with it
        else:
            self._record(d)
        vendor, instance = d.vendor or "", d.crm_instance or ""
        key: DecisionKey = (d.tenant, vendor, instance, d.action)
        with self._lock:
            if key not in self.counts and not self.series.admits(key):
                key = (OTHER, OTHER, OTHER, d.action)
            counts = dict(self.counts)  # replaced, never mutated: readers need no lock
            counts[key] = counts.get(key, 0) + 1
            self.counts = counts
            self._last_action[(d.tenant, vendor, instance)] = (d.action, d.ts)
        self.on_incident(self._incident(d))

    def _record(self, d: EnforcementDecision) -> int:
        """The audit row (its id; 0 when it could not be written)."""
        try:
            return self.log.add(d)
        except Exception:  # noqa: BLE001 - the alert and the counter still go out
            logger.exception("recording an enforcement decision")
            return 0

    def _record_dry_run(self, d: EnforcementDecision) -> bool:
        """One decision per dry-run connection, as block would record (dry_run_pairs.py):
        False when `d` completes a connection already recorded. Both rings' threads come
        here, so the match and the record are one step."""
        with self._dry_run_lock:
            earlier = self._dry_runs.partner(d)
            if earlier is None:
                record_id = self._record(d)
                if record_id:
                    self._dry_runs.wait(d, record_id)
                return True
        try:
            self.log.fold(earlier, d)
        except Exception:  # noqa: BLE001 - the earlier record stands as it is
            logger.exception("recording an enforcement decision")
        return False

    def _netns_of(self, cgroup_id: int) -> Iterator[str]:
        """The cgroup's namespaces, looked up only if the socket is not in ours."""
        yield from cgroup_netns(self.cgroup_mount, self.cgroup_path(cgroup_id))

    def _incident(self, d: EnforcementDecision) -> Incident:
        minute = minute_of(d.ts)
        allowed = next((sorted(t.allow) for t in self.config.tenants if t.name == d.tenant), [])
        target = d.host or d.daddr
        where = "at connect()" if d.reason == "address" else "in the kernel, on the ClientHello"
        verb = "blocked" if d.action == "blocked" else "would have blocked (dry-run)"
        return Incident(
            kind=UNSANCTIONED_DESTINATION, tenant=d.tenant, crm_vendor=d.vendor,
            crm_instance=d.crm_instance, first_ts=minute, last_ts=minute, raised_ts=minute,
            severity="high", score=1.0,
            summary=f"leaktap {verb} {d.tenant}'s connection to {target} "
                    f"({d.vendor or '?'}:{d.crm_instance or '?'}): {d.reason}",
            dedup_key=dedup_key(UNSANCTIONED_DESTINATION, d.tenant, d.vendor, d.crm_instance,
                                minute),
            evidence={
                "action": d.action, "reason": d.reason, "host": d.host,
                "destination": f"{d.daddr}:{d.dport}", "allowed": allowed, "detected": where,
            },
        )

    def action_for(self, tenant: str, vendor: str | None, instance: str | None,
                   now: float | None = None) -> str:
        """What enforcement did about a destination lately: blocked | would_block, or
        observed (a monitor tenant, or traffic the kernel did not judge)."""
        seen = self._last_action.get((tenant, vendor or "", instance or ""))
        now = time.time() if now is None else now
        if seen is None or now - seen[1] > ACTION_MEMORY_S:
            return OBSERVED
        return seen[0]

    # -- reload and state --------------------------------------------------------------

    def reload(self, config: LeaktapConfig,
               bindings: Mapping[str, list[tuple[str, ...]]]) -> None:
        """Replace the policy: the kernel's hello verdict, the connect maps. Raises (and
        keeps the running policy) when the new one cannot be compiled."""
        _compile_policy(config)  # a ConfigError here changes nothing
        self.config = config
        self.catalogue = CrmCatalogue(config.catalogue)
        with self._lock:
            self._last_action.clear()
            self._refusals = refused_addresses(bindings, self.catalogue, config.tenants)
        if self._probes is not None:
            self._apply_kernel_policy(config)
        self._sync_guard()
        self._crm_addresses = None  # given to the kernel again, whatever apply() did
        self.update_addresses(bindings)

    def state(self) -> dict[str, Any]:
        """For /readyz and doctor: off | dry-run | block, and what is loaded."""
        modes = enforcing_tenants(self.config)
        block = sorted(t for t, m in modes.items() if m == "block")
        dry = sorted(t for t, m in modes.items() if m == "dry-run")
        return {
            "state": "block" if block else "dry-run" if dry else "off",
            "block_tenants": block,
            "dry_run_tenants": dry,
            "policy_loaded_at": self.policy_loaded_at,
            "hello_verdict": self.policy is not None,
            "hello_verdict_unavailable": self.policy_error,
            "connect_refusal": self.guard is not None and self.guard.attached,
            "refused_addresses": self.guard.refused_count if self.guard is not None else 0,
            "unenforceable_rules": list(self.unenforceable_rules),
            "sockets_destroyed": self.destroyer.stats.destroyed,
            "decisions_unreported": self.guard.lost() if self.guard is not None else 0,
        }


def _compile_policy(config: LeaktapConfig) -> KernelPolicy | None:
    try:
        return KernelPolicy.from_config(config, CrmCatalogue(config.catalogue))
    except NotImplementedError:
        return None


