"""Exact data match (issue 15): normalisation, sets built from generated records,
findings through ContentInspector, precision on realistic writes not in the set."""

from __future__ import annotations

import json
import random

import pytest

from leaktap.analytics.plaintext.fingerprints import (
    COMMON_VALUE_ROWS,
    FingerprintIndex,
    SetArrays,
    SetBuilder,
    SetInfo,
    ValueHasher,
    fingerprint_key,
    normalise,
)
from leaktap.analytics.plaintext.inspector import ContentInspector, WriteContext
from leaktap.analytics.plaintext.redact import KeyedHasher
from tests.analytics.fingerprint_data import (
    as_csv,
    as_json,
    as_paragraph,
    contacts,
    realistic_write,
)

SECRET = b"s" * 32
COLUMNS = ("name", "email", "phone")
SET_ROWS = 20_000


@pytest.mark.parametrize(("a", "b"), [
    ("Jane  Smith", "jane smith"),
    ("ＪＡＮＥ\u00a0SMITH", "jane smith"),  # NFKC: full-width letters, no-break space
    ("Straße", "STRASSE"),  # casefold
    ("Jane.Doe@Example.COM", "jane.doe@example.com"),
    ("+1 (555) 010-2345", "+15550102345"),
    ("+1.555.010.2345", "1 555 010 2345"),
])
def test_normalised_forms_are_equal(a: str, b: str) -> None:
    assert normalise(a) == normalise(b)
    assert normalise(a) is not None


def test_normalise_keeps_phone_digits_and_rejects_short_values() -> None:
    assert normalise("+1 (555) 010-2345") == (b"+15550102345", 0)
    assert normalise("Jane Smith") == (b"jane smith", 2)
    assert normalise("ab") is None
    assert normalise("   ") is None


@pytest.fixture(scope="module")
def records() -> list[dict[str, str]]:
    return list(contacts(SET_ROWS, seed=15))


def _arrays(records: list[dict[str, str]]) -> SetArrays:
    builder = SetBuilder(ValueHasher(fingerprint_key(KeyedHasher(SECRET))), COLUMNS)
    for r in records:
        builder.add_row([r[c] for c in COLUMNS])
    return builder.finish()


def _index(records: list[dict[str, str]], tenant: str = "acme",
           min_matches: int = 3) -> FingerprintIndex:
    return FingerprintIndex([(SetInfo(tenant, "contacts", COLUMNS, min_matches),
                              _arrays(records))], generation=1)


@pytest.fixture(scope="module")
def index(records: list[dict[str, str]]) -> FingerprintIndex:
    return _index(records)


def _inspector(index: FingerprintIndex) -> ContentInspector:
    insp = ContentInspector(KeyedHasher(SECRET))
    insp.fingerprints.replace(index)
    insp.fingerprints.allow = {"acme": ("salesforce:acme",), "globex": ("salesforce:globex",)}
    return insp


_conn = iter(range(1, 1 << 30))


def _write(insp: ContentInspector, tenant: str, instance: str | None, body: bytes,
           content_type: str = "application/json") -> list:
    host = f"{instance or 'unknown'}.my.salesforce.com"
    head = (f"POST /services/data/v59.0/composite HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    ctx = WriteContext(conn=next(_conn), tenant=tenant, crm_vendor="salesforce" if instance
                       else None, crm_instance=instance, destination=host, pid=4242,
                       comm="crm-sync")
    data = head + body
    return [f for f in insp.inspect(ctx, data, len(data)).findings
            if f.kind == "proprietary_data"]


@pytest.mark.parametrize("form", ["json", "csv", "paragraph"])
def test_three_rows_of_acme_written_by_globex_raise_one_critical_finding(
        index: FingerprintIndex, records: list[dict[str, str]], form: str) -> None:
    rows = records[100:103]
    body = {"json": as_json, "csv": lambda r: as_csv(r, list(COLUMNS)),
            "paragraph": as_paragraph}[form](rows)
    found = _write(_inspector(index), "globex", "globex", body,
                   "text/csv" if form == "csv" else "application/json")
    assert len(found) == 1
    f = found[0]
    assert (f.tenant, f.severity, f.crm_instance) == ("globex", "critical", "globex")
    ev = f.evidence
    assert (ev["owner_tenant"], ev["set"]) == ("acme", "contacts")
    assert ev["values_matched"] == 9 and ev["rows_matched"] == 3
    assert ev["rows_with_several_columns"] == 3
    assert ev["columns_matched"] == list(COLUMNS)
    assert ev["process"] == "crm-sync" and ev["destination"] == "globex.my.salesforce.com"
    text = repr(f)  # nothing of the values in the finding
    for r in rows:
        for c in COLUMNS:
            assert r[c] not in text and r[c].lower() not in text
    assert "Smith" not in text


def test_owner_writing_to_its_own_instance_is_no_alert_elsewhere_critical(
        index: FingerprintIndex, records: list[dict[str, str]]) -> None:
    body = as_json(records[200:203])
    insp = _inspector(index)
    assert _write(insp, "acme", "acme", body) == []
    assert insp.stats["fingerprint_home_writes"] == 1
    elsewhere = _write(insp, "acme", "globex", body)
    assert [f.severity for f in elsewhere] == ["critical"]
    unknown = _write(insp, "acme", None, body)
    assert [f.evidence["owner_tenant"] for f in unknown] == ["acme"]


def test_two_columns_of_one_row_alert_below_min_matches(
        index: FingerprintIndex, records: list[dict[str, str]]) -> None:
    r = records[300]
    found = _write(_inspector(index), "globex", "globex",
                   f'{{"note": "ask {r["name"]} about it", "to": "{r["email"]}"}}'.encode())
    assert len(found) == 1 and found[0].evidence["values_matched"] == 2
    assert found[0].evidence["rows_with_several_columns"] == 1


def test_values_of_different_rows_below_min_matches_are_no_alert(
        index: FingerprintIndex, records: list[dict[str, str]]) -> None:
    body = f'{{"a": "{records[1]["email"]}", "b": "{records[2]["phone"]}"}}'.encode()
    insp = _inspector(index)
    assert _write(insp, "globex", "globex", body) == []
    matches = insp.fingerprints.scan([body])
    assert [(m.values, m.rows_several, m.alerting) for m in matches] == [(2, 0, False)]


def test_value_in_many_rows_is_dropped_at_build() -> None:
    hasher = ValueHasher(fingerprint_key(KeyedHasher(SECRET)))
    builder = SetBuilder(hasher, ("city", "email"))
    for i in range(COMMON_VALUE_ROWS + 5):
        builder.add_row(["Springfield", f"user{i}@example.com"])
    arrays = builder.finish()
    assert builder.stats.common_values == 1 and builder.stats.values == COMMON_VALUE_ROWS + 5
    assert hasher.value_key(b"springfield") not in arrays.keys.tolist()


def _exclusions(records: list[dict[str, str]]) -> set[str]:
    return {v for r in records for v in (r["name"], r["email"], r["phone"])}


def test_no_false_match_on_5000_realistic_writes_not_in_the_set(
        index: FingerprintIndex, records: list[dict[str, str]]) -> None:
    insp = _inspector(index)
    rng = random.Random(99)
    exclude = _exclusions(records)
    alerting = partial = 0
    for _ in range(5000):
        body = realistic_write(rng, exclude=exclude)
        for m in insp.fingerprints.scan([body]):
            partial += 1
            alerting += m.alerting
    assert alerting == 0
    assert partial < 50  # single shared values only, and rarely


def test_prefilter_hashes_few_tokens_of_new_writes_and_never_hides_a_value(
        index: FingerprintIndex, records: list[dict[str, str]]) -> None:
    insp = _inspector(index)
    matcher = insp.fingerprints
    assert index.prefilter is not None
    rng = random.Random(5)
    exclude = _exclusions(records)
    for _ in range(200):  # every token of these writes is new: names, e-mails, phones
        matcher.scan([realistic_write(rng, exclude=exclude)])
    tokens, hashed = (matcher.stats["fingerprint_tokens"],
                      matcher.stats["fingerprint_tokens_hashed"])
    assert tokens > 200 * 500 and hashed < tokens // 100  # < 1% go on to BLAKE2s
    assert matcher.stats["fingerprint_tokens_unfiltered"] == 0
    # every value of the set passes (JSON, CSV, free text), whatever came before
    for form in (as_json, as_paragraph, lambda r: as_csv(r, list(COLUMNS))):
        for start in range(0, SET_ROWS, SET_ROWS // 40):
            found = matcher.scan([form(records[start:start + 3])])
            assert [(m.values, m.rows_several) for m in found] == [(9, 3)], start


def test_set_built_before_the_prefilter_still_matches_every_token_hashed(
        index: FingerprintIndex, records: list[dict[str, str]]) -> None:
    from dataclasses import replace as dc_replace

    sets = [(info, dc_replace(arrays, prefilter_keys=None)) for info, arrays in
            [(index.sets[0], _arrays(records))]]
    legacy = FingerprintIndex(sets, generation=3)
    assert legacy.prefilter is None
    matcher = _inspector(legacy).fingerprints
    found = matcher.scan([as_json(records[40:43])])
    assert [(m.values, m.rows) for m in found] == [(9, 3)]
    assert matcher.stats["fingerprint_tokens_unfiltered"] == matcher.stats["fingerprint_tokens"]


def test_a_scan_running_while_the_sets_change_keeps_the_index_it_started_with(
        index: FingerprintIndex, records: list[dict[str, str]]) -> None:
    matcher = _inspector(index).fingerprints
    old = matcher.index
    matcher.replace(_index(records[:10], tenant="globex"))
    assert len(matcher.value_keys(as_json(records[500:503]), old)) == 9  # the old sets
    assert matcher.value_keys(as_json(records[500:503])) == set()
    assert [m.info.tenant for m in matcher.scan([as_json(records[:3])])] == ["globex"]


def test_tokens_are_the_words_digit_runs_and_phone_candidates_in_order() -> None:
    from leaktap.analytics.plaintext.fingerprints import tokenise

    words, phones = tokenise("Jane O'Neil: +1 (555) 010-2345, ＪＯＳÉ x".encode())
    assert words == [b"jane", b"o", b"neil", b"1", b"555", b"010", b"2345", "josé".encode(),
                     b"x"]
    # spaces deleted, then spaces separating: "555" alone is too short to be a phone
    assert phones == [b"+15550102345", b"+0102345"]
    words, phones = tokenise(b"1-555-010-2345 2 days")
    assert phones == [b"+155501023452", b"+15550102345"] and b"days" in words


@pytest.mark.parametrize("text", [
    "call +1 (555) 010-2345 today", "call 1.555.010.2345", "tel:15550102345",
    "1-555-010-2345 2 days ago", "phones 42, 1 555 010 2345",
])
def test_phone_numbers_are_found_however_written(text: str) -> None:
    from leaktap.analytics.plaintext.fingerprints import tokenise

    assert b"+15550102345" in tokenise(text.encode())[1]


def test_finding_goes_through_the_alert_lifecycle_once_per_destination(
        tmp_path, index: FingerprintIndex, records: list[dict[str, str]]) -> None:
    from leaktap.analytics.alert_settings import AlertsSettings
    from leaktap.analytics.alerts import AlertManager
    from leaktap.controller.storage import Store

    store = Store(tmp_path / "lt.db")
    settings = AlertsSettings.model_validate({"suppression": {"proprietary_data": 60}})
    alerts = AlertManager(store.path, settings=settings)
    insp = _inspector(index)
    for rows in (records[600:603], records[700:703]):  # two writes, same destination
        for f in _write(insp, "globex", "globex", as_json(rows)):
            alerts.record(f)
    listed = alerts.list_alerts(kind="proprietary_data")
    assert len(listed) == 1 and listed[0]["count"] == 2
    assert (listed[0]["tenant"], listed[0]["severity"]) == ("globex", "critical")
    assert listed[0]["evidence"]["owner_tenant"] == "acme"
    stored = (tmp_path / "lt.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("lt.db-*"))
    for r in records[600:603] + records[700:703]:
        assert r["email"].encode() not in stored and r["name"].encode() not in stored
    alerts.close()
    store.close()


def test_non_ascii_values_match_raw_escaped_and_full_width() -> None:
    people = [{"name": "José Núñez", "email": "jose.nunez@example.es", "phone": "+34 612 345 678"},
              {"name": "Zoë Ångström", "email": "zoe@example.se", "phone": "+46 70 123 45 67"},
              {"name": "Renée Faÿ", "email": "renee@example.fr", "phone": "+33 6 12 34 56 78"}]
    idx = _index(people)
    insp = _inspector(idx)
    escaped = as_json(people)  # json.dumps escapes: \u00e9 ...
    assert b"\\u00e9" in escaped
    raw = json.dumps({"records": people}, ensure_ascii=False).encode()
    wide = "contacts: ＪＯＳÉ ＮÚÑＥＺ, ZOË ÅNGSTRÖM and RENÉE FAŸ".encode()
    for body in (escaped, raw):
        found = _write(insp, "globex", "globex", body)
        assert [(f.evidence["values_matched"], f.evidence["rows_matched"]) for f in found] == [
            (9, 3)]
    found = _write(insp, "globex", "globex", wide, "text/plain")
    assert [f.evidence["values_matched"] for f in found] == [3]


def test_text_with_too_few_digits_has_no_phone_candidates() -> None:
    from leaktap.analytics.plaintext.fingerprints import tokenise

    assert tokenise(b"room 12, floor 3, 55 people")[1] == []
    assert set(tokenise(b"id 1234567")[1]) == {b"+1234567"}


def test_two_tenants_sets_loaded_together_are_told_apart(
        records: list[dict[str, str]]) -> None:
    hasher = ValueHasher(fingerprint_key(KeyedHasher(SECRET)))
    sets = []
    for tenant, rows in (("acme", records[:1000]), ("globex", records[1000:2000])):
        builder = SetBuilder(hasher, COLUMNS)
        for r in rows:
            builder.add_row([r[c] for c in COLUMNS])
        sets.append((SetInfo(tenant, "contacts", COLUMNS), builder.finish()))
    insp = _inspector(FingerprintIndex(sets, generation=2))
    both = as_json(records[10:13] + records[1010:1012])
    found = _write(insp, "initech", None, both)
    assert sorted((f.evidence["owner_tenant"], f.evidence["rows_matched"]) for f in found) == [
        ("acme", 3), ("globex", 2)]
    # globex's own rows going to globex's instance are home; acme's are not
    found = _write(insp, "globex", "globex", both)
    assert [f.evidence["owner_tenant"] for f in found] == ["acme"]


def test_owner_writing_its_records_home_is_recorded_in_the_data_flow_classes(
        index: FingerprintIndex, records: list[dict[str, str]]) -> None:
    from leaktap.analytics.plaintext.dataflows import DataFlowMap
    from leaktap.analytics.plaintext.inspector import FROM_CRM

    insp = _inspector(index)
    flows = DataFlowMap()
    insp.exchange_sinks.append(flows)
    r = records[900]
    body = json.dumps({"LastName": r["name"], "Email": r["email"], "Phone": r["phone"]}).encode()
    answer = b'{"id": "003000000000001AAA", "success": true, "errors": []}'
    findings = []
    for conn, instance in ((9001, "acme"), (9002, "globex")):
        host = f"{instance}.my.salesforce.com"
        out = WriteContext(conn=conn, tenant="acme", crm_vendor="salesforce",
                           crm_instance=instance, destination=host, pid=7, comm="crm-sync",
                           exe="/usr/bin/crm-sync")
        request = (f"POST /services/data/v59.0/sobjects/Contact HTTP/1.1\r\nHost: {host}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                   ).encode() + body
        response = (f"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(answer)}\r\n\r\n").encode() + answer
        findings += insp.inspect(out, request, len(request)).findings
        back = WriteContext(conn=conn, tenant="acme", crm_vendor="salesforce",
                            crm_instance=instance, destination=host, pid=7, comm="crm-sync",
                            exe="/usr/bin/crm-sync", direction=FROM_CRM)
        insp.inspect(back, response, len(response))
    # home: no alert, the set named among the flow's classes; elsewhere: critical, not named
    assert [(f.kind, f.crm_instance) for f in findings] == [("proprietary_data", "globex")]
    assert insp.stats["fingerprint_home_writes"] == 1
    rows = {row["crm_instance"]: row for row in flows.rows()}
    assert sorted(rows) == ["acme", "globex"]
    home = rows["acme"]
    assert (home["object"], home["direction"], home["requests"], home["records"]) == (
        "Contact", "to_crm", 1, 1)
    assert home["data_classes"] == ["email", "fingerprint:acme/contacts", "phone"]
    assert rows["globex"]["data_classes"] == ["email", "phone"]
    assert r["email"] not in repr(flows.rows()) and r["name"] not in repr(flows.rows())


def test_key_directory_finds_every_key_and_only_those() -> None:
    import numpy as np

    from leaktap.analytics.plaintext.fingerprints import KeyDirectory

    rng = np.random.default_rng(3)
    keys = np.sort(np.concatenate([
        rng.integers(0, 2**64, 5000, dtype=np.uint64, endpoint=False),
        np.array([0, 1, 2**63, 2**64 - 1, 2**64 - 1], np.uint64)]))  # extremes, a repeat
    directory = KeyDirectory(keys)
    positions = [directory.find(k) for k in keys.tolist()]
    assert all(keys[at] == k for at, k in zip(positions, keys.tolist(), strict=True))
    assert positions[-1] == len(keys) - 2  # a repeated key: its first position
    absent = rng.integers(0, 2**64, 2000, dtype=np.uint64, endpoint=False)
    absent = absent[~np.isin(absent, keys)]
    assert all(directory.find(k) == -1 for k in absent.tolist())
    assert KeyDirectory(np.zeros(0, np.uint64)).find(12345) == -1


def test_a_name_of_long_words_is_found_in_free_text() -> None:
    # n-grams are read from a slice of the view that grows until it holds their words
    long = {"name": "Maximilianopoulosandersson Bartholomewsworthingtonshire Xyz",
            "email": "abc@example.org", "phone": "+1 (555) 010-7777"}
    others = [{"name": f"Jo Ann{i}", "email": f"jo{i}@example.org",
               "phone": f"+1 (555) 010-{i:04d}"} for i in range(3)]
    insp = _inspector(_index([long, *others]))
    text = (f"Met {long['name'].upper()} today, and Jo Ann1 and Jo Ann2; notes: "
            + "filler " * 40).encode()
    found = _write(insp, "globex", "globex", text, "text/plain")
    assert [f.evidence["values_matched"] for f in found] == [3]


def test_n_grams_of_first_words_found_go_through_the_prefilter(
        index: FingerprintIndex, records: list[dict[str, str]]) -> None:
    matcher = _inspector(index).fingerprints
    stats = matcher.stats

    def hashed(text: str) -> int:
        before = stats["fingerprint_tokens_hashed"]
        assert matcher.scan([json.dumps({"note": text}).encode()]) == []
        return stats["fingerprint_tokens_hashed"] - before

    names = [r["name"].split()[0] for r in records[:2000:20]]
    extra = sum(hashed(f"spoke with {first} Qqzzyx about renewal pricing today")
                - hashed("spoke with Qqzzyx about renewal pricing today") for first in names)
    # the first name is hashed (it passes: a first word of the set); its n-grams
    # ("first qqzzyx", "first qqzzyx about renewal") only if the prefilter lets them
    # through (~0.5%); before, up to 8 n-grams of a view were hashed without asking it
    assert len(names) <= extra <= len(names) * 1.1
