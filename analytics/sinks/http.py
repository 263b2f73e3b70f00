"""POSTing JSON with httpx and sorting the outcome into retryable or permanent.

Only a receiver's verdict on the event itself is permanent: a validation error of
the payload (400, 413, 422 by default; each sink names its own). Authentication
and authorization answers (a rotated key, a proxy asking for credentials),
redirects, 404 from a proxy being reconfigured, 408, 429 and 5xx may all clear up
without the event changing, so they are retried with backoff up to the give-up age.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from leaktap.analytics.sinks.base import PermanentDelivery, RetryableDelivery, retry_after_seconds

if TYPE_CHECKING:  # imported when a sink is built: ~13 MB an agent without sinks saves
    import httpx

# a payload the receiver validated and refused: sending it again cannot help
PAYLOAD_REJECTED = frozenset({400, 413, 422})

# httpx logs every request's URL at INFO; a sink URL may carry its token in the path
logging.getLogger("httpx").setLevel(logging.WARNING)


def post(
    client: httpx.Client, url: str, body: bytes, headers: dict[str, str],
    success: frozenset[int], redact: Callable[[str], str],
    permanent: frozenset[int] = PAYLOAD_REJECTED,
) -> httpx.Response:
    """POST; return on a status in `success`, else raise the matching delivery error.

    The error text holds a redacted excerpt of the answer (a receiver or proxy may
    echo the request, routing key and headers included)."""
    import httpx

    try:
        response = client.post(url, content=body, headers=headers, follow_redirects=False)
    except httpx.HTTPError as e:  # connect, read, timeouts, protocol errors
        raise RetryableDelivery(redact(f"{type(e).__name__}: {e}")) from e
    status = response.status_code
    if status in success:
        return response
    message = redact(f"HTTP {status}: {response.text}")
    if status in permanent:
        raise PermanentDelivery(message)
    raise RetryableDelivery(message, retry_after_seconds(response.headers.get("retry-after")))
