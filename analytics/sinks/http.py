"""POSTing JSON with httpx and sorting the outcome into retryable or permanent."""

from __future__ import annotations

import logging

import httpx

from leaktap.analytics.sinks.base import PermanentDelivery, RetryableDelivery, retry_after_seconds

logger = logging.getLogger(__name__)

# how much of a rejecting receiver's body goes into the log and the outbox row
BODY_EXCERPT = 512


def post(
    client: httpx.Client, sink: str, url: str, body: bytes, headers: dict[str, str],
    success: frozenset[int],
) -> httpx.Response:
    """POST; return on a status in `success`, else raise the matching delivery error."""
    try:
        response = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as e:  # connect, read, timeouts, protocol errors
        raise RetryableDelivery(f"{type(e).__name__}: {e}") from e
    status = response.status_code
    if status in success:
        return response
    excerpt = response.text[:BODY_EXCERPT]
    if status == 429 or status == 408 or status >= 500:
        raise RetryableDelivery(
            f"HTTP {status}: {excerpt}", retry_after_seconds(response.headers.get("retry-after"))
        )
    # 400 and the rest of 4xx: the event itself was refused; sending it again cannot help
    logger.error("sink %s rejected an event with HTTP %d: %s", sink, status, excerpt)
    raise PermanentDelivery(f"HTTP {status}: {excerpt}")
