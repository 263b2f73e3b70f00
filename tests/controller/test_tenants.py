"""Tenant resolution: rule precedence, SNI capture, CIDRs, the unassigned fallback."""

from __future__ import annotations

import time

import pytest

from leaktap.controller.attribution.tenants import TenantResolver
from leaktap.controller.config import TenantConfig, TenantMatch, parse_config


def tenant(name: str, **match: object) -> TenantConfig:
    return TenantConfig(name=name, match=TenantMatch(**match))  # type: ignore[arg-type]


TENANTS = [
    tenant("acme", cgroup="/tenants/acme*", uids=[1001], cidrs=["198.18.1.0/24"],
           sni="{tenant}.my.salesforce.com"),
    tenant("beta", cgroup="/tenants/beta/*", uids=[1002, 1001],
           cidrs=["198.18.0.0/16", "2001:db8:b::/48"]),
    tenant("Gamma", sni="{tenant}.lightning.force.com"),
    tenant("delta", sni="*.delta-crm.example"),
]
R = TenantResolver(TENANTS)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("/tenants/acme-7/app.scope", None, None, None), "acme"),
        (("/tenants/beta/worker.scope", None, None, None), "beta"),
        (("/tenants/beta", None, None, None), "unassigned"),  # glob needs a child
        ((None, 1001, None, None), "acme"),  # first tenant in config order wins
        ((None, 1002, None, None), "beta"),
        ((None, None, "198.18.1.77", None), "acme"),
        ((None, None, "198.18.2.1", None), "beta"),
        ((None, None, "2001:db8:b::1", None), "beta"),
        ((None, None, "2001:db8:c::1", None), "unassigned"),
        ((None, None, "::ffff:198.18.1.77", None), "unassigned"),
        ((None, None, "not-an-ip", None), "unassigned"),
        ((None, None, None, "acme.my.salesforce.com"), "acme"),
        ((None, None, None, "BETA.my.salesforce.com."), "beta"),
        ((None, None, None, "gamma.lightning.force.com"), "Gamma"),
        ((None, None, None, "gamma.my.salesforce.com"), "Gamma"),
        ((None, None, None, "unknown.my.salesforce.com"), "unassigned"),
        ((None, None, None, "x.acme.my.salesforce.com"), "unassigned"),
        ((None, None, None, "acme.my.salesforce.com.evil.net"), "unassigned"),
        ((None, None, None, "eu.delta-crm.example"), "delta"),
        ((None, None, None, "delta-crm.example"), "unassigned"),
        ((None, None, None, None), "unassigned"),
        (("", None, "", ""), "unassigned"),
    ],
)
def test_single_rules(
    args: tuple[str | None, int | None, str | None, str | None], expected: str
) -> None:
    assert R.resolve(*args) == expected


def test_rule_kind_precedence_over_config_order() -> None:
    # cgroup beats uid beats CIDR beats SNI, whatever the tenants' order
    assert R.resolve("/tenants/beta/x", 1001, "198.18.1.1", "acme.my.salesforce.com") == "beta"
    assert R.resolve("/other", 1002, "198.18.1.1", "acme.my.salesforce.com") == "beta"
    assert R.resolve(None, 4242, "198.18.2.2", "acme.my.salesforce.com") == "beta"
    assert R.resolve(None, None, "203.0.113.1", "acme.my.salesforce.com") == "acme"


def test_sni_capture_keeps_looking_when_tenant_unknown() -> None:
    r = TenantResolver([
        tenant("first", sni="{tenant}.my.salesforce.com"),
        tenant("second", sni="*.my.salesforce.com"),
    ])
    assert r.resolve(sni="first.my.salesforce.com") == "first"
    assert r.resolve(sni="nobody.my.salesforce.com") == "second"


def test_from_yaml_config() -> None:
    cfg = parse_config(
        "tenants:\n"
        "  - name: acme\n"
        "    match: {cgroup: \"/tenants/acme*\", uids: [1001], cidrs: [\"198.18.1.0/24\"],\n"
        "            sni: \"{tenant}.my.salesforce.com\"}\n"
    )
    r = TenantResolver(cfg.tenants)
    assert r.resolve(sni="acme.my.salesforce.com") == "acme"
    assert r.resolve(src_ip="198.18.1.9") == "acme"


def test_empty_config() -> None:
    assert TenantResolver([]).resolve("/x", 0, "198.18.0.1", "a.example") == "unassigned"


def test_fast() -> None:
    tenants = [tenant(f"t{i}", cgroup=f"/tenants/t{i}/*", cidrs=[f"10.{i}.0.0/16"],
                      sni="{tenant}.my.salesforce.com") for i in range(50)]
    r = TenantResolver(tenants)
    start = time.perf_counter()
    for i in range(20000):
        r.resolve(f"/tenants/t{i % 50}/app", None, None, None)
        r.resolve(None, None, None, f"t{i % 50}.my.salesforce.com")
    assert time.perf_counter() - start < 2.0


def test_shared_address_leaves_the_instance_unknown() -> None:
    """DNS attribution: names of one address that disagree on the instance (or the
    vendor) must not be resolved by picking one of them."""
    from leaktap.controller.attribution.attributor import Attributor
    from leaktap.controller.config import LeaktapConfig

    attributor = Attributor(LeaktapConfig(), live=False)
    same = ["acme.my.salesforce.com", "acme.my.salesforce.com"]
    two_instances = ["acme.my.salesforce.com", "globex.my.salesforce.com"]
    two_vendors = ["acme.my.salesforce.com", "api.hubapi.com"]
    crm = attributor._crm_by_dns(same)
    assert crm is not None and (crm.vendor, crm.instance) == ("salesforce", "acme")
    crm = attributor._crm_by_dns(two_instances)
    assert crm is not None and (crm.vendor, crm.instance) == ("salesforce", None)
    assert attributor._crm_by_dns(two_vendors) is None
    assert attributor._crm_by_dns(["example.org"]) is None
