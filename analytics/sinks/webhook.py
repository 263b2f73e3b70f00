"""A JSON POST of the alert event, optionally signed so the receiver can verify it.

With a secret, `X-Leaktap-Signature: sha256=<hex HMAC-SHA256(secret, body)>`; the
body carries `sent_at` (also in `X-Leaktap-Timestamp`), so the signed bytes bind
the send time and a receiver can refuse stale replays. `X-Leaktap-Delivery` is
stable across retries: receivers deduplicate on it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from leaktap.analytics.sinks.base import (
    AlertEvent,
    SinkSettings,
    check_http_url,
    check_secret_source,
    iso8601,
    read_secret,
)
from leaktap.analytics.sinks.http import post
from leaktap.analytics.sinks.redact import Redactor, url_secrets

SIGNATURE_HEADER = "X-Leaktap-Signature"
TIMESTAMP_HEADER = "X-Leaktap-Timestamp"
DELIVERY_HEADER = "X-Leaktap-Delivery"


class WebhookSettings(SinkSettings):
    type: Literal["webhook"]
    url: Annotated[str, AfterValidator(check_http_url)]
    secret: Annotated[str, Field(min_length=16)] | None = None  # HMAC key
    secret_file: str | None = None
    headers: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$")], str] = {}

    @model_validator(mode="after")
    def _secret(self) -> WebhookSettings:
        check_secret_source(self.secret, self.secret_file, "secret", required=False)
        return self


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSink:
    def __init__(self, settings: WebhookSettings) -> None:
        self.name = settings.sink_name
        self.url = settings.url
        secret = read_secret(settings.secret, settings.secret_file, "secret")
        self.secret = secret.encode() if secret else None
        self.extra_headers = dict(settings.headers)
        import httpx  # only with a sink configured (sinks/http.py)

        self.client = httpx.Client(timeout=settings.timeout_s)
        self.redact = Redactor([secret, *self.extra_headers.values(), *url_secrets(self.url)])

    def send(self, event: AlertEvent) -> None:
        sent_at = time.time()
        document = {"version": 1, "sent_at": iso8601(sent_at), **event.as_dict()}
        body = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
        headers = {
            **self.extra_headers,
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(int(sent_at)),
            DELIVERY_HEADER: str(event.delivery_id),
        }
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        post(self.client, self.url, body, headers, success=frozenset(range(200, 300)),
             redact=self.redact)

    def close(self) -> None:
        self.client.close()
