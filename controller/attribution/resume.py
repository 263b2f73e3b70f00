"""Resuming live conversations after an agent restart.

The kernel maps are pinned, so a restarted agent still counts every byte of a
connection that was open when it stopped; but that connection's ClientHello
and DNS answer went by before the restart. The flow rows the previous run
wrote carry what it knew (names, tenant, counts): a conversation first drained
after the start is re-bound to the row of the same 5-tuple when it continues
it, i.e. its packets show no new handshake, started after the row's first
packet, and follow the row's last packet within the idle window. Anything else
(a new connection reusing the 5-tuple, a stale row) starts afresh, counted by
reason.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Any

from leaktap.controller.attribution.attributor import Names
from leaktap.controller.attribution.flows import (
    FF_SYN,
    FF_SYNACK,
    NO_UID,
    Conversation,
    ConversationId,
    Direction,
    conversation_id,
)
from leaktap.controller.kernel.maps import FlowCounters

logger = logging.getLogger(__name__)

PROTO_NUMBERS = {"tcp": 6, "udp": 17}
# epoch <-> CLOCK_MONOTONIC conversions of two clocks read a moment apart
CLOCK_SLACK_S = 1.0


def row_conversation_id(row: dict[str, Any]) -> ConversationId:
    proto = PROTO_NUMBERS.get(str(row["proto"])) or int(row["proto"])
    ends = sorted([(str(row["src"]), int(row["sport"])), (str(row["dst"]), int(row["dport"]))])
    return int(row["family"]), proto, ends[0], ends[1]


def names_from_row(row: dict[str, Any]) -> Names:
    """The names a flow row recorded; a field the row lacks takes its default (or None)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Names):
        default = None if f.default is dataclasses.MISSING else f.default
        value = row.get(f.name, default)
        # SQLite keeps booleans as integers
        values[f.name] = bool(value) if isinstance(default, bool) else value
    values["ech"] = bool(values["ech"])  # not stored: the row's SNI is the outer name
    values["dns_names"] = list(values["dns_names"] or [])
    return Names(**values)


def monotonic_ns(epoch_s: float) -> int:
    """An epoch time as a kernel (CLOCK_MONOTONIC) timestamp; 0 stays 0."""
    if not epoch_s:
        return 0
    return max(1, time.monotonic_ns() - int((time.time() - epoch_s) * 1e9))


class ResumableFlows:
    """Flow rows a previous run left live, waiting to be re-bound to their conversations."""

    def __init__(self, rows: Iterable[dict[str, Any]], idle_s: float) -> None:
        self.idle_s = idle_s
        self._rows: dict[ConversationId, dict[str, Any]] = {}
        for row in rows:
            cid = row_conversation_id(row)
            kept = self._rows.get(cid)
            if kept is None or row["last_seen"] > kept["last_seen"]:
                self._rows[cid] = row
        # resumed, and the reasons a candidate row was not resumed
        self.counts = {"resumed": 0, "new_handshake": 0, "started_before_row": 0, "idle": 0,
                       "not_seen_again": 0}

    def __len__(self) -> int:
        return len(self._rows)

    def claim(self, counters: FlowCounters, now: float) -> tuple[Conversation, Names] | None:
        """The conversation (seeded with the row's counts) and names `counters` continues,
        if a row waits for its 5-tuple; the row is consumed either way."""
        if not self._rows:
            return None
        cid = conversation_id(counters.key)
        row = self._rows.pop(cid, None)
        if row is None:
            return None
        entry_first = now - (time.monotonic_ns() - counters.first_seen_ns) / 1e9
        if counters.flags & (FF_SYN | FF_SYNACK):
            reason = "new_handshake"
        elif entry_first < row["first_seen"] - CLOCK_SLACK_S:
            reason = "started_before_row"
        elif entry_first > row["last_seen"] + self.idle_s:
            reason = "idle"
        else:
            self.counts["resumed"] += 1
            return _seeded(cid, row), names_from_row(row)
        self.counts[reason] += 1
        logger.debug("not resuming flow row %s: %s", row["id"], reason)
        return None

    def expire(self, now: float) -> None:
        """Forget rows no continuation can match any more (idle longer than the window)."""
        stale = [cid for cid, r in self._rows.items() if r["last_seen"] < now - self.idle_s]
        for cid in stale:
            del self._rows[cid]
        self.counts["not_seen_again"] += len(stale)
        if stale and not self._rows:
            logger.info("flow rows of the previous run: %s", self.counts)


def _seeded(cid: ConversationId, row: dict[str, Any]) -> Conversation:
    """A conversation holding the row's totals, so that updating the row keeps them."""
    conv = Conversation(cid[0], cid[1], cid[2], cid[3], row_id=int(row["id"]), named=True)
    conv.local_is_a = (str(row["src"]), int(row["sport"])) == conv.a
    first, last = monotonic_ns(row["first_seen"]), monotonic_ns(row["last_seen"])
    out = Direction(bytes=int(row["bytes_out"]), packets=int(row["packets_out"]),
                    first_seen_ns=first, last_seen_ns=last, flags=int(row.get("flags_out") or 0),
                    uid=NO_UID if row.get("uid") is None else int(row["uid"]))
    back = Direction(bytes=int(row["bytes_in"]), packets=int(row["packets_in"]),
                     first_seen_ns=first if row["packets_in"] else 0,
                     last_seen_ns=last if row["packets_in"] else 0,
                     flags=int(row.get("flags_in") or 0))
    conv.a_to_b, conv.b_to_a = (out, back) if conv.local_is_a else (back, out)
    return conv
