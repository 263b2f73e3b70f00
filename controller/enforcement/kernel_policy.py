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
- ``expire_blocked(tables, max_age_s)`` forgets blocked flows (every later packet of
  one is dropped in the kernel) once their sockets are gone; call it each poll.

Semantics (bpf/include/lt_enforce.h): a block/dry-run tenant's hello naming a
CRM instance is allowed when (tenant, host) was expanded from an allow entry
"vendor:instance" over the vendor's "{instance}.<suffix>" templates, or the tenant
has "vendor:*". A shared vendor host passes unless enforcement.shared_hosts is
block and the tenant lacks "vendor:*". An ECH hello to a CRM address (or with a
CRM outer name) and a QUIC Initial to a CRM address are decided per
enforcement.ech / enforcement.quic; a hello whose name the kernel cannot read
(none sent, malformed, beyond its bounds) to a CRM address is decided with
reason "address". A name that is no CRM's is untouched.
"""

from __future__ import annotations

import ctypes
import fnmatch
import ipaddress
import logging
import re
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from leaktap.controller.attribution.catalogue import (
    CrmCatalogue,
    load_shipped_rules,
    normalize_hostname,
)
from leaktap.controller.config import LeaktapConfig, TenantConfig
from leaktap.controller.enforcement.regex_names import NAMES_CAP, regex_names
from leaktap.controller.errors import ConfigError
from leaktap.controller.kernel import abi
from leaktap.controller.kernel.cgroups import cgroup_dirs
from leaktap.controller.kernel.hostfs import find_cgroup2_mount

logger = logging.getLogger(__name__)

Action = Literal["blocked", "would_block"]
Reason = Literal["unsanctioned_instance", "shared_host", "quic", "ech", "address"]

CGROUP_MOUNT = Path("/sys/fs/cgroup")
NAME_MAX = 256  # LT_NAME_MAX: map keys are the name bytes, zero-padded
HOSTNAME_MAX = 253
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_MODES = {"monitor": 0, "dry-run": 1, "block": 2}  # enum lt_enf_mode
_ACTIONS: dict[int, Action] = {1: "blocked", 2: "would_block"}  # enum lt_enf_action
_REASONS: dict[int, Reason] = {  # enum lt_enf_reason
    0: "unsanctioned_instance", 1: "shared_host", 2: "quic", 3: "ech", 4: "address"}
_KIND_NOT_CRM, _KIND_INSTANCE, _KIND_SHARED = 0, 1, 2  # enum lt_name_kind
_FLAG_QUIC, _FLAG_ECH, _FLAG_SHARED = 1, 2, 4  # enum lt_enf_flag
# struct lt_decision (bpf/include/lt_types.h; offsets pinned in tests/abi_golden.json)
DECISION = struct.Struct("<QQII16s16sHHBBBBIIIHH")
DECISION_NAME_OFFSET = 80


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


@dataclass(frozen=True)
class UnenforceableRule:
    """A catalogue rule whose names the kernel cannot recognise (their hellos pass)."""

    source: str  # e.g. "crm_catalogue.yaml: rules[3]"
    vendor: str
    rule: str
    why: str

    def __str__(self) -> str:
        return f"{self.source}: {self.vendor} {self.rule!r}: {self.why}"


def _name_bytes(name: str) -> bytes:
    raw = name.encode("ascii")
    if len(raw) > HOSTNAME_MAX + 1:
        raise ValueError(f"host name longer than {HOSTNAME_MAX}: {name!r}")
    return raw.ljust(NAME_MAX, b"\0")


def _catalogue_rules(config: LeaktapConfig) -> list[tuple[str, Mapping[str, Any]]]:
    """(source, rule) in CrmCatalogue's order: the configuration's entries first."""
    rules: list[tuple[str, Mapping[str, Any]]] = [
        (f"catalogue[{i}]", {"vendor": e.vendor, "host": e.pattern, "instance": e.instance,
                             "shared": e.shared})
        for i, e in enumerate(config.catalogue)
    ]
    rules += [(f"crm_catalogue.yaml: rules[{i}]", r) for i, r in enumerate(load_shipped_rules())]
    return rules


def _rule_hosts(rules: list[tuple[str, Mapping[str, Any]]],
                unenforceable: list[UnenforceableRule]
                ) -> Iterator[tuple[str, Mapping[str, Any], str]]:
    """(source, rule, host template) in catalogue order; a regex rule gives the hosts
    (or "{instance}.<suffix>" templates) it matches when they can be listed, and is
    reported as unenforceable when they cannot."""
    for source, rule in rules:
        host = rule.get("host")
        if host is not None:
            yield source, rule, normalize_hostname(str(host))
            continue
        listed = regex_names(str(rule.get("regex")))
        if listed is None:
            unenforceable.append(UnenforceableRule(
                source, str(rule.get("vendor")), str(rule.get("regex")),
                f"a regex rule matching more than {NAMES_CAP} names or with constructs "
                "that cannot be listed: its names are not recognised in the kernel"))
            continue
        group, names = listed
        for name in names:
            yield source, rule, ("{instance}" + name) if group else normalize_hostname(name)


def _first_label_template(host: str) -> tuple[str, str] | None:
    """("instance" | "region", ".suffix") for "{instance}.<literal>"; None otherwise."""
    for placeholder in ("instance", "region"):
        head = "{" + placeholder + "}."
        rest = host[len(head):]
        if host.startswith(head) and rest and not any(c in rest for c in "{}*"):
            return placeholder, "." + rest
    return None


@dataclass
class KernelPolicy:
    """Tenants, allow lists and edge-case settings compiled into map entries."""

    tenants: list[str]  # index + 1 is the kernel's tenant number
    vendors: list[str]  # index + 1 is the kernel's vendor number
    catalogue: CrmCatalogue
    modes: dict[int, tuple[int, int]]  # tenant -> (enum lt_enf_mode, enum lt_enf_flag bits)
    names: dict[bytes, tuple[int, int]]  # lt_crm_names: key bytes -> (vendor, kind)
    allow: set[tuple[int, int, bytes]]  # lt_allow: (tenant, vendor, name bytes or zeros)
    uids: dict[int, int]
    cidrs: dict[tuple[int, int, bytes], int]  # (family, prefixlen, address) -> tenant
    cgroup_globs: list[tuple[re.Pattern[str], int, bool]]  # (glob, tenant, covers subtree)
    unenforceable_rules: list[UnenforceableRule] = field(default_factory=list)
    cgroups: dict[int, tuple[int, bool]] = field(default_factory=dict)  # id -> tenant, subtree

    @classmethod
    def from_config(cls, config: LeaktapConfig, catalogue: CrmCatalogue) -> KernelPolicy:
        """Compile; a name or allow entry the maps cannot hold is a ConfigError."""
        flags = ((_FLAG_QUIC if config.enforcement.quic == "block" else 0)
                 | (_FLAG_ECH if config.enforcement.ech == "block" else 0)
                 | (_FLAG_SHARED if config.enforcement.shared_hosts == "block" else 0))
        if len(config.tenants) >= abi.defines()["LT_TENANTS_MAX"]:
            raise ConfigError(f"tenants: at most {abi.defines()['LT_TENANTS_MAX'] - 1} tenants "
                              "can be enforced in the kernel")
        tenants = [t.name for t in config.tenants]
        modes = {i + 1: (_MODES[t.enforce], flags) for i, t in enumerate(config.tenants)}
        rules = _catalogue_rules(config)
        vendors = sorted({str(r.get("vendor")) for _, r in rules})
        vendor_id = {v: i + 1 for i, v in enumerate(vendors)}
        names: dict[bytes, tuple[int, int]] = {}
        templates: dict[str, list[str]] = {}  # vendor -> ".suffix" of its {instance} rules
        fixed: dict[str, list[tuple[str, str]]] = {}  # vendor -> (host, instance)
        unenforceable: list[UnenforceableRule] = []

        def put_exact(host: str) -> None:
            m = catalogue.lookup(host)  # precedence is the catalogue's, rule by rule
            value = (0, _KIND_NOT_CRM) if m is None else (
                vendor_id[m.vendor], _KIND_SHARED if m.shared else _KIND_INSTANCE)
            names.setdefault(_name_bytes(host), value)

        for source, rule, host in _rule_hosts(rules, unenforceable):
            vendor = str(rule.get("vendor"))
            shared = bool(rule.get("shared", False))
            template = _first_label_template(host)
            if template is not None:
                placeholder, suffix = template
                if len(suffix) > HOSTNAME_MAX:
                    raise ConfigError(f"{source}: host {host!r} is too long")
                kind = _KIND_SHARED if shared else _KIND_INSTANCE
                names.setdefault(_name_bytes(suffix), (vendor_id[vendor], kind))
                for excluded in rule.get("exclude") or []:
                    put_exact(str(excluded).lower() + suffix)
                if placeholder == "instance" and not shared:
                    templates.setdefault(vendor, []).append(suffix)
            elif "{" not in host and "*" not in host:
                put_exact(host)
                instance = rule.get("instance")
                if instance is not None and not shared:
                    fixed.setdefault(vendor, []).append((host, str(instance).lower()))
            else:
                unenforceable.append(UnenforceableRule(
                    source, vendor, host,
                    "a glob or placeholder inside a label (only '{instance}.<literal>' and "
                    "literal hosts are recognised in the kernel)"))
        allow: set[tuple[int, int, bytes]] = set()
        for index, t in enumerate(config.tenants, 1):
            for entry in t.allow:
                vendor, _, instance = entry.partition(":")
                if vendor not in vendor_id:
                    continue  # a vendor no rule names: nothing to allow in the kernel
                if instance == "*":
                    allow.add((index, vendor_id[vendor], bytes(NAME_MAX)))
                    continue
                for suffix in templates.get(vendor, []):
                    name = instance + suffix
                    m = catalogue.lookup(name)
                    if m is not None and m.vendor == vendor and m.instance == instance:
                        allow.add((index, vendor_id[vendor], _name_bytes(name)))
                for host, fixed_instance in fixed.get(vendor, []):
                    if fixed_instance == instance:
                        allow.add((index, vendor_id[vendor], _name_bytes(host)))
        policy = cls(
            tenants=tenants, vendors=vendors, catalogue=catalogue, modes=modes, names=names,
            allow=allow, uids=_uid_tenants(config.tenants), cidrs=_cidr_tenants(config.tenants),
            cgroup_globs=[(re.compile(fnmatch.translate(t.match.cgroup)), i, t.match.cgroup
                           .endswith("*")) for i, t in enumerate(config.tenants, 1)
                          if t.match.cgroup is not None],
            unenforceable_rules=unenforceable,
        )
        return policy

    # -- tenants ------------------------------------------------------------------

    def tenant_index(self, name: str) -> int | None:
        """The kernel's number of tenant `name` (its config position + 1)."""
        try:
            return self.tenants.index(name) + 1
        except ValueError:
            return None

    def resolve_cgroups(self, cgroups: Mapping[int, str]) -> dict[int, tuple[int, bool]]:
        """{cgroup id: (tenant, covers its subtree)} for the cgroups a tenant's glob
        matches (first tenant in config order, as attribution/tenants.py)."""
        out: dict[int, tuple[int, bool]] = {}
        for cgroup_id, path in cgroups.items():
            for rx, tenant, subtree in self.cgroup_globs:
                if rx.match(path):
                    out[cgroup_id] = (tenant, subtree)
                    break
        return out

    # -- kernel maps --------------------------------------------------------------

    def apply(self, tables: Any, cgroups: Mapping[int, str] | None = None) -> None:
        """Replace the running policy with this one (idempotent; flow counts untouched).

        `cgroups` ({id: path}) defaults to a scan of /sys/fs/cgroup. Entries are written
        before stale ones are deleted, and the global switch last (first when turning off).
        """
        if cgroups is None:
            mount = find_cgroup2_mount() or CGROUP_MOUNT
            cgroups = dict(cgroup_dirs(mount)) if self.cgroup_globs else {}
        self.cgroups = self.resolve_cgroups(cgroups)
        on = any(mode for mode, _ in self.modes.values())
        pol = tables.table("lt_tenant_pol")
        if not on:
            _set_policy(pol, 0, 0, 0)
        for index in range(1, len(pol)):
            mode, flags = self.modes.get(index, (0, 0))
            _set_policy(pol, index, mode, flags)
        names = tables.table("lt_crm_names")
        _replace(names, {k: (v, kind) for k, (v, kind) in self.names.items()},
                 lambda t, k: _name_key(t, k), lambda t, v: _crm_name(t, *v))
        allow = tables.table("lt_allow")
        _replace(allow, {a: 1 for a in self.allow}, _allow_key, lambda t, v: t.Leaf(v))
        uid = tables.table("lt_ten_uid")
        _replace(uid, dict(self.uids), lambda t, k: t.Key(k), lambda t, v: t.Leaf(v))
        self.refresh_cgroups(tables, None)
        for family, name in ((4, "lt_ten_v4"), (6, "lt_ten_v6")):
            t = tables.table(name)
            wanted = {(plen, addr): ten for (fam, plen, addr), ten in self.cidrs.items()
                      if fam == family}
            _replace(t, wanted, _cidr_key, lambda t, v: t.Leaf(v))
        if on:
            _set_policy(pol, 0, 1, 0)

    def refresh_cgroups(self, tables: Any, cgroups: Mapping[int, str] | None) -> None:
        """Re-resolve the cgroup globs ({id: path}; None: the last resolution) into
        lt_ten_cg: new cgroups get their tenant, vanished ones are removed."""
        if cgroups is not None:
            self.cgroups = self.resolve_cgroups(cgroups)
        t = tables.table("lt_ten_cg")
        _replace(t, dict(self.cgroups), lambda t, k: t.Key(k),
                 lambda t, v: _tenant_ref(t, *v))

    def decision_counts(self, tables: Any) -> dict[tuple[str, Action], int]:
        """Monotonic per-(tenant, action) decision totals kept by the kernel."""
        t = tables.table("lt_decisions")
        out: dict[tuple[str, Action], int] = {}
        for index, name in enumerate(self.tenants, 1):
            for action_id, action in _ACTIONS.items():
                total = sum(int(v) for v in t[t.Key(index * 2 + action_id - 1)])
                if total:
                    out[(name, action)] = total
        return out

    def decode_decision(self, raw: bytes) -> EnforcementDecision:
        """An LT_EV_ENFORCE ring record as a decision (ValueError when malformed)."""
        if len(raw) < DECISION_NAME_OFFSET:
            raise ValueError(f"decision record of {len(raw)} bytes")
        (ts_ns, cgroup_id, _kind, _ifindex, saddr, daddr, sport, dport, family, proto,
         action, reason, tenant, vendor, _uid, name_len, inst_len) = DECISION.unpack_from(raw)
        name = raw[DECISION_NAME_OFFSET : DECISION_NAME_OFFSET + min(name_len, NAME_MAX)]
        host = name.decode("ascii", "replace") if name else None
        match = self.catalogue.lookup(host) if host else None
        instance = match.instance if match is not None else (
            host[:inst_len] if host and inst_len else None)
        vendor_name = self.vendors[vendor - 1] if 0 < vendor <= len(self.vendors) else None
        return EnforcementDecision(
            ts=time.time() - max(0, time.monotonic_ns() - ts_ns) / 1e9,
            tenant=self.tenants[tenant - 1] if 0 < tenant <= len(self.tenants) else "unassigned",
            action=_ACTIONS.get(action, "would_block"),
            reason=_REASONS.get(reason, "address"),
            vendor=vendor_name or (match.vendor if match is not None else None),
            crm_instance=instance,
            host=host,
            proto=proto,
            saddr=_addr(family, saddr),
            sport=sport,
            daddr=_addr(family, daddr),
            dport=dport,
            cgroup_id=cgroup_id,
        )


def expire_blocked(tables: Any, max_age_s: float) -> int:
    """Forget blocked flows older than `max_age_s` (their sockets are long destroyed);
    once none is left, data packets stop looking them up. Returns how many went."""
    blocked = tables.table("lt_blocked")
    cutoff = time.monotonic_ns() - int(max_age_s * 1e9)
    stale = [k for k, v in blocked.items() if v.ts_ns < cutoff]
    for k in stale:
        try:
            del blocked[k]
        except KeyError:
            pass
    on = tables.table("lt_blocked_on")
    zero = on.Key(0)
    if int(on[zero].value) and len(list(blocked.items())) == 0:
        on[zero] = on.Leaf(0)
        if len(list(blocked.items())):  # a block landed meanwhile: keep looking
            on[zero] = on.Leaf(1)
    return len(stale)


def set_crm_addresses(tables: Any, addrs: Iterable[str]) -> None:
    """Replace the kernel's set of CRM addresses (IP address strings) that the QUIC,
    ECH and nameless-hello verdicts apply to. IPv4-mapped IPv6 forms are added too."""
    wanted: dict[tuple[int, bytes], int] = {}
    for a in addrs:
        ip = ipaddress.ip_address(a)
        wanted[(ip.version, ip.packed.ljust(16, b"\0"))] = 1
        if ip.version == 4:
            wanted[(6, ipaddress.IPv6Address(f"::ffff:{ip}").packed)] = 1
    t = tables.table("lt_crm_addrs")
    _replace(t, wanted, _addr_key, lambda t, v: t.Leaf(v))


# -- compilation helpers ----------------------------------------------------------


def _uid_tenants(tenants: list[TenantConfig]) -> dict[int, int]:
    out: dict[int, int] = {}
    for index, t in enumerate(tenants, 1):
        for uid in t.match.uids:
            out.setdefault(uid, index)  # first tenant in config order wins
    return out


def _cidr_tenants(tenants: list[TenantConfig]) -> dict[tuple[int, int, bytes], int]:
    """Each configured prefix -> the first tenant (config order) with a CIDR containing
    it. The kernel's longest-prefix match then answers as the resolver's first match:
    every prefix containing an address contains its longest match, and vice versa."""
    nets = [(ipaddress.ip_network(c, strict=False), i)
            for i, t in enumerate(tenants, 1) for c in t.match.cidrs]
    out: dict[tuple[int, int, bytes], int] = {}
    for net, _ in nets:
        owner = min(i for other, i in nets
                    if other.version == net.version and net.subnet_of(other))  # type: ignore[arg-type]
        out[(net.version, net.prefixlen, net.network_address.packed)] = owner
    return out


def _addr(family: int, raw: bytes) -> str:
    if family == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == 6:
        return str(ipaddress.IPv6Address(raw))
    return ""


# -- map writing ------------------------------------------------------------------


def _replace(table: Any, wanted: Mapping[Any, Any], make_key: Any, make_leaf: Any) -> None:
    """Make `table` hold exactly `wanted`: write every entry, then delete the rest."""
    keep: set[bytes] = set()
    for k, v in wanted.items():
        key = make_key(table, k)
        table[key] = make_leaf(table, v)
        keep.add(bytes(key))
    for key in list(table.keys()):
        if bytes(key) not in keep:
            try:
                del table[key]
            except KeyError:
                pass


def _set_policy(table: Any, index: int, mode: int, flags: int) -> None:
    leaf = table.Leaf()
    leaf.mode, leaf.flags = mode, flags
    table[table.Key(index)] = leaf


def _name_key(table: Any, raw: bytes) -> Any:
    key = table.Key()
    ctypes.memmove(ctypes.addressof(key), raw, NAME_MAX)
    return key


def _crm_name(table: Any, vendor: int, kind: int) -> Any:
    leaf = table.Leaf()
    leaf.vendor, leaf.kind = vendor, kind
    return leaf


def _allow_key(table: Any, k: tuple[int, int, bytes]) -> Any:
    key = table.Key()
    key.tenant, key.vendor = k[0], k[1]
    ctypes.memmove(ctypes.addressof(key) + type(key).name.offset, k[2], NAME_MAX)
    return key


def _tenant_ref(table: Any, tenant: int, subtree: bool) -> Any:
    leaf = table.Leaf()
    leaf.tenant, leaf.subtree = tenant, int(subtree)
    return leaf


def _cidr_key(table: Any, k: tuple[int, bytes]) -> Any:
    key = table.Key()
    key.prefixlen = k[0]
    ctypes.memmove(ctypes.addressof(key) + type(key).addr.offset, k[1], len(k[1]))
    return key


def _addr_key(table: Any, k: tuple[int, bytes]) -> Any:
    key = table.Key()
    key.family = k[0]
    ctypes.memmove(ctypes.addressof(key) + type(key).addr.offset, k[1], 16)
    return key
