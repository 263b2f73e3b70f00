"""Shared CRM hosts are not instances (issue 11.2): the catalogue names only the
vendor of a shared host, the flow says so (`shared`, `named_by`), the allow check
never pages a tenant for its own sign-in, `vendor:*` allows every instance, and an
inspected plaintext request names the instance behind a shared host."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR

from leaktap.analytics.allowlist import allows
from leaktap.analytics.buckets import Bucket
from leaktap.analytics.incidents import Incident
from leaktap.analytics.plaintext.instance import instance_from_request
from leaktap.analytics.settings import DetectionSettings
from leaktap.analytics.stream import StreamingDetector
from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.attribution.flows import FF_SYN, ConversationTable
from leaktap.controller.config import parse_config
from leaktap.controller.detection import LiveDetection
from leaktap.controller.errors import ConfigError
from leaktap.controller.kernel.maps import FlowCounters, FlowKey
from leaktap.controller.kernel.ringbuf import Sample
from leaktap.controller.storage import BucketKey, Store, Volume

CONFIG = """
tenants:
  - name: acme
    match: {cidrs: ["198.18.62.0/24"]}
    allow: ["salesforce:acme"]
  - name: initech
    match: {cidrs: ["198.18.63.0/24"]}
    allow: ["hubspot:*"]
"""
T0 = 1_800_000_000 - 1_800_000_000 % 60
REMOTE = ("198.18.64.9", 443)
SESSION = "00D5e000000AbCdEFG!AQ0AQFx.not-a-real-session-id"


def client_hello(sni: str) -> bytes:
    """A real ClientHello record from the ssl module."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def _conversation(attributor: Attributor, local: tuple[str, int], sni: str | None,
                  nbytes: int = 40_000) -> tuple[ConversationTable, FlowCounters]:
    key = FlowKey(0, 4, 6, 0, local[0], REMOTE[0], local[1], REMOTE[1])
    if sni is not None:
        data = client_hello(sni)
        attributor.on_sample(Sample(
            "tls_hello", time.monotonic_ns(), 0, 1, 4, 6, 0, local[0], REMOTE[0], local[1],
            REMOTE[1], 0x18, 1000, 1001, len(data), 0, data))
    now = time.monotonic_ns()
    counters = FlowCounters(key, nbytes, 30, now - 10**9, now, 1001, FF_SYN)
    table = ConversationTable()
    table.add(counters)
    return table, counters


def test_sign_in_hosts_are_shared_and_named_by_sni() -> None:
    attributor = Attributor(parse_config(CONFIG), live=False)
    for port, host in ((40001, "login.salesforce.com"), (40002, "test.salesforce.com")):
        table, _ = _conversation(attributor, ("198.18.62.1", port), host)
        names = attributor.names(next(iter(table.conversations.values())))
        assert (names.sni, names.tenant, names.crm_vendor, names.crm_instance) == (
            host, "acme", "salesforce", None)
        assert names.shared and names.named_by == "sni"
    table, _ = _conversation(attributor, ("198.18.62.1", 40003), "acme.my.salesforce.com")
    names = attributor.names(next(iter(table.conversations.values())))
    assert (names.crm_instance, names.shared, names.named_by) == ("acme", False, "sni")


def test_dns_named_shared_host_keeps_its_region() -> None:
    attributor = Attributor(parse_config(CONFIG), live=False)
    answer = DNS(id=7, qr=1, rd=1, ra=1, qd=DNSQR(qname="api-eu1.hubapi.com"),
                 an=DNSRR(rrname="api-eu1.hubapi.com", type="A", rdata=REMOTE[0], ttl=300))
    attributor.dns.learn_bytes(bytes(answer))
    table, _ = _conversation(attributor, ("198.18.63.1", 40010), None)
    names = attributor.names(next(iter(table.conversations.values())))
    assert (names.crm_vendor, names.crm_instance, names.shared, names.crm_region,
            names.named_by, names.tenant) == ("hubspot", None, True, "eu1", "dns", "initech")


def test_a_plaintext_org_id_refines_the_instance_with_named_by_plaintext() -> None:
    attributor = Attributor(parse_config(CONFIG), live=False)
    local = ("198.18.62.1", 40020)
    table, _ = _conversation(attributor, local, "api.salesforce.com")
    conv = next(iter(table.conversations.values()))
    assert attributor.names(conv).crm_instance is None
    named = instance_from_request(
        "GET", "/services/data/v60.0/sobjects",
        [("authorization", f"Bearer {SESSION}")], "api.salesforce.com")
    assert named == ("salesforce", "00D5e000000AbCd")
    assert attributor.refine_instance(4, local, REMOTE, *named)
    names = attributor.names(conv)
    assert (names.crm_vendor, names.crm_instance, names.shared, names.named_by) == (
        "salesforce", "00D5e000000AbCd", True, "plaintext")
    # the plaintext joins the same flow for later writes
    assert attributor.destination(4, local, REMOTE)[2].instance == "00D5e000000AbCd"  # type: ignore[union-attr]
    # a request cannot rename a host-named instance, nor name another vendor
    table2, _ = _conversation(attributor, ("198.18.62.1", 40021), "acme.my.salesforce.com")
    assert not attributor.refine_instance(4, ("198.18.62.1", 40021), REMOTE, *named)
    assert not attributor.refine_instance(4, local, REMOTE, "hubspot", "123")


@pytest.mark.parametrize(
    ("method", "path", "headers", "host", "expected"),
    [
        ("POST", "/services/oauth2/token?instance_url=https%3A%2F%2Facme.my.salesforce.com",
         [], "login.salesforce.com", ("salesforce", "acme")),
        ("GET", "/services/data/v60.0/query", [("authorization", f"OAuth {SESSION}")],
         "na123.salesforce.com", ("salesforce", "00D5e000000AbCd")),
        ("GET", "/", [("cookie", f"oid=1; sid={SESSION}")], "login.salesforce.com",
         ("salesforce", "00D5e000000AbCd")),
        ("POST", "/submissions/v3/integration/submit/2716371/4b2a-guid", [], "api.hsforms.com",
         ("hubspot", "2716371")),
        ("GET", "/contacts/v1/lists?portalId=62515&count=10", [], "api.hubapi.com",
         ("hubspot", "62515")),
        ("GET", "/crm/v2/Leads", [("x-crm-org", "60012345678")], "www.zohoapis.eu",
         ("zoho", "60012345678")),
        # nothing that names a customer
        ("GET", "/services/data/v60.0", [("authorization", "Bearer eyJhbGciOi")],
         "api.salesforce.com", None),
        ("GET", "/crm/v3/objects/contacts", [], "api.hubapi.com", None),
        ("GET", "/crm/v2/Leads", [("x-crm-org", "../etc")], "www.zohoapis.eu", None),
        ("GET", "/x", [("x-crm-org", "600123")], "example.com", None),
        ("GET", "/x", [("authorization", f"Bearer {SESSION}")], None, None),
    ],
)
def test_instance_from_request(method: str, path: str, headers: list[tuple[str, str]],
                               host: str | None, expected: tuple[str, str] | None) -> None:
    assert instance_from_request(method, path, headers, host) == expected


def test_allow_check() -> None:
    acme = frozenset({"salesforce:acme"})
    assert allows(acme, "salesforce", "acme")
    assert allows(acme, "salesforce", None) and allows(acme, "salesforce", "unknown")  # shared
    assert not allows(acme, "salesforce", "globex")
    assert not allows(acme, "hubspot", None)  # a vendor the tenant has no entry for
    # an org id named by plaintext is compared with org-id entries only
    assert allows(acme, "salesforce", "00D5e000000AbCd")
    by_org = frozenset({"salesforce:00D5e000000AbCd"})
    assert allows(by_org, "salesforce", "00D5e000000AbCd")
    assert not allows(by_org, "salesforce", "00D5e000000ZzZz")
    wildcard = frozenset({"hubspot:*"})
    assert allows(wildcard, "hubspot", "2716371") and allows(wildcard, "hubspot", None)
    assert not allows(wildcard, "salesforce", None)


def test_wildcard_allow_entries_validate() -> None:
    assert parse_config(CONFIG).tenants[1].allow == ["hubspot:*"]
    with pytest.raises(ConfigError, match="wildcard"):
        parse_config("tenants:\n  - name: a\n    allow: ['hubspot:12*']\n")


def _wait(got: list[Incident], n: int) -> None:
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_live_detection_never_pages_shared_sign_in_and_honours_wildcards(tmp_path: Path) -> None:
    store = Store(tmp_path / "lt.db")
    got: list[Incident] = []
    live = LiveDetection(parse_config(CONFIG), store, got.append)
    live.start()
    try:
        buckets = {
            BucketKey(T0, "acme", "salesforce", None, "login.salesforce.com"): Volume(90_000),
            BucketKey(T0, "acme", "salesforce", None, "test.salesforce.com"): Volume(90_000),
            BucketKey(T0, "acme", "salesforce", "acme", "acme.my.salesforce.com"): Volume(5000),
            BucketKey(T0, "initech", "hubspot", "2716371", "api.hsforms.com"): Volume(90_000),
            BucketKey(T0, "initech", "hubspot", None, "api.hubapi.com"): Volume(90_000),
        }
        live.add(buckets, now=T0 + 1)
        live.add({}, now=T0 + 61)  # the minute closes: the streaming detector scores it
        live.add({BucketKey(T0 + 60, "acme", "salesforce", "globex", "globex.my.salesforce.com"):
                  Volume(5000)}, now=T0 + 62)
        live.add({}, now=T0 + 121)
        _wait(got, 2)
        time.sleep(0.2)
    finally:
        live.stop()
        store.close()
    # only the real unsanctioned instance pages (at the poll, then folded by the detector)
    assert {(i.kind, i.tenant, i.crm_instance) for i in got} == {
        ("unsanctioned_destination", "acme", "globex")}


def test_detector_counts_shared_volume_in_the_tenant_total_without_a_page() -> None:
    settings = DetectionSettings()
    detector = StreamingDetector(settings, allow={"acme": ["salesforce:acme"]})
    incidents = []
    warm = settings.warmup_minutes + 2
    for m in range(warm + 3):
        ts = T0 + 60 * m
        incidents += detector.observe(Bucket(ts, "acme", "salesforce", "acme", 5000, 100))
        if m >= warm:  # sign-ins after the warm-up: shared, no instance
            incidents += detector.observe(Bucket(ts, "acme", "salesforce", "unknown", 90_000, 0))
    incidents += detector.flush() + detector.close_all()
    assert [i.kind for i in incidents] == []  # neither unsanctioned nor a new destination
    assert ("acme", "salesforce", "unknown") in detector._index  # the vendor series is kept


def test_the_inspector_reports_an_instance_a_request_names_once_per_connection() -> None:
    from leaktap.analytics.plaintext.inspector import ContentInspector, WriteContext
    from leaktap.analytics.plaintext.redact import KeyedHasher

    inspector = ContentInspector(KeyedHasher(b"k" * 32))
    ctx = WriteContext(("pid", 1), "acme", crm_vendor="salesforce", crm_instance=None,
                       destination="api.salesforce.com")
    request = (b"GET /services/data/v60.0/sobjects HTTP/1.1\r\nHost: api.salesforce.com\r\n"
               b"Authorization: Bearer " + SESSION.encode() + b"\r\n\r\n")
    first = inspector.inspect(ctx, request, len(request))
    assert first.named_instance == ("salesforce", "00D5e000000AbCd")
    again = inspector.inspect(ctx, request, len(request))
    assert again.requests == 1 and again.named_instance is None  # already named


def test_the_plaintext_monitor_hands_a_named_instance_to_the_flow() -> None:
    """The glue between inspection and attribution: the write's socket ends find the
    conversation the request named an instance for."""
    from collections import Counter
    from types import SimpleNamespace

    from leaktap.controller.plaintext.monitor import PlaintextMonitor

    attributor = Attributor(parse_config(CONFIG), live=False)
    local = ("198.18.63.1", 40030)
    table, _ = _conversation(attributor, local, "api.hubapi.com")
    ends = SimpleNamespace(family=4, local=local, remote=REMOTE)
    monitor = SimpleNamespace(
        attributor=attributor, counters=Counter(), _bindings={},
        sockets=SimpleNamespace(resolve=lambda tgid, fd: ends if (tgid, fd) == (77, 5) else None),
    )
    ev = SimpleNamespace(fd=5, tgid=77, ssl_ptr=1)
    PlaintextMonitor._refine_instance(monitor, ev, ("hubspot", "2716371"))  # type: ignore[arg-type]
    assert monitor.counters["instances_named"] == 1
    names = attributor.names(next(iter(table.conversations.values())))
    assert (names.crm_vendor, names.crm_instance, names.crm_region, names.named_by) == (
        "hubspot", "2716371", "na1", "plaintext")
