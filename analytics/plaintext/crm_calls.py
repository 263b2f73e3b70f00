"""One CRM API call with its answer: the unit the read side hands to the analysis side.

The plaintext stream pipeline pairs each request a process sent to a CRM with
the response it read back (or notes that none came) and hands the pair to an
`ExchangeSink` (the data-flow map, issue 14.3). Bodies are bounded, already
content-decoded, and live only for the duration of `on_exchange`: sinks keep
counts, templates and class names, never bodies, field values or the raw
request-target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class CrmExchange:
    ts: float                 # request time (epoch s)
    tenant: str
    pid: int
    exe: str                  # process executable path
    vendor: str               # catalogue vendor, e.g. "salesforce"
    instance: str | None      # CRM instance (None: shared host, unknown)
    host: str | None          # server name
    method: str               # "GET", "POST", ...
    target: str               # request-target as sent (path + query); parsed, never stored raw
    request_body: bytes       # content-decoded request body (bounded; b"" if none)
    request_bytes: int        # request body length on the wire
    status: int | None        # HTTP status; None = no response seen (closed / timed out)
    response_body: bytes      # content-decoded response body, bounded (may be cut)
    response_bytes: int       # response body length on the wire
    response_truncated: bool  # response_body is shorter than the decoded body
    # classes the inspector named in the request body (names only): a tenant's own
    # fingerprinted records going to its sanctioned instance, "fingerprint:acme/contacts"
    data_classes: frozenset[str] = frozenset()


class ExchangeSink(Protocol):
    def on_exchange(self, exchange: CrmExchange) -> None: ...
