"""CRM catalogue: every shipped rule, look-alikes, config precedence, bad rules."""

from __future__ import annotations

import pytest

from leaktap.controller.attribution.catalogue import CrmCatalogue, CrmMatch, host_pattern_regex
from leaktap.controller.config import CatalogueEntry
from leaktap.controller.errors import ConfigError

CAT = CrmCatalogue()


@pytest.mark.parametrize(
    ("host", "vendor", "instance"),
    [
        # Salesforce
        ("acme.my.salesforce.com", "salesforce", "acme"),
        ("acme--uat.sandbox.my.salesforce.com", "salesforce", "acme--uat"),
        ("acme.lightning.force.com", "salesforce", "acme"),
        ("acme--uat.sandbox.lightning.force.com", "salesforce", "acme--uat"),
        ("acme.my.site.com", "salesforce", "acme"),
        ("acme--uat.sandbox.my.site.com", "salesforce", "acme--uat"),
        ("acme.file.force.com", "salesforce", "acme"),
        ("acme--uat.sandbox.file.force.com", "salesforce", "acme--uat"),
        # Dynamics 365
        ("contoso.crm.dynamics.com", "dynamics365", "contoso"),
        ("contoso.crm4.dynamics.com", "dynamics365", "contoso"),
        ("contoso.crm11.dynamics.com", "dynamics365", "contoso"),
        ("contoso.api.crm.dynamics.com", "dynamics365", "contoso"),
        ("contoso.api.crm4.dynamics.com", "dynamics365", "contoso"),
        # Zendesk
        ("acme.zendesk.com", "zendesk", "acme"),
        # Pipedrive
        ("acme.pipedrive.com", "pipedrive", "acme"),
    ],
)
def test_shipped_rules(host: str, vendor: str, instance: str | None) -> None:
    assert CAT.lookup(host) == CrmMatch(vendor, instance, host)


# Hosts that serve every customer of their vendor (issue 11.2): vendor, no instance,
# shared, and the data centre when the host says.
SHARED_HOSTS = [
    ("login.salesforce.com", "salesforce", None),
    ("test.salesforce.com", "salesforce", None),
    ("api.salesforce.com", "salesforce", None),
    ("na123.salesforce.com", "salesforce", "na123"),
    ("eu12.salesforce.com", "salesforce", "eu12"),
    ("api.hubapi.com", "hubspot", "na1"),
    ("api.hubspot.com", "hubspot", "na1"),
    ("app.hubspot.com", "hubspot", "na1"),
    ("api.hsforms.com", "hubspot", "na1"),
    ("api-eu1.hubapi.com", "hubspot", "eu1"),
    ("app-eu1.hubspot.com", "hubspot", "eu1"),
    ("globaldisco.crm.dynamics.com", "dynamics365", None),
    ("www.zohoapis.com", "zoho", "com"),
    ("www.zohoapis.eu", "zoho", "eu"),
    ("www.zohoapis.in", "zoho", "in"),
    ("www.zohoapis.com.au", "zoho", "com.au"),
    ("www.zohoapis.jp", "zoho", "jp"),
    ("www.zohoapis.ca", "zoho", "ca"),
    ("www.zohoapis.sa", "zoho", "sa"),
    ("www.zohoapis.uk", "zoho", "uk"),
    ("www.zohoapis.com.cn", "zoho", "com.cn"),
    ("accounts.zoho.com", "zoho", "com"),
    ("accounts.zoho.eu", "zoho", "eu"),
    ("accounts.zoho.com.cn", "zoho", "com.cn"),
    ("crm.zoho.eu", "zoho", "eu"),
    ("api.pipedrive.com", "pipedrive", None),
    ("oauth.pipedrive.com", "pipedrive", None),
]


@pytest.mark.parametrize(("host", "vendor", "region"), SHARED_HOSTS)
def test_shared_hosts_name_the_vendor_only(host: str, vendor: str, region: str | None) -> None:
    assert CAT.lookup(host) == CrmMatch(vendor, None, host, shared=True, region=region)


def test_the_catalogue_header_lists_every_shared_host() -> None:
    from importlib import resources

    text = resources.files("leaktap.controller").joinpath("data", "crm_catalogue.yaml").read_text()
    header = text.split("\nrules:", 1)[0]
    for host in ("login.salesforce.com", "test.salesforce.com", "api.salesforce.com",
                 "api.hubapi.com", "api.hubspot.com", "api-eu1.hubapi.com",
                 "globaldisco.crm.dynamics.com", "api.pipedrive.com", "oauth.pipedrive.com"):
        assert host in header
        assert CAT.lookup(host) is not None and CAT.lookup(host).shared  # type: ignore[union-attr]
    for vendor, names_customer in (("salesforce", "yes"), ("hubspot", "no"),
                                   ("dynamics365", "yes"), ("zendesk", "yes"), ("zoho", "no"),
                                   ("pipedrive", "yes")):
        assert f"#   {vendor:<11} {names_customer}" in header


def test_site_entries_may_be_shared() -> None:
    cat = CrmCatalogue([CatalogueEntry(vendor="inhouse", pattern="sso.corp.example", shared=True)])
    assert cat.lookup("sso.corp.example") == CrmMatch("inhouse", None, "sso.corp.example", True)


@pytest.mark.parametrize(
    "rule",
    [
        {"vendor": "x", "host": "a.example", "shared": True, "instance": "a"},
        {"vendor": "x", "host": "{instance}.example", "shared": True},
        {"vendor": "x", "host": "a.example", "region": "eu"},
        {"vendor": "x", "host": "a.example", "shared": "yes"},
    ],
)
def test_bad_shared_rules_are_config_errors(rule: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        CrmCatalogue(shipped=[rule])


@pytest.mark.parametrize(
    "host",
    ["ACME.My.SalesForce.COM.", "acme.my.salesforce.com.", " acme.my.salesforce.com"],
)
def test_case_and_trailing_dot(host: str) -> None:
    assert CAT.lookup(host) == CrmMatch("salesforce", "acme", "acme.my.salesforce.com")


@pytest.mark.parametrize(
    "host",
    [
        "evil-salesforce.com",
        "salesforce.com.evil.net",
        "my.salesforce.com.evil.net",
        "acme.my.salesforce.com.evil.net",
        "acme.my-salesforce.com",
        "acmemy.salesforce.com",
        "my.salesforce.com",
        "a.b.my.salesforce.com",
        "login.salesforce.com.evil.net",
        "xlogin.salesforce.com",
        "evil.lightning.force.com.attacker.io",
        "lightning.force.com",
        "api.hubapi.com.evil.net",
        "api-eu1.hubapi.co",
        "apixhubapi.com",
        "contoso.crm.dynamics.com.evil.net",
        "contoso.crmx.dynamics.com",
        "contoso.crm123.dynamics.com",
        "dynamics.com",
        "zendesk.com",
        "www.zendesk.com",
        "acme.zendesk.com.evil.net",
        "acme.zendesk.co",
        "www.zohoapis.evil",
        "www.zohoapis.com.evil.net",
        "accounts.zoho.com.au.evil.net",
        "wwwxzohoapis.com",
        "pipedrive.com",
        "www.pipedrive.com",
        "acme.pipedrive.com.evil.net",
        "example.com",
        "",
        "a" * 300,
    ],
)
def test_look_alikes_and_non_crm(host: str) -> None:
    assert CAT.lookup(host) is None


def test_none_host() -> None:
    assert CAT.lookup(None) is None


def test_config_entries_take_precedence() -> None:
    cat = CrmCatalogue([
        CatalogueEntry(vendor="salesforce-gov", pattern="{instance}.my.salesforce.com"),
        CatalogueEntry(vendor="inhouse", pattern="crm.corp.example", instance="main"),
        CatalogueEntry(vendor="inhouse", pattern="*.crm.corp.example"),
    ])
    assert cat.lookup("acme.my.salesforce.com") == CrmMatch(
        "salesforce-gov", "acme", "acme.my.salesforce.com")
    assert cat.lookup("crm.corp.example") == CrmMatch("inhouse", "main", "crm.corp.example")
    assert cat.lookup("eu.crm.corp.example") == CrmMatch("inhouse", None, "eu.crm.corp.example")
    assert cat.lookup("a.b.crm.corp.example") is None  # '*' stays inside one label
    assert cat.lookup("acme.zendesk.com") == CrmMatch("zendesk", "acme", "acme.zendesk.com")


@pytest.mark.parametrize(
    "rule",
    [
        {"vendor": "x", "host": "{tenant}.example.com"},
        {"vendor": "x", "host": "{instance}.{instance}.example.com"},
        {"vendor": "x", "regex": "("},
        {"vendor": "x"},
        {"vendor": "x", "host": "a.example", "regex": "a"},
        {"vendor": "Bad Vendor", "host": "a.example"},
        {"vendor": "x", "host": "a.example", "colour": "red"},
    ],
)
def test_bad_rules_are_config_errors(rule: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        CrmCatalogue(shipped=[rule])


def test_pattern_regex_escapes_literals() -> None:
    assert host_pattern_regex("a.b") == r"a\.b"
    assert "(?P<instance>" in host_pattern_regex("{instance}.x")


def test_yaml_documents_instance_naming() -> None:
    from importlib import resources

    text = resources.files("leaktap.controller").joinpath("data", "crm_catalogue.yaml").read_text()
    for vendor in ("salesforce", "hubspot", "dynamics365", "zendesk", "zoho", "pipedrive"):
        assert f"#   {vendor}" in text
    assert len(CAT) >= 20
