"""Content inspection of TLS plaintext, without the kernel: parsers, detectors, redaction."""

from __future__ import annotations

import base64
import json
import struct
import urllib.parse

import hpack
import numpy as np
import pytest

from leaktap.analytics.plaintext import artifacts, bulk
from leaktap.analytics.plaintext.canary import Canary, CanaryMatcher
from leaktap.analytics.plaintext.fields import FieldPolicy, classify_value
from leaktap.analytics.plaintext.http import HttpStream, ParseEvents, Request
from leaktap.analytics.plaintext.inspector import ContentInspector, TenantPolicy, WriteContext
from leaktap.analytics.plaintext.redact import KeyedHasher

HASHER = KeyedHasher(b"k" * 32)
TOKEN = "00D5g000004ABCD!AR8AQUnitTestBearerTokenValue3f9a"
CANARY = "CANARY-ACME-0001-7f3a"


def frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(
        4, "big") + payload


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")


def h2_headers(enc: hpack.Encoder, path: str, extra: list[tuple[str, str]] = ()) -> bytes:
    return enc.encode([(":method", "POST"), (":path", path), (":scheme", "https"),
                       (":authority", "api.hubapi.com"), *extra])


def feed(stream: HttpStream, *pieces: bytes | int) -> ParseEvents:
    """Bytes are fed, ints are gaps of that many bytes."""
    out = ParseEvents()
    for piece in pieces:
        if isinstance(piece, int):
            stream.gap(piece, out)
        else:
            stream.feed(piece, out)
    return out


def test_http1_body_is_followed_across_writes_by_content_length():
    conn = HttpStream()
    head = b"POST /a HTTP/1.1\r\nHost: x.test\r\nContent-Length: 10\r\n\r\n"
    first = feed(conn, head)
    second = feed(conn, b"01234", b"56789")
    third = feed(conn, b"GET /b HTTP/1.1\r\nHost: x.test\r\n\r\n")

    assert [m.request.path for m in first.heads] == ["/a"] and not first.done
    assert [(bytes(m.body), m.request.path, m.complete) for m in second.done] == [
        (b"0123456789", "/a", True)]
    assert [m.request.method for m in third.heads] == ["GET"]


def test_http1_head_over_the_bound_is_reported_and_the_next_request_is_found():
    conn = HttpStream()
    line = b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    out = feed(conn, line[:4096], line[4096:], b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r for r, _ in out.blind] == ["http1_head_over_bound"]
    assert [m.request.path for m in out.done] == ["/next"]


@pytest.mark.parametrize("data", [bytes(range(256)) * 4, b"\x16\x03\x01\x00" * 8])
def test_garbage_is_opaque_or_frames(data: bytes) -> None:
    conn = HttpStream()
    feed(conn, data)
    assert conn.protocol in ("opaque", "h2")


def test_h2_headers_decoded_with_the_connection_table_and_undecodable_after_a_loss():
    enc = hpack.Encoder()
    conn = HttpStream()
    block = h2_headers(enc, "/crm/v3/exports/export/async")
    out = feed(conn, PREFACE + frame(1, 4, 1, block) + frame(0, 1, 1, b'{"a":1}'))
    (msg,) = out.done
    req = msg.request
    assert (req.protocol, req.method, req.host) == ("h2", "POST", "api.hubapi.com")
    assert bytes(msg.body) == b'{"a":1}'
    # a header block partly in a gap: the table is unknown from then on
    lost = frame(1, 4, 5, h2_headers(enc, "/lost"))
    out = feed(conn, lost[:12], len(lost) - 12)
    assert [r for r, _ in out.blind] == ["h2_header_table_lost"]
    after = feed(conn, frame(1, 4, 7, h2_headers(enc, "/after")))
    assert after.undecodable_headers == 1 and not after.heads


def test_h2_attached_mid_connection_reports_undecodable():
    enc = hpack.Encoder()
    enc.encode([(":method", "GET")])  # the table has moved on before we attached
    conn = HttpStream()
    out = feed(conn, frame(1, 4, 9, h2_headers(enc, "/x")))
    assert conn.protocol == "h2" and out.undecodable_headers == 1


@pytest.mark.parametrize("wrap,form", [
    (lambda t: t, "raw"),
    (lambda t: urllib.parse.quote(f"note={t}/x", safe=""), "raw"),  # nothing to escape
    (lambda t: json.dumps({"n": t + "/\u00e9"})[1:], "raw"),
    (lambda t: base64.b64encode(f'{{"Body": "{t}"}}'.encode()).decode(), "base64"),
    (lambda t: base64.b64encode(f"ab{t}".encode()).decode(), "base64"),
    (lambda t: base64.urlsafe_b64encode(f"a??{t}".encode()).decode(), "base64"),
])
def test_canary_forms(wrap, form):
    matcher = CanaryMatcher([Canary(CANARY, "acme", "Account/1")])
    hits = matcher.scan(f"prefix {wrap(CANARY)} suffix".encode())
    assert hits and hits[0].canary.record == "Account/1"
    assert hits[0].form.startswith(form)


def test_url_encoded_canary_with_reserved_characters():
    token = "CANARY/acme+7f3a=="
    hits = CanaryMatcher([Canary(token, "acme", "r")]).scan(
        ("q=" + urllib.parse.quote_plus(token)).encode())
    assert [h.form for h in hits] == ["url"]


@pytest.mark.parametrize("method,path,body,operation", [
    ("POST", "/services/data/v59.0/jobs/ingest", b"", "salesforce:bulk2.ingest"),
    ("PUT", "/services/data/v59.0/jobs/ingest/750x/batches", b"", "salesforce:bulk2.ingest"),
    ("GET", "/services/data/v60.0/jobs/query/750x/results?maxRecords=5", b"",
     "salesforce:bulk2.query"),
    ("POST", "/services/async/59.0/job", b"<operation>query</operation>",
     "salesforce:bulk1.query"),
    ("POST", "/services/async/59.0/job", b'{"operation" : "hardDelete"}',
     "salesforce:bulk1.harddelete"),
    ("POST", "/services/async/59.0/job/750000000000001/batch", b"", "salesforce:bulk1.batch"),
    ("POST", "/crm/v3/exports/export/async", b"", "hubspot:export"),
    ("POST", "/api/data/v9.2/$batch", b"", "dynamics:batch"),
    ("POST", "/api/data/v9.2/accounts/Microsoft.Dynamics.CRM.CreateMultiple", b"",
     "dynamics:createmultiple"),
    ("POST", "/api/data/v9.2/UpsertMultiple", b"", "dynamics:upsertmultiple"),
    ("GET", "/api/v2/incremental/tickets/cursor.json?start_time=0", b"",
     "zendesk:incremental.tickets"),
    ("GET", "/services/data/v59.0/sobjects/Account/001", b"", None),
])
def test_bulk_operations(method, path, body, operation):
    call = bulk.classify(Request(method, path, [], "http/1.1"), body)
    assert (call.operation if call else None) == operation


def test_bulk_allow_list_prefixes_and_globs():
    assert bulk.allowed("salesforce:bulk2.query", ["salesforce:bulk2"])
    assert bulk.allowed("zendesk:incremental.tickets", ["zendesk:*"])
    assert not bulk.allowed("salesforce:bulk2query", ["salesforce:bulk2"])


@pytest.mark.parametrize("value,kind", [
    ("123-45-6789", "ssn"), ("123456789", "ssn"), ("4111 1111 1111 1111", "card"),
    ("4111 1111 1111 1112", "other"), ("jane.doe@example.com", "email"),
    ("+1 (415) 555-0100", "phone"), ("DE89 3704 0044 0532 0130 00", "iban"),
    ("enc:v1:AAAA", "ciphertext"), ("q83vEjRWeJq83vEjRWeJ+A/9Zw==", "ciphertext"),
    ("hello world", "other"),
])
def test_value_classes(value, kind):
    assert classify_value(value, ["enc:v1:"]) == kind


def test_fields_in_json_form_xml_and_csv():
    policy = FieldPolicy(["SSN__c", "Email"], ["enc:v1:"])
    cases = {
        "application/json": b'{"ssn__c": "123-45-6789", "Email": "enc:v1:abcdefgh"}',
        "application/x-www-form-urlencoded": b"a=1&Email=jane%40example.com",
        "application/xml": b"<Contact><SSN__c>123456789</SSN__c></Contact>",
        "text/csv": b"Name,Email\nJane,jane@example.com\n",
    }
    found = {ct: [(h.field, h.kind) for h in policy.scan(body, ct, HASHER)]
             for ct, body in cases.items()}
    assert found == {
        "application/json": [("SSN__c", "ssn")],
        "application/x-www-form-urlencoded": [("Email", "email")],
        "application/xml": [("SSN__c", "ssn")],
        "text/csv": [("Email", "email")],
    }


def _weights(dtype: str, n: int = 4096) -> bytes:
    return np.random.default_rng(3).normal(0, 0.02, n).astype(dtype).tobytes()


@pytest.mark.parametrize("data,fmt", [
    (struct.pack("<Q", 60) + b'{"w":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]}}',
     "safetensors"),
    (b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, "gguf"),
    (b"PK\x03\x04" + b"\x00" * 26 + b"archive/data.pkl", "pytorch_zip"),
    (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00", "pickle"),
    (_weights("float32"), "float32"),
    (_weights("float16"), "float16"),
    (np.random.default_rng(4).bytes(8192), None),
    (("lorem ipsum " * 800).encode(), None),
    (json.dumps([{"Id": i, "Amount": i * 1.5} for i in range(300)]).encode(), None),
])
def test_model_artifacts(data, fmt):
    hit = artifacts.detect(data)
    assert (hit.format if hit else None) == fmt


def inspector() -> ContentInspector:
    return ContentInspector(
        HASHER, CanaryMatcher([Canary(CANARY, "acme", "Account/1", "prod")]),
        {"acme": TenantPolicy(FieldPolicy(["SSN__c"]), ("salesforce:bulk2.query",))},
        lambda host: ("salesforce", host.split(".")[0]) if host.endswith(".salesforce.com")
        else None)


def request(path: str, body: bytes = b"", token: str = TOKEN, method: str = "POST") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: acme.my.salesforce.com\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_token_reuse_across_tenants_and_environments_and_evidence_is_redacted():
    ins = inspector()
    data = request("/services/data/v59.0/sobjects/Contact",
                   json.dumps({"SSN__c": "123-45-6789", "Note": CANARY}).encode())
    first = ins.inspect(WriteContext(1, "acme", "prod"), data, len(data))
    same = ins.inspect(WriteContext(2, "acme", "prod"), data, len(data))
    other_env = ins.inspect(WriteContext(3, "acme", "staging"), data, len(data))
    other_tenant = ins.inspect(WriteContext(4, "globex", "prod"), data, len(data))

    assert sorted(f.kind for f in first.findings) == ["canary_token", "unencrypted_field"]
    assert not [f for f in same.findings if f.kind == "oauth_token_reuse"]
    (env,) = [f for f in other_env.findings if f.kind == "oauth_token_reuse"]
    (ten,) = [f for f in other_tenant.findings if f.kind == "oauth_token_reuse"]
    assert env.evidence["scope"] == "environments" and ten.evidence["scope"] == "tenants"
    assert env.dedup_key == ten.dedup_key  # one alert per token
    assert (ten.crm_vendor, ten.crm_instance) == ("salesforce", "acme")
    everything = json.dumps([f.__dict__ for r in (first, other_env, other_tenant)
                             for f in r.findings], default=str)
    for secret in (TOKEN, CANARY, "123-45-6789", "123456789"):
        assert secret not in everything
    assert "Bearer ****3f9a" in everything


def test_bulk_audit_for_every_call_and_alert_only_outside_the_allowed_list():
    ins = inspector()
    ok = request("/services/data/v59.0/jobs/query", b'{"query": "SELECT Id FROM Account"}')
    bad = request("/services/data/v59.0/jobs/ingest", b'{"object": "Account"}')
    r1 = ins.inspect(WriteContext(1, "acme"), ok, len(ok))
    r2 = ins.inspect(WriteContext(1, "acme"), bad, len(bad))
    assert [(a.operation, a.allowed, a.crm_instance) for a in r1.audits + r2.audits] == [
        ("salesforce:bulk2.query", True, "acme"), ("salesforce:bulk2.ingest", False, "acme")]
    assert not r1.findings and [f.kind for f in r2.findings] == ["bulk_export"]
    assert "?" not in r1.audits[0].path


def test_hasher_needs_a_real_key_and_is_keyed():
    with pytest.raises(ValueError):
        KeyedHasher(b"short")
    assert KeyedHasher(b"a" * 32).hash(TOKEN) != KeyedHasher(b"b" * 32).hash(TOKEN)
