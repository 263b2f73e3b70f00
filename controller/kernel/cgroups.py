"""Per-cgroup kernel totals of cgroups that no longer exist: drained, then removed.

`lt_cgtot` is never evicted (it is what makes LRU flow evictions visible), so on
a node whose containers come and go it would fill and stop counting. A cgroup's
id is the inode number of its cgroup2 directory; a scan of the mount's directory
inodes (readdir's d_ino, no stat per directory) tells which ids still exist. An
id absent from two consecutive scans is drained into the retired totals and its
entry deleted, so every byte stays accounted: live entries + retired = all.

Scans run at most every `scan_every_s`: on a node with thousands of cgroups one
walk costs milliseconds, and the map only needs room for the churn in between.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from leaktap.controller.series import OTHER, SeriesCap

logger = logging.getLogger(__name__)

SCAN_EVERY_S = 60.0
CGROUP_SERIES_MAX = 1000  # cgroup_id label values exported; the rest count as `other`
NO_CGROUP = 0  # packets counted without a socket cgroup (forwarded traffic)

Totals = dict[int, tuple[int, int]]


def cgroup_dirs(mount: Path) -> list[tuple[int, str]]:
    """(id, path relative to the mount) of every cgroup under a cgroup2 mount, the
    root as "/" (an id is the directory's inode); [] when the mount is unreadable."""
    try:
        out = [(os.stat(mount).st_ino, "/")]
    except OSError:
        return []
    base = len(str(mount).rstrip("/"))
    stack = [str(mount)]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        out.append((entry.inode(), entry.path[base:]))
                        stack.append(entry.path)
        except OSError:
            continue  # removed while walking: it is gone
    return out


def cgroup_ids(mount: Path) -> set[int]:
    """The ids (directory inodes) of every cgroup under a cgroup2 mount."""
    ids = {cgroup_id for cgroup_id, _ in cgroup_dirs(mount)}
    if not ids:
        os.stat(mount)  # an unreadable mount is an error here, as it always was
    return ids


class CgroupReaper:
    """Decides which `lt_cgtot` entries belong to vanished cgroups and retires them."""

    def __init__(
        self,
        live_ids: Callable[[], Iterable[int]],
        scan_every_s: float = SCAN_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.live_ids = live_ids
        self.scan_every_s = scan_every_s
        self.clock = clock
        self._last_scan = float("-inf")
        self._missing: set[int] = set()  # absent from the last scan
        self.retired = (0, 0)  # (bytes, packets) drained from removed entries
        self.removed = 0  # entries removed since start
        self.scans = 0

    def reap(self, totals: Totals, remove: Callable[[list[int]], Totals]) -> Totals:
        """Given the map's current entries, remove those of vanished cgroups.

        `remove(ids)` drains and deletes entries, returning what they held last;
        returns it too, after adding it to `retired`."""
        now = self.clock()
        if now - self._last_scan < self.scan_every_s:
            return {}
        self._last_scan = now
        self.scans += 1
        # listed after the map was read: an id in the map existed before the scan
        live = set(self.live_ids())
        missing = {cgid for cgid in totals if cgid != NO_CGROUP and cgid not in live}
        # twice in a row: a dying cgroup's sockets get a scan interval to finish sending
        gone = sorted(missing & self._missing)
        self._missing = missing - set(gone)
        if not gone:
            return {}
        drained = remove(gone)
        b, p = self.retired
        self.retired = (b + sum(v[0] for v in drained.values()),
                        p + sum(v[1] for v in drained.values()))
        self.removed += len(drained)
        logger.debug("removed the totals of %d vanished cgroups", len(drained))
        return drained


class CgroupAccounting:
    """The per-cgroup egress the agent exports: vanished cgroups reaped, label set capped.

    `series()` gives {label: (bytes, packets)}: one label per admitted cgroup id and
    `other` for the rest plus everything drained from removed entries, so the sum
    over the labels is every byte the map ever counted."""

    def __init__(self, reaper: CgroupReaper | None, series_max: int = CGROUP_SERIES_MAX) -> None:
        self.reaper = reaper
        self.cap: SeriesCap[int] = SeriesCap(series_max)
        self._folded_ids: set[int] = set()  # live ids counted under `other`
        self._series: dict[str, tuple[int, int]] = {OTHER: (0, 0)}

    def update(self, totals: Totals, remove: Callable[[list[int]], Totals]) -> Totals:
        """Reap vanished cgroups from this poll's map contents; returns the live ones."""
        if self.reaper is not None:
            drained = self.reaper.reap(totals, remove)
            if drained:
                totals = {k: v for k, v in totals.items() if k not in drained}
                for cgid in drained:
                    self.cap.release(cgid)
                    self._folded_ids.discard(cgid)
        ob, op = self.reaper.retired if self.reaper is not None else (0, 0)
        series: dict[str, tuple[int, int]] = {}
        for cgid, (b, p) in totals.items():
            if cgid not in self._folded_ids and self.cap.admits(cgid):
                series[str(cgid)] = (b, p)
            else:
                self._folded_ids.add(cgid)
                ob, op = ob + b, op + p
        series[OTHER] = (ob, op)
        self._series = series
        return totals

    def series(self) -> dict[str, tuple[int, int]]:
        return self._series
