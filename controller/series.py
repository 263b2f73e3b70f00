"""Bounded label sets for the metrics the agent exports.

A watched process can make up destinations (and a busy node cgroups) faster than
any Prometheus server wants series. Each capped family admits the first `limit`
label values it sees, for good, and folds every later one into a shared `other`
value, counting what it folded. Admission is sticky so every exported series,
`other` included, stays a monotonic counter.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

OTHER = "other"
K = TypeVar("K", bound=Hashable)


class SeriesCap(Generic[K]):
    """Sticky admission of up to `limit` label values."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a series cap needs room for one series")
        self.limit = limit
        self.admitted: set[K] = set()
        self.folded = 0  # updates that went to `other` because the cap was reached

    def admits(self, key: K) -> bool:
        """True when `key` has (or now gets) its own series."""
        if key in self.admitted:
            return True
        if len(self.admitted) < self.limit:
            self.admitted.add(key)
            return True
        self.folded += 1
        return False

    def release(self, key: K) -> None:
        """`key` is gone for good (its series folded into `other` by the caller)."""
        self.admitted.discard(key)
