"""Bounded, redacted excerpts of what a receiver answered, for the outbox row,
the log and the API alike.

A receiver or a proxy in front of it may echo the request: the routing key,
the webhook's headers (bearer tokens) or anything else the sink sent. Each sink
builds a `Redactor` from its own configuration; whatever it holds that could be
a secret is masked wherever it appears (verbatim, JSON-escaped or URL-encoded),
and so are the usual credential shapes (bearer tokens, key/secret/token fields,
HMAC signatures) whoever sent them.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterable

MASK = "***"
EXCERPT_MAX = 256  # characters of an error kept after redaction
_SCAN_MAX = EXCERPT_MAX * 16  # a huge answer is cut before the regexes run
SECRET_MIN = 4  # shorter configured values are not secrets worth masking (and would mask all)
URL_PATH_SECRET_MIN = 16  # a long path segment of a sink's URL is likely a token

_CREDENTIALS = (
    # Authorization schemes followed by their credentials
    re.compile(r"(?i)\b(bearer|basic|token|apikey)(\s+)[A-Za-z0-9._~+/=:-]{6,}"),
    # key/secret/token fields in JSON, form, header or query shape
    re.compile(
        r"(?i)(\"?[\w-]*(?:routing[_-]?key|integration[_-]?key|api[_-]?key|secret|token|"
        r"password|passwd|authorization|signature)[\w-]*\"?\s*[:=]\s*)(\"?)"
        r"(?!bearer\b|basic\b|token\b)([^\"\s,;&}]+)"
    ),
    # HMAC signatures, e.g. X-Leaktap-Signature: sha256=<hex>
    re.compile(r"(?i)\b(sha(?:1|256|512)=)()[0-9a-f]{16,}"),
)
_SCHEMES = {"bearer", "basic", "token", "digest", "apikey"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def url_secrets(url: str) -> list[str]:
    """What in a sink URL may be a credential: password, query values, long path segments."""
    parts = urllib.parse.urlsplit(url)
    out = [parts.password or "", parts.username or ""]
    out += [v for _, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]
    out += [s for s in parts.path.split("/") if len(s) >= URL_PATH_SECRET_MIN]
    return out


class Redactor:
    """Masks a sink's configured secrets and common credential shapes; bounds the text."""

    def __init__(self, secrets: Iterable[str | bytes | None] = ()) -> None:
        forms: set[str] = set()
        for value in secrets:
            if isinstance(value, bytes):
                value = value.decode(errors="replace")
            if not value or len(value) < SECRET_MIN:
                continue
            forms |= {value, json.dumps(value)[1:-1], urllib.parse.quote(value, safe=""),
                      urllib.parse.quote_plus(value)}
            # a header value "Bearer <token>": the token alone is echoed too
            forms |= {w for w in value.split()
                      if len(w) >= SECRET_MIN and w.lower() not in _SCHEMES}
        # longest first, so a secret containing another is masked whole
        self._secrets = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = text[:_SCAN_MAX]
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        for pattern in _CREDENTIALS:
            text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
        text = _CONTROL.sub(" ", text).strip()
        return text if len(text) <= EXCERPT_MAX else text[: EXCERPT_MAX - 1] + "…"
