"""OAuth bearer tokens and Salesforce session ids, reduced at once to keyed hashes.

A token is read from the request head and hashed in the same call; only the
hash and a four-character tail leave this module. The tracker remembers, per
hash, the first (tenant, environment) that used it: the same hash from a
second tenant or a second environment is reuse.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from leaktap.analytics.plaintext.http import Request
from leaktap.analytics.plaintext.redact import KeyedHasher, mask_token

MIN_TOKEN = 16
TRACKED_MAX = 100_000
TOKEN_TTL_S = 24 * 3600.0  # longer than any access token's life
_QUERY_TOKENS = ("access_token", "oauth_token")


@dataclass(frozen=True, slots=True)
class Credential:
    """A credential as it may leave the inspector: keyed hash and masked tail."""

    kind: str  # bearer | salesforce_session
    source: str  # authorization | x-sfdc-session | cookie:sid | query:access_token
    token_hash: str
    masked: str  # e.g. "Bearer ****3f9a"


def extract_credentials(request: Request, hasher: KeyedHasher) -> list[Credential]:
    found: list[tuple[str, str, str, str]] = []  # kind, source, scheme, token
    for name, value in request.headers:
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer":
                found.append(("bearer", name, "Bearer", token))
            elif scheme.lower() == "oauth":  # Salesforce accepts its session id so
                found.append(("salesforce_session", name, "OAuth", token))
        elif name == "x-sfdc-session":  # Bulk API 1.0
            found.append(("salesforce_session", name, "", value.strip()))
        elif name == "cookie":
            for part in value.split(";"):
                key, _, token = part.strip().partition("=")
                if key == "sid":
                    found.append(("salesforce_session", "cookie:sid", "sid=", token))
    if "?" in request.path:
        for key, token in parse_qsl(urlsplit(request.path).query, keep_blank_values=False):
            if key in _QUERY_TOKENS:
                found.append(("bearer", f"query:{key}", f"{key}=", token))
    out = []
    for kind, source, scheme, token in found:
        if len(token) < MIN_TOKEN:
            continue
        masked = mask_token(token)
        out.append(Credential(kind, source, hasher.hash(token),
                              f"{scheme} {masked}".strip() if scheme else masked))
    return out


@dataclass(slots=True)
class _Use:
    tenant: str
    environment: str | None
    first_seen: float
    last_seen: float
    alerted: set[tuple[str, str | None]] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Reuse:
    """A token hash used by `tenant`/`environment` after `first_tenant`/`first_environment`."""

    token_hash: str
    first_tenant: str
    first_environment: str | None
    first_seen: float
    tenant: str
    environment: str | None


class TokenReuseTracker:
    """Per token hash: who used it first. Bounded (LRU) and forgetting after a day."""

    def __init__(self, max_entries: int = TRACKED_MAX, ttl_s: float = TOKEN_TTL_S) -> None:
        self._uses: OrderedDict[str, _Use] = OrderedDict()
        self._max = max_entries
        self._ttl = ttl_s

    def __len__(self) -> int:
        return len(self._uses)

    def observe(self, token_hash: str, tenant: str, environment: str | None,
                now: float | None = None) -> Reuse | None:
        """Returns the reuse the first time a new (tenant, environment) shows this hash."""
        now = time.time() if now is None else now
        use = self._uses.get(token_hash)
        if use is not None and now - use.last_seen > self._ttl:
            del self._uses[token_hash]
            use = None
        if use is None:
            self._uses[token_hash] = _Use(tenant, environment, now, now)
            if len(self._uses) > self._max:
                self._uses.popitem(last=False)
            return None
        self._uses.move_to_end(token_hash)
        use.last_seen = now
        pair = (tenant, environment)
        if (use.tenant, use.environment) == pair or pair in use.alerted:
            return None
        if use.tenant == tenant and (environment is None or use.environment is None):
            return None  # an unlabelled environment is not a second one
        use.alerted.add(pair)
        return Reuse(token_hash, use.tenant, use.environment, use.first_seen, tenant,
                     environment)
