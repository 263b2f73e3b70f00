"""Seeded generator of contact records and of realistic writes, for fingerprint tests
and perf/bench_fingerprints.py. Names are built from syllables (about 10^9 full
names), so a 1M-row set is mostly distinct names, as a real CRM export is."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Set

_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v",
           "w", "z", "br", "ch", "cl", "dr", "gr", "kr", "sh", "st", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ie", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "s", "l", "m", "th", "ck", "nd", "rt"]
_STREETS = ["Main", "Oak", "Pine", "Maple", "Cedar", "Elm", "Washington", "Lake", "Hill",
            "Park", "Sunset", "River", "Church", "Mill", "Spring", "Highland"]
_KINDS = ["Street", "Avenue", "Road", "Lane", "Drive", "Court", "Way", "Boulevard"]
_DOMAINS = ["example.com", "example.org", "example.net", "mail.example", "corp.example"]
_WORDS = ("the customer asked about renewal pricing and we agreed to follow up next week "
          "regarding the contract terms shipping schedule support tickets invoice status "
          "meeting notes quarterly review onboarding account owner priority escalation "
          "please confirm with the team before friday thanks for your help").split()
COLUMNS = ["name", "email", "phone", "address"]


def _name_part(rng: random.Random) -> str:
    syllables = rng.choice((2, 2, 3))
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables)).capitalize()


def contact(rng: random.Random) -> dict[str, str]:
    first, last = _name_part(rng), _name_part(rng)
    return {
        "name": f"{first} {last}",
        "email": f"{first.lower()}.{last.lower()}{rng.randrange(100)}@{rng.choice(_DOMAINS)}",
        "phone": f"+1 ({rng.randrange(200, 999)}) {rng.randrange(200, 999)}-"
                 f"{rng.randrange(10000):04d}",
        "address": f"{rng.randrange(1, 9999)} {rng.choice(_STREETS)} {rng.choice(_KINDS)}",
    }


def fresh_contact(rng: random.Random, exclude: Set[str]) -> dict[str, str]:
    """A contact none of whose values is in `exclude` (e.g. a set's values)."""
    while True:
        c = contact(rng)
        if not exclude or not any(v in exclude for v in c.values()):
            return c


def contacts(n: int, seed: int) -> Iterator[dict[str, str]]:
    rng = random.Random(seed)
    for _ in range(n):
        yield contact(rng)


def write_csv(path: str, rows: list[dict[str, str]], columns: list[str] = COLUMNS) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def as_json(rows: list[dict[str, str]]) -> bytes:
    return json.dumps({"records": rows}).encode()


def as_csv(rows: list[dict[str, str]], columns: list[str] = COLUMNS) -> bytes:
    lines = [",".join(columns)]
    lines += [",".join(f'"{r[c]}"' for c in columns) for r in rows]
    return ("\r\n".join(lines) + "\r\n").encode()


def as_paragraph(rows: list[dict[str, str]], rng: random.Random | None = None) -> bytes:
    rng = rng or random.Random(7)
    parts = []
    for r in rows:
        filler = " ".join(rng.choice(_WORDS) for _ in range(12))
        parts.append(f"Spoke with {r['name']} ({r['email']}, {r['phone']}) who lives at "
                     f"{r['address']}; {filler}.")
    return json.dumps({"note": " ".join(parts)}).encode()


def realistic_write(rng: random.Random, size: int = 4096, exclude: Set[str] = frozenset()
                    ) -> bytes:
    """A CRM-like write of `size` bytes: contact records (none with a value in
    `exclude`), then a free-text note naming three more."""
    records: list[dict[str, str]] = []
    body = b""
    while True:
        records.append({**fresh_contact(rng, exclude), "Description": " ".join(
            rng.choice(_WORDS) for _ in range(rng.randrange(4, 16)))})
        candidate = as_json(records)
        if len(candidate) > size * 2 // 3:
            break
        body = candidate
    note = json.loads(as_paragraph([fresh_contact(rng, exclude) for _ in range(3)], rng))["note"]
    while True:  # the note fills the write to exactly `size` bytes
        out = body[:-1] + b', "note": ' + json.dumps(note).encode() + b"}"
        if len(out) >= size:
            return out[: size - 2] + b'"}'
        note += " " + " ".join(rng.choice(_WORDS) for _ in range(8))
