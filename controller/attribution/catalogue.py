"""CRM vendor and instance from a host name.

The shipped rules live in data/crm_catalogue.yaml (its header documents the rule
syntax, the instance naming per vendor, and which hosts are shared by every
customer); a site adds its own through the configuration's `catalogue:` entries,
which are tried first.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from leaktap.controller.config import CatalogueEntry
from leaktap.controller.errors import ConfigError

logger = logging.getLogger(__name__)

CATALOGUE_RESOURCE = "crm_catalogue.yaml"
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class CrmMatch:
    """A host name attributed to a CRM; `instance` None when the rule cannot tell.

    `shared`: the host serves every customer of the vendor (sign-in, regional API),
    so it names the vendor only; `region` is its data centre when the host says."""

    vendor: str
    instance: str | None
    host: str
    shared: bool = False
    region: str | None = None


def normalize_hostname(host: str) -> str:
    """Lower case without one trailing dot."""
    host = host.strip().lower()
    return host[:-1] if host.endswith(".") else host


def host_pattern_regex(pattern: str, captures: Iterable[str] = ("instance",)) -> str:
    """Regex source for a host template.

    `{name}` (for each name in captures) captures one DNS label into a group of
    that name; `*` matches any characters inside one label; the rest is literal.
    Raises ValueError on an unknown or repeated `{...}` placeholder.
    """
    allowed = set(captures)
    out: list[str] = []
    seen: set[str] = set()
    i = 0
    pattern = normalize_hostname(pattern)
    while i < len(pattern):
        ch = pattern[i]
        if ch == "{":
            j = pattern.find("}", i)
            name = pattern[i + 1 : j] if j > 0 else ""
            if j < 0 or name not in allowed or name in seen:
                raise ValueError(f"bad placeholder in host pattern {pattern!r}")
            seen.add(name)
            out.append(f"(?P<{name}>{_LABEL})")
            i = j + 1
        elif ch == "*":
            out.append(r"[^.]*")
            i += 1
        else:
            out.append(re.escape(ch))
            i += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class _Rule:
    vendor: str
    regex: re.Pattern[str]
    instance: str | None
    exclude: frozenset[str]
    source: str
    shared: bool = False
    region: str | None = None


def _rule_from_mapping(item: Mapping[str, Any], source: str) -> _Rule:
    vendor = item.get("vendor")
    if not isinstance(vendor, str) or not re.fullmatch(r"[a-z0-9_-]+", vendor):
        raise ConfigError(f"{source}: vendor must be a lower-case name, got {vendor!r}")
    unknown = set(item) - {"vendor", "host", "regex", "instance", "exclude", "shared", "region"}
    if unknown:
        raise ConfigError(f"{source}: unknown keys {sorted(unknown)}")
    host, rx = item.get("host"), item.get("regex")
    if (host is None) == (rx is None):
        raise ConfigError(f"{source}: exactly one of host or regex is required")
    try:
        src = (
            host_pattern_regex(str(host), ("instance", "region")) if host is not None else str(rx)
        )
        regex = re.compile(src, re.IGNORECASE)
    except (ValueError, re.error) as e:
        raise ConfigError(f"{source}: {e}") from e
    instance = item.get("instance")
    exclude = item.get("exclude") or []
    shared = item.get("shared", False)
    region = item.get("region")
    if not isinstance(shared, bool):
        raise ConfigError(f"{source}: shared must be true or false, got {shared!r}")
    if shared and (instance is not None or "instance" in regex.groupindex):
        raise ConfigError(f"{source}: a shared host names no instance")
    if region is not None and not shared:
        raise ConfigError(f"{source}: region is only for shared hosts")
    return _Rule(
        vendor,
        regex,
        None if instance is None else str(instance).lower(),
        frozenset(str(x).lower() for x in exclude),
        source,
        shared,
        None if region is None else str(region).lower(),
    )


def load_shipped_rules() -> list[Mapping[str, Any]]:
    """The rule mappings of the packaged data/crm_catalogue.yaml."""
    text = resources.files("leaktap.controller").joinpath("data", CATALOGUE_RESOURCE).read_text(
        encoding="utf-8"
    )
    data = yaml.safe_load(text)
    rules = data.get("rules") if isinstance(data, dict) else None
    if not isinstance(rules, list):
        raise ConfigError(f"{CATALOGUE_RESOURCE}: a top-level 'rules' list is required")
    return rules


class CrmCatalogue:
    """Host name -> CrmMatch; config entries take precedence over the shipped rules."""

    def __init__(
        self,
        extra: Iterable[CatalogueEntry] = (),
        shipped: Iterable[Mapping[str, Any]] | None = None,
    ) -> None:
        rules: list[_Rule] = []
        for i, entry in enumerate(extra):
            rules.append(
                _rule_from_mapping(
                    {"vendor": entry.vendor, "host": entry.pattern, "instance": entry.instance,
                     "shared": entry.shared},
                    f"catalogue[{i}]",
                )
            )
        shipped_rules = load_shipped_rules() if shipped is None else list(shipped)
        for i, item in enumerate(shipped_rules):
            if not isinstance(item, Mapping):
                raise ConfigError(f"{CATALOGUE_RESOURCE}: rules[{i}] must be a mapping")
            rules.append(_rule_from_mapping(item, f"{CATALOGUE_RESOURCE}: rules[{i}]"))
        self._rules = tuple(rules)
        self._cache: OrderedDict[str, CrmMatch | None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rules)

    def lookup(self, host: str | None) -> CrmMatch | None:
        """The CRM a host name belongs to, or None for a host that is not a CRM."""
        if not host:
            return None
        name = normalize_hostname(host)
        if name in self._cache:
            return self._cache[name]
        result = self._match(name) if len(name) <= 253 else None
        self._cache[name] = result
        if len(self._cache) > _CACHE_MAX:
            self._cache.popitem(last=False)
        return result

    def _match(self, name: str) -> CrmMatch | None:
        for rule in self._rules:
            m = rule.regex.fullmatch(name)
            if m is None:
                continue
            groups = m.groupdict()
            if rule.shared:
                region = groups.get("region") or rule.region
                return CrmMatch(rule.vendor, None, name, True, region and region.lower())
            captured = groups.get("instance")
            if captured is not None:
                captured = captured.lower()
                if captured in rule.exclude:
                    continue
                return CrmMatch(rule.vendor, captured, name)
            return CrmMatch(rule.vendor, rule.instance, name)
        return None
