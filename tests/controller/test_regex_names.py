"""Catalogue regexes listed as the names the kernel compares (enforcement/regex_names)."""

from __future__ import annotations

import re

import pytest

from leaktap.controller.enforcement.regex_names import NAMES_CAP, regex_names

DYNAMICS = (r"(?P<instance>[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)"
            r"\.(?:api\.)?crm[0-9]{0,2}\.dynamics\.com")


def test_a_captured_first_label_gives_the_suffixes_that_follow_it() -> None:
    group, suffixes = regex_names(DYNAMICS) or (None, [])

    assert group == "instance" and len(suffixes) == 2 * (1 + 10 + 100)
    assert {".crm.dynamics.com", ".api.crm4.dynamics.com", ".crm21.dynamics.com"} <= set(suffixes)
    # every listed suffix is matched by the regex after some label, and nothing else is
    assert all(re.fullmatch(DYNAMICS, "contoso" + s) for s in suffixes)
    assert not re.fullmatch(DYNAMICS, "contoso.crm123.dynamics.com")
    assert ".crm123.dynamics.com" not in suffixes


def test_a_finite_regex_gives_whole_host_names_in_lower_case() -> None:
    pattern = r"(?:www\.zohoapis|accounts\.zoho)\.(?P<region>com|EU|com\.au)"
    group, names = regex_names(pattern) or ("x", [])

    assert group is None
    assert sorted(names) == sorted(f"{h}.{r}" for h in ("www.zohoapis", "accounts.zoho")
                                   for r in ("com", "eu", "com.au"))


@pytest.mark.parametrize("pattern", [
    r"(?P<instance>.+)\.example\.com",  # the capture may span labels: not one label
    r"[a-z]+\.example\.com",  # unbounded
    r"(?P<region>[a-z]{2}[0-9]{1,3})\.example\.com",  # constrained label: too many to list
    r"(?P<instance>[a-z]+)\.(?=x)example\.com",  # lookahead
    r"x(",  # not a regex
])
def test_what_cannot_be_listed_is_none(pattern: str) -> None:
    assert regex_names(pattern) is None


def test_the_cap_bounds_a_rule() -> None:
    assert regex_names("[a-z]{3}" + r"\.example\.com") is None  # 17,576 > cap
    group, names = regex_names(r"[a-h]{4}\.example\.com") or ("x", [])
    assert group is None and len(names) == 8 ** 4 <= NAMES_CAP
