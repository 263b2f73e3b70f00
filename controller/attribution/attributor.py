"""From kernel samples and counters to names: SNI > DNS > catalogue, and tenants.

One pipeline shared by the live agent and `leaktap replay`: samples from the
ring buffer feed the ClientHello/QUIC reassemblers and the DNS cache; a
conversation is then described by its server name (SNI, else the DNS names
that resolved to its responder), the CRM vendor and instance of that name,
and the tenant (cgroup path, uid, source CIDR, SNI pattern).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leaktap.controller.attribution.catalogue import CrmCatalogue, CrmMatch
from leaktap.controller.attribution.dns_cache import DnsCache
from leaktap.controller.attribution.dns_queries import DnsEnds
from leaktap.controller.attribution.flows import (
    NO_UID,
    Conversation,
    ConversationId,
    conversation_id,
)
from leaktap.controller.attribution.kernel_names import KernelNames
from leaktap.controller.attribution.tenants import TenantResolver
from leaktap.controller.config import LeaktapConfig
from leaktap.controller.kernel.maps import FlowKey, KernelName, NameRow, name_row
from leaktap.controller.kernel.ringbuf import Sample
from leaktap.controller.protocols.quic import QuicHelloAssembler
from leaktap.controller.protocols.tls import ClientHello, HelloReassembler

logger = logging.getLogger(__name__)

_CGROUP_CACHE_MAX = 4096
# conversations whose instance a plaintext request named (bounded like the hellos)
_REFINED_MAX = 65536

# which evidence named a flow's destination (Names.named_by)
NAMED_BY_SNI = "sni"
NAMED_BY_DNS = "dns"
NAMED_BY_PLAINTEXT = "plaintext"


@dataclass(frozen=True, slots=True)
class Names:
    """What is known of a conversation's destination."""

    sni: str | None
    ech: bool
    dns_names: list[str]
    crm_vendor: str | None
    crm_instance: str | None
    tenant: str
    cgroup: str | None
    # the host serves every customer of the vendor: it named no instance
    shared: bool = False
    crm_region: str | None = None  # a shared host's data centre, when it tells
    named_by: str | None = None  # sni | dns | plaintext


class CgroupPaths:
    """cgroup v2 id -> path relative to the cgroup2 mount (the id is the directory's inode)."""

    def __init__(self, mount: Path | None) -> None:
        self._mount = mount
        self._cache: OrderedDict[int, str | None] = OrderedDict()

    def path(self, cgroup_id: int) -> str | None:
        if not cgroup_id or self._mount is None:
            return None
        if cgroup_id in self._cache:
            return self._cache[cgroup_id]
        found = self._scan(cgroup_id)
        self._cache[cgroup_id] = found
        if len(self._cache) > _CGROUP_CACHE_MAX:
            self._cache.popitem(last=False)
        return found

    def _scan(self, cgroup_id: int) -> str | None:
        assert self._mount is not None
        for root, dirs, _ in os.walk(self._mount):
            for d in dirs:
                full = os.path.join(root, d)
                try:
                    if os.stat(full).st_ino == cgroup_id:
                        return "/" + os.path.relpath(full, self._mount)
                except OSError:
                    continue
        if os.stat(self._mount).st_ino == cgroup_id:
            return "/"
        return None


def _sample_key(s: Sample) -> FlowKey:
    return FlowKey(s.cgroup_id, s.family, s.proto, s.dir, s.src, s.dst, s.sport, s.dport)


class Attributor:
    """Learns from samples; names conversations."""

    def __init__(
        self, config: LeaktapConfig, cgroup_mount: Path | None = None, live: bool = True,
        trust_unmatched_dns: bool = False,
    ) -> None:
        # live: this host is one endpoint (orient from it) and sockets are real;
        # replay runs on a test-run socket whose cgroup and uid are the replayer's
        self.live = live
        self.catalogue = CrmCatalogue(config.catalogue)
        self.tenants = TenantResolver(config.tenants)
        self.hellos = HelloReassembler()
        self.quic = QuicHelloAssembler()
        self.kernel_names = KernelNames()
        self.dns = DnsCache(
            query_window_s=config.dns.query_window_s, pending_max=config.dns.pending_max,
            clients=config.inside if config.mode == "xdp" else (),
            resolvers=config.dns.resolvers, trust_unmatched=trust_unmatched_dns,
        )
        # TC hooks know whether a DNS message left or arrived; XDP and replay see both ways
        self._dns_directional = live and config.mode == "tc"
        # conversations whose DNS-given CRM a ClientHello contradicted (counted once each)
        self._dns_contradicted: set[Any] = set()
        self.cgroups = CgroupPaths(cgroup_mount)
        self._hello_by_conv: dict[Any, ClientHello] = {}
        # one flow's kernel reading still waiting in lt_names (the agent's
        # MapReader.peek_name), for a plaintext write that comes before the poll drains it
        self.peek_kernel_name: Callable[[FlowKey], NameRow | None] | None = None
        # conversation -> (vendor, instance) named by an inspected plaintext request
        self._refined: OrderedDict[ConversationId, tuple[str, str]] = OrderedDict()
        # names a previous run recorded for conversations still open at this start
        self._resumed: dict[Any, Names] = {}
        self.samples = {"tls_hello": 0, "quic_initial": 0, "dns": 0}

    def on_sample(self, s: Sample) -> None:
        self.samples[s.kind] = self.samples.get(s.kind, 0) + 1
        cid = conversation_id(_sample_key(s))
        if s.kind == "tls_hello":
            # direction matters for reassembly: key by the sender's side
            hello = self.hellos.feed((cid, s.src, s.sport), s.seq, s.data)
        elif s.kind == "quic_initial":
            hello = self.quic.feed((cid, s.src, s.sport), s.data)
        elif s.kind == "dns":
            direction = ("out" if s.dir == 0 else "in") if self._dns_directional else None
            ends = DnsEnds(s.proto, s.src, s.sport, s.dst, s.dport)
            self.dns.observe(s.data, ends, direction, s.ts_ns / 1e9)
            return
        else:
            return
        if hello is not None:
            self._hello_by_conv.setdefault(cid, hello)

    def on_kernel_name(self, name: KernelName) -> None:
        """A server name the kernel read from a flow's ClientHello (drained in batches
        from lt_names, issue 12): names the conversation as the hello's event would."""
        self.on_kernel_names([name_row(name)])

    def on_kernel_names(self, rows: list[NameRow]) -> list[ConversationId]:
        """on_kernel_name of a whole drain (MapReader.drain_name_rows), without an object
        per reading: about 3 us a name with the drain. Returns the conversations named."""
        self.samples["kernel_name"] = self.samples.get("kernel_name", 0) + len(rows)
        hello_of = self.kernel_names.hello_of
        by_conv = self._hello_by_conv
        named: list[ConversationId] = []
        for family, proto, src, sport, dst, dport, name, outcome, ech, *_ in rows:
            hello = hello_of(name, outcome, ech)
            if hello is None:
                continue  # no valid name: the hello's ring event carries what was sent
            # conversation_id, inlined: this runs for every new TLS flow
            a, b = (src, sport), (dst, dport)
            cid = (family, proto, a, b) if a <= b else (family, proto, b, a)
            by_conv.setdefault(cid, hello)
            named.append(cid)
        return named

    def resume(self, conv: Conversation, names: Names) -> None:
        """Name a conversation that was open before this start as the previous run did
        (its ClientHello went by then); a hello seen from now on still wins."""
        self._resumed[(conv.family, conv.proto, conv.a, conv.b)] = names

    def forget(self, conv: Conversation) -> None:
        """Drop what was learned of a conversation that left memory (its 5-tuple may return)."""
        cid = (conv.family, conv.proto, conv.a, conv.b)
        self._hello_by_conv.pop(cid, None)
        self._refined.pop(cid, None)
        self._resumed.pop(cid, None)
        self._dns_contradicted.discard(cid)
        for side in (conv.a, conv.b):
            self.hellos.forget((cid, *side))
            self.quic.forget((cid, *side))

    def _crm_by_dns(self, dns_names: list[str]) -> CrmMatch | None:
        """The CRM the names resolving to an address agree on. Several instances
        behind one address (a CDN, a shared pod) leave the instance unknown, and
        several vendors the CRM: guessing would misattribute."""
        found = [m for m in map(self.catalogue.lookup, dns_names) if m is not None]
        if len({m.vendor for m in found}) != 1:
            return None
        if len({m.instance for m in found}) == 1:
            return found[0]
        return CrmMatch(vendor=found[0].vendor, instance=None, host=found[0].host)

    def destination(
        self, family: int, local: tuple[str, int], remote: tuple[str, int], proto: int = 6,
        cgroup_id: int | None = None,
    ) -> tuple[str | None, list[str], CrmMatch | None]:
        """(SNI, DNS names, CRM) of a live connection seen from this host, for
        joining a TLS plaintext write to its flow. Safe without the agent's lock (dict
        lookups). `cgroup_id` (the writer's): the kernel's reading of the hello is
        looked up in lt_names when the poll has not drained it yet."""
        ends = sorted([local, remote])
        cid = (family, proto, ends[0], ends[1])
        sni, resumed_dns = self._known_sni(cid)
        if sni is None and cgroup_id is not None and self.peek_kernel_name is not None:
            sni = self._peek_sni(cid, FlowKey(cgroup_id, family, proto, 0, local[0],
                                              remote[0], local[1], remote[1]))
        dns_names = self.dns.names_for(remote[0]) or resumed_dns
        crm = self.catalogue.lookup(sni) if sni else self._crm_by_dns(dns_names)
        return sni, dns_names, self._with_refinement(cid, crm)

    def _peek_sni(self, cid: ConversationId, key: FlowKey) -> str | None:
        """The name the kernel read from this egress flow's hello, if it waits in lt_names
        (kept for the conversation; the drain names it again, and counts it)."""
        assert self.peek_kernel_name is not None
        row = self.peek_kernel_name(key)
        hello = self.kernel_names.hello_of(row[6], row[7], row[8], count=False) \
            if row is not None else None
        if hello is None:
            return None
        return self._hello_by_conv.setdefault(cid, hello).sni

    def _known_sni(self, cid: Any) -> tuple[str | None, list[str]]:
        """(server name, DNS names) of a conversation: its hello's name, else what the
        previous run recorded for a connection open across the restart."""
        hello = self._hello_by_conv.get(cid)
        if hello is not None:
            return hello.sni, []
        resumed = self._resumed.get(cid)
        if resumed is not None:
            return resumed.sni, list(resumed.dns_names)
        return None, []

    def refine_instance(
        self, family: int, local: tuple[str, int], remote: tuple[str, int], vendor: str,
        instance: str, proto: int = 6,
    ) -> bool:
        """Record the instance a plaintext request on this connection named. It names
        only what the host did not: the vendor must agree with the SNI/DNS name and
        a host-named instance is kept. Returns whether the flow's instance changed."""
        ends = sorted([local, remote])
        cid = (family, proto, ends[0], ends[1])
        sni, resumed_dns = self._known_sni(cid)
        crm = self.catalogue.lookup(sni) if sni else self._crm_by_dns(
            self.dns.names_for(remote[0]) or resumed_dns)
        if crm is None or crm.vendor != vendor or crm.instance is not None:
            return False
        changed = self._refined.get(cid) != (vendor, instance)
        self._refined[cid] = (vendor, instance)
        self._refined.move_to_end(cid)
        if len(self._refined) > _REFINED_MAX:
            self._refined.popitem(last=False)
        return changed

    def _with_refinement(self, cid: ConversationId, crm: CrmMatch | None) -> CrmMatch | None:
        refined = self._refined.get(cid) if crm is not None and crm.instance is None else None
        if crm is None or refined is None or refined[0] != crm.vendor:
            return crm
        return dataclasses.replace(crm, instance=refined[1])

    def _check_dns_against_hello(
        self, conv: Conversation, dst: str, sni: str, crm: CrmMatch | None, dns_names: list[str]
    ) -> None:
        """The hello names the flow; DNS answers that made its address a CRM the hello
        does not name are a finding (a forged or stale answer), counted once per flow."""
        if sni in dns_names:
            return
        by_dns = self._crm_by_dns(dns_names)
        if by_dns is None or (crm is not None and (crm.vendor, crm.instance) == (
                by_dns.vendor, by_dns.instance)):
            return
        cid = (conv.family, conv.proto, conv.a, conv.b)
        if cid in self._dns_contradicted:
            return
        self._dns_contradicted.add(cid)
        self.dns.stats.dns_sni_mismatch += 1
        logger.warning(
            "DNS named %s %s (%s:%s), its ClientHello says %s: the hello wins",
            dst, dns_names[0], by_dns.vendor, by_dns.instance or "?", sni,
        )

    def names(self, conv: Conversation) -> Names:
        (src, _), (dst, _), out, _in = conv.oriented(prefer_local=self.live)
        hello = self._hello_by_conv.get((conv.family, conv.proto, conv.a, conv.b))
        if hello is None and self._resumed:
            resumed = self._resumed.get((conv.family, conv.proto, conv.a, conv.b))
            if resumed is not None:
                return resumed
        sni = hello.sni if hello is not None else None
        # a name that is not a valid host (e.g. "server4:443") is still reported as sent
        # (lower case, as the peers do), but never matched against the catalogue
        reported_sni = sni or (hello.sni_raw.lower() if hello and hello.sni_raw else None)
        dns_names = self.dns.names_for(dst)
        host = sni or (dns_names[0] if dns_names else None)
        crm = self.catalogue.lookup(sni) if sni else self._crm_by_dns(dns_names)
        named_by = NAMED_BY_SNI if reported_sni else NAMED_BY_DNS if dns_names else None
        refined = self._with_refinement((conv.family, conv.proto, conv.a, conv.b), crm)
        if refined is not crm:
            crm, named_by = refined, NAMED_BY_PLAINTEXT
        if sni and dns_names:
            self._check_dns_against_hello(conv, dst, sni, crm, dns_names)
        cgroup = self.cgroups.path(out.cgroup_id) if self.live else None
        uid = out.uid if self.live and out.uid != NO_UID else None
        tenant = self.tenants.resolve(cgroup_path=cgroup, uid=uid, src_ip=src, sni=host)
        return Names(
            sni=reported_sni,
            ech=bool(hello.ech) if hello is not None else False,
            dns_names=dns_names,
            crm_vendor=crm.vendor if crm else None,
            crm_instance=crm.instance if crm else None,
            tenant=tenant,
            cgroup=cgroup,
            shared=crm.shared if crm else False,
            crm_region=crm.region if crm else None,
            named_by=named_by,
        )
