"""The enforcement verdict in TC egress (bpf/include/lt_enforce.h) with KernelPolicy's maps.

Tenants are matched by source CIDR here (BPF_PROG_TEST_RUN skbs have no socket,
so no cgroup or uid). Each case runs frames through the egress program and checks
the return code (TC_ACT_SHOT = 2 drops), the decision on the ring (decoded by
KernelPolicy.decode_decision) and the kernel's per-(tenant, action) counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from leaktap.controller.attribution.catalogue import CrmCatalogue
from leaktap.controller.config import (
    EnforcementConfig,
    LeaktapConfig,
    TenantConfig,
    TenantMatch,
)
from leaktap.controller.enforcement.kernel_policy import (
    DECISION,
    DECISION_NAME_OFFSET,
    EnforcementDecision,
    KernelPolicy,
    expire_blocked,
    set_crm_addresses,
)
from leaktap.controller.kernel import testrun
from tests.bpf.harness import Harness
from tests.bpf.lt_frames import SERVER4, tcp4, tcp6, udp4
from tests.controller.test_tls import MSS, make_hello, split_records

pytestmark = pytest.mark.kernel

TC_ACT_OK, TC_ACT_SHOT = 0, 2
BLOCK_SRC, DRY_SRC, MON_SRC, OTHER_SRC = "198.18.0.1", "198.18.1.1", "198.18.2.1", "198.18.9.9"
BLOCK6_SRC = "2001:db8::1"
CRM_ADDR, PLAIN_ADDR = "198.19.7.7", "198.19.8.8"


def config(**enforcement: str) -> LeaktapConfig:
    return LeaktapConfig(
        tenants=[
            TenantConfig(name="acme", match=TenantMatch(cidrs=["198.18.0.0/24", "2001:db8::/64"]),
                         allow=["salesforce:acme", "zendesk:*"], enforce="block"),
            TenantConfig(name="dry", match=TenantMatch(cidrs=["198.18.1.0/24"]),
                         allow=["salesforce:acme"], enforce="dry-run"),
            TenantConfig(name="mon", match=TenantMatch(cidrs=["198.18.2.0/24"]),
                         allow=["salesforce:acme"]),
        ],
        enforcement=EnforcementConfig(**enforcement),  # type: ignore[arg-type]
    )


def compile_policy(cfg: LeaktapConfig) -> KernelPolicy:
    return KernelPolicy.from_config(cfg, CrmCatalogue(cfg.catalogue))


class Enforced:
    """The shared kernel with a policy applied and the decisions it reports."""

    def __init__(self, tc: Harness) -> None:
        self.tc = tc
        self.raw: list[bytes] = []
        self.policy = compile_policy(config())

    def apply(self, cfg: LeaktapConfig) -> None:
        self.policy = compile_policy(cfg)
        self.policy.apply(self.tc.probes, cgroups={})

    def run(self, frames: list[bytes]) -> tuple[list[int], list[EnforcementDecision], Any]:
        out = self.tc.run(frames)
        decisions = [self.policy.decode_decision(r) for r in self.raw]
        self.raw.clear()
        return out.retvals, decisions, out


@pytest.fixture
def enf(tc: Harness) -> Iterator[Enforced]:
    e = Enforced(tc)
    tc.kernel.drainer.on_enforcement = e.raw.append
    e.apply(config())
    set_crm_addresses(tc.probes, [CRM_ADDR])
    yield e
    # leave the session's shared kernel as the other tests expect it: no policy
    compile_policy(LeaktapConfig()).apply(tc.probes, cgroups={})
    set_crm_addresses(tc.probes, [])
    tc.probes.table("lt_blocked").clear()
    tc.kernel.drainer.on_enforcement = None


def hello(sni: bytes | None, *, src: str = BLOCK_SRC, sport: int, dst: str = SERVER4,
          **kw: Any) -> bytes:
    return tcp4(make_hello(sni, **kw), sport=sport, src=src, dst=dst)


def test_block_tenant_unsanctioned_instance_is_dropped_and_stays_blocked(enf: Enforced) -> None:
    flow = {"src": BLOCK_SRC, "sport": 50001}
    retvals, decisions, out = enf.run([
        hello(b"Evil.My.Salesforce.com", **flow),
        tcp4(b"POST /services/data HTTP/1.1\r\n", seq=2000, **flow),
        tcp4(b"", seq=3000, flags="R", **flow),
    ])

    assert retvals == [TC_ACT_SHOT, TC_ACT_SHOT, TC_ACT_OK]  # a bare RST passes
    [d] = decisions
    assert (d.tenant, d.action, d.reason) == ("acme", "blocked", "unsanctioned_instance")
    assert (d.vendor, d.crm_instance, d.host) == ("salesforce", "evil",
                                                  "evil.my.salesforce.com")
    assert (d.saddr, d.sport, d.daddr, d.dport, d.proto) == (BLOCK_SRC, 50001, SERVER4, 443, 6)
    assert out.changed()["cnt_enf_blocked_pkt"] == 1
    assert enf.policy.decision_counts(enf.tc.probes)[("acme", "blocked")] >= 1


@pytest.mark.parametrize("sni", [b"acme.my.salesforce.com", b"acme.lightning.force.com",
                                 b"acme.file.force.com", b"anyone.zendesk.com",
                                 b"example.com", b"login.salesforce.com", None])
def test_block_tenant_allowed_or_not_crm_passes_untouched(enf: Enforced, sni: bytes | None
                                                          ) -> None:
    retvals, decisions, _ = enf.run([hello(sni, sport=50010, dst=PLAIN_ADDR),
                                     tcp4(b"x" * 100, sport=50010, seq=3000, dst=PLAIN_ADDR)])

    assert retvals == [TC_ACT_OK, TC_ACT_OK] and decisions == []


def test_sandbox_is_its_own_instance(enf: Enforced) -> None:
    retvals, decisions, _ = enf.run([hello(b"acme--uat.sandbox.my.salesforce.com", sport=50011)])

    assert retvals == [TC_ACT_SHOT]
    assert [(d.crm_instance, d.reason) for d in decisions] == [
        ("acme--uat", "unsanctioned_instance")]


def test_dry_run_passes_and_records_would_block(enf: Enforced) -> None:
    flow = {"src": DRY_SRC, "sport": 50020}
    retvals, decisions, _ = enf.run([hello(b"evil.my.salesforce.com", **flow),
                                     tcp4(b"x" * 100, seq=3000, **flow)])

    assert retvals == [TC_ACT_OK, TC_ACT_OK]
    assert [(d.tenant, d.action, d.reason, d.crm_instance) for d in decisions] == [
        ("dry", "would_block", "unsanctioned_instance", "evil")]


@pytest.mark.parametrize("src", [MON_SRC, OTHER_SRC])
def test_monitor_and_unassigned_are_untouched(enf: Enforced, src: str) -> None:
    retvals, decisions, _ = enf.run([hello(b"evil.my.salesforce.com", src=src, sport=50030)])

    assert retvals == [TC_ACT_OK] and decisions == []


def test_ipv6_source_cidr(enf: Enforced) -> None:
    frame = tcp6(make_hello(b"evil.my.salesforce.com"), sport=50040, src=BLOCK6_SRC)

    retvals, decisions, _ = enf.run([frame])

    assert retvals == [TC_ACT_SHOT] and decisions[0].saddr == BLOCK6_SRC


def test_shared_hosts_blocked_only_when_configured(enf: Enforced) -> None:
    enf.apply(config(shared_hosts="block"))

    retvals, decisions, _ = enf.run([hello(b"login.salesforce.com", sport=50050),
                                     hello(b"login.salesforce.com", src=DRY_SRC, sport=50051)])

    assert retvals == [TC_ACT_SHOT, TC_ACT_OK]
    assert [(d.tenant, d.action, d.reason, d.vendor, d.crm_instance) for d in decisions] == [
        ("acme", "blocked", "shared_host", "salesforce", None),
        ("dry", "would_block", "shared_host", "salesforce", None)]


def test_ech_to_a_crm_address(enf: Enforced) -> None:
    retvals, decisions, _ = enf.run([
        hello(b"cloudflare-ech.com", ech=True, sport=50060, dst=CRM_ADDR),
        hello(b"cloudflare-ech.com", ech=True, sport=50061, dst=PLAIN_ADDR),
    ])

    assert retvals == [TC_ACT_SHOT, TC_ACT_OK]
    assert [(d.reason, d.daddr, d.host) for d in decisions] == [
        ("ech", CRM_ADDR, "cloudflare-ech.com")]
    enf.apply(config(ech="allow"))
    assert enf.run([hello(b"cloudflare-ech.com", ech=True, sport=50062, dst=CRM_ADDR)])[0] == [
        TC_ACT_OK]


def test_nameless_hello_to_a_crm_address_is_decided_by_address(enf: Enforced) -> None:
    retvals, decisions, _ = enf.run([hello(None, sport=50070, dst=CRM_ADDR),
                                     hello(None, sport=50071, dst=PLAIN_ADDR)])

    assert retvals == [TC_ACT_SHOT, TC_ACT_OK]
    assert [(d.reason, d.host, d.vendor) for d in decisions] == [("address", None, None)]


QUIC_INITIAL = b"\xc3\x00\x00\x00\x01" + b"\x08" + bytes(1194)


def test_quic_initial_to_a_crm_address(enf: Enforced) -> None:
    retvals, decisions, _ = enf.run([udp4(QUIC_INITIAL, sport=50080, src=BLOCK_SRC, dst=CRM_ADDR),
                                     udp4(QUIC_INITIAL, sport=50081, src=BLOCK_SRC,
                                          dst=PLAIN_ADDR)])

    assert retvals == [TC_ACT_SHOT, TC_ACT_OK]
    assert [(d.reason, d.proto, d.dport) for d in decisions] == [("quic", 17, 443)]
    enf.apply(config(quic="allow"))
    assert enf.run([udp4(QUIC_INITIAL, sport=50082, src=BLOCK_SRC, dst=CRM_ADDR)])[0] == [
        TC_ACT_OK]


def test_split_hello_is_judged_on_the_segment_that_completes_it(enf: Enforced) -> None:
    rec = make_hello(b"evil.my.salesforce.com", pq_bytes=1252, padding=380, sni_last=True)
    frames = [tcp4(rec[:MSS], sport=50090, src=BLOCK_SRC, seq=1000),
              tcp4(rec[MSS:], sport=50090, src=BLOCK_SRC, seq=1000 + MSS),
              tcp4(b"data", sport=50090, src=BLOCK_SRC, seq=1000 + len(rec))]

    retvals, decisions, _ = enf.run(frames)

    assert retvals == [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_SHOT]
    assert [(d.reason, d.crm_instance) for d in decisions] == [
        ("unsanctioned_instance", "evil")]


def test_hello_over_several_records_is_judged_by_address(enf: Enforced) -> None:
    # the kernel does not read a hello spread over records: to a CRM address, an
    # enforcing tenant's is decided there (never passed unjudged)
    multi = split_records(make_hello(b"evil.my.salesforce.com", seed=3), [1, 3, 50, 7])
    cut = len(multi) // 2
    frames = [tcp4(multi[:cut], sport=sport, src=BLOCK_SRC, dst=dst, seq=1000)
              for sport, dst in ((50120, CRM_ADDR), (50121, PLAIN_ADDR))]
    frames += [tcp4(multi[cut:], sport=sport, src=BLOCK_SRC, dst=dst, seq=1000 + cut)
               for sport, dst in ((50120, CRM_ADDR), (50121, PLAIN_ADDR))]

    retvals, decisions, _ = enf.run(frames)

    assert retvals == [TC_ACT_OK, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_OK]
    assert [(d.reason, d.daddr, d.sport) for d in decisions] == [("address", CRM_ADDR, 50120)]


def test_reload_lets_the_next_connection_through_and_keeps_flow_counts(enf: Enforced) -> None:
    assert enf.run([hello(b"evil.my.salesforce.com", sport=50100)])[0] == [TC_ACT_SHOT]
    # a flow counted before the reload, not drained yet
    data = tcp4(b"z" * 10, sport=50102, src=BLOCK_SRC, dst=PLAIN_ADDR)
    assert testrun.run_frame(enf.tc.probes.fd("egress"), data).retval == TC_ACT_OK

    cfg = config()
    cfg.tenants[0].allow.append("salesforce:evil")
    enf.apply(cfg)
    enf.apply(cfg)  # idempotent

    retvals, decisions, out = enf.run([hello(b"evil.my.salesforce.com", sport=50103)])
    assert retvals == [TC_ACT_OK] and decisions == []
    assert [(f.tx_packets, f.tx_bytes) for f in out.flows if f.key.sport == 50102] == [
        (1, len(data))]


def test_expire_blocked_stops_the_data_path_lookups(enf: Enforced) -> None:
    enf.run([hello(b"evil.my.salesforce.com", sport=50110)])
    on = enf.tc.probes.table("lt_blocked_on")
    assert int(on[on.Key(0)].value) == 1

    assert expire_blocked(enf.tc.probes, 0) >= 1

    assert int(on[on.Key(0)].value) == 0
    assert list(enf.tc.probes.table("lt_blocked").items()) == []
    # the flow is forgotten: its packets pass again (its socket is long gone)
    assert enf.run([tcp4(b"x", sport=50110, src=BLOCK_SRC, seq=5000)])[0] == [TC_ACT_OK]


def test_unenforceable_catalogue_rules_are_listed() -> None:
    policy = compile_policy(config())

    listed = [str(r) for r in policy.unenforceable_rules]
    # regexes too large to list (shared pod / regional hosts) are reported ...
    assert any("salesforce" in r and "(?P<region>" in r for r in listed)
    assert sum("hubspot" in r for r in listed) == 2 and len(listed) == 3
    # ... while Dynamics 365's instance regex and Zoho's hosts are listed as names
    assert all("dynamics" not in r and "zoho" not in r for r in listed)
    assert all("{instance}.my.salesforce.com" not in r for r in listed)


def test_regex_rules_listed_as_names_are_enforced(enf: Enforced) -> None:
    """Dynamics 365 instances (`{instance}.(api.)crmN.dynamics.com`, a regex rule)
    are judged in the kernel like template rules; its discovery host stays shared."""
    cfg = config(shared_hosts="block")
    cfg.tenants[0].allow.append("dynamics365:contoso")
    enf.apply(cfg)
    retvals, decisions, _ = enf.run([
        hello(b"contoso.api.crm4.dynamics.com", sport=50040),
        hello(b"contoso.crm.dynamics.com", sport=50041),
        hello(b"fabrikam.crm11.dynamics.com", sport=50042),
        hello(b"globaldisco.crm.dynamics.com", sport=50043),
        hello(b"accounts.zoho.eu", sport=50044),
    ])

    assert retvals == [TC_ACT_OK, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_SHOT, TC_ACT_SHOT]
    assert [(d.vendor, d.crm_instance, d.reason) for d in decisions] == [
        ("dynamics365", "fabrikam", "unsanctioned_instance"),
        ("dynamics365", None, "shared_host"),
        ("zoho", None, "shared_host"),
    ]


def test_tenant_index_is_the_config_position_plus_one() -> None:
    policy = compile_policy(config())

    assert [policy.tenant_index(n) for n in ("acme", "dry", "mon", "nobody")] == [1, 2, 3, None]


def test_decision_layout_matches_the_kernel_struct(tc: Harness) -> None:
    scratch = tc.probes.table("lt_sni_scratch").sLeaf
    dec = next(f[1] for f in scratch._fields_ if f[0] == "dec")

    assert dec.name.offset == DECISION_NAME_OFFSET == DECISION.size
    assert (dec.tenant.offset, dec.vendor.offset, dec.name_len.offset) == (64, 68, 76)
