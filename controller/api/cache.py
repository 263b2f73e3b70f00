"""Rendered responses kept until the data they came from changes.

Dashboards poll the same alert pages many times a second; the database says
when anything was committed (analytics.db.Database.version), so a cached page
is served only while it is exactly what a fresh query would return.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable


class ResponseCache:
    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[Hashable, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable, version: Hashable, render: Callable[[], bytes]) -> bytes:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == version:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1]
            self.misses += 1
        body = render()  # outside the lock: a slow render must not block hits on other keys
        with self._lock:
            self._entries[key] = (version, body)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return body
