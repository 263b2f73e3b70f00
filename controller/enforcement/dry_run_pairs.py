"""One dry-run decision per connection, as block mode would have taken.

A dry-run tenant's connection to an address DNS named only for unsanctioned
instances is judged twice: the connect program records `would_block` (reason
`address`) and lets it through, then the hello verdict judges its ClientHello. In
block mode the connect refusal ends the connection, so there is one decision; dry-run
must record the same one. The two reports come from different rings and may arrive in
either order, so each waits here for its partner (same tenant, protocol, destination
address and port) for PAIR_WINDOW_S; the second of a pair is folded into the first:
the recorded decision keeps reason `address` and gains the connection's source port,
which joins it to its flow in the audit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from leaktap.controller.enforcement.kernel_policy import EnforcementDecision

# a dry-run connection sends its hello right after the handshake; a partner later than
# this is another connection
PAIR_WINDOW_S = 30.0
# waiting reports kept at most (oldest forgotten first): a flood cannot grow this
PENDING_MAX = 4096

PairKey = tuple[str, int, str, int]


@dataclass
class Pending:
    ts: float
    record_id: int  # the decision's row in the audit table
    key: tuple[bool, PairKey]  # which side of which connection it waits on
    done: bool = False  # its partner came


def pair_key(d: EnforcementDecision) -> PairKey:
    # connect6 reports a v4 destination as v4-mapped; the hello as plain v4
    return d.tenant, d.proto, d.daddr.removeprefix("::ffff:"), d.dport


class DryRunPairs:
    """Waiting connect and hello reports of dry-run connections, matched FIFO."""

    def __init__(self) -> None:
        # (is_connect, key) -> waiting reports of that side, oldest first
        self._waiting: dict[tuple[bool, PairKey], deque[Pending]] = {}
        self._arrivals: deque[Pending] = deque()  # every waiting report, oldest first

    def partner(self, d: EnforcementDecision) -> int | None:
        """The audit row of the waiting report this one completes (consumed), or None."""
        self._expire(d.ts)
        key = (d.reason != "address", pair_key(d))
        side = self._waiting.get(key)
        if not side:
            return None
        first = side.popleft()
        if not side:
            del self._waiting[key]
        first.done = True
        return first.record_id

    def wait(self, d: EnforcementDecision, record_id: int) -> None:
        """Remember a report recorded as `record_id` until its partner comes."""
        pending = Pending(d.ts, record_id, (d.reason == "address", pair_key(d)))
        self._waiting.setdefault(pending.key, deque()).append(pending)
        self._arrivals.append(pending)
        self._expire(d.ts)

    def __len__(self) -> int:
        return sum(len(side) for side in self._waiting.values())

    def _expire(self, now: float) -> None:
        """Forget reports older than the window, and the oldest beyond PENDING_MAX."""
        arrivals = self._arrivals
        while arrivals and (arrivals[0].done or now - arrivals[0].ts > PAIR_WINDOW_S
                            or len(arrivals) > PENDING_MAX):
            old = arrivals.popleft()
            if old.done:
                continue
            side = self._waiting[old.key]  # the oldest waiting is its side's first
            side.popleft()
            if not side:
                del self._waiting[old.key]
