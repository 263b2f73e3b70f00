"""Delivers the durable outbox to the sinks: at least once, in order, with backoff.

Each sink has its own worker thread, so a pager that times out never delays the
SIEM. A worker takes the sink's due entries in id order (the order of the state
changes) and stops at the first retryable failure: the sink is then held for an
exponential backoff with jitter (or the receiver's Retry-After, if longer), and
nothing behind that entry overtakes it, so a resolve never reaches a receiver
before its trigger. Only the receiver's verdict on the payload itself (a 400 from
PagerDuty, a validation error from a webhook) is permanent: the entry is marked
failed and the worker moves on. Everything else (401/403 after a key rotation, a
proxy's redirect, 5xx, the network) is retried until the give-up age. Failed
entries stay visible (sink states, metrics, readiness) until an operator re-sends
them with `retry`.

Error text is the sink's redacted, bounded excerpt (sinks.redact): a receiver that
echoes the request must not put a routing key into the database, log or API.

Exactly once per (alert, change) holds as far as the receiver deduplicates: an
entry is marked delivered after the receiver accepted it, so a crash in between
sends it again, with the same PagerDuty dedup_key and event_action, and the same
webhook delivery id.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from leaktap.analytics.alert_settings import OutboxSettings
from leaktap.analytics.db import Database
from leaktap.analytics.sinks.base import (
    AlertEvent,
    PermanentDelivery,
    RetryableDelivery,
    Sink,
)
from leaktap.analytics.sinks.redact import Redactor

logger = logging.getLogger(__name__)

DELIVERED, RETRY, FAILED = "delivered", "retry", "failed"
GAVE_UP = "gave_up"  # outcome: a retryable failure past the give-up age (state failed)
IDLE_WAIT_S = 1.0  # longest sleep without a notify, so due retries are never late by more


class OutboxDispatcher:
    def __init__(
        self,
        db_path: str | Path,
        sinks: Sequence[Sink],
        settings: OutboxSettings | None = None,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.db = Database(db_path, require_table="outbox")
        self.sinks = {s.name: s for s in sinks}
        self.settings = settings or OutboxSettings()
        self.clock = clock
        self.jitter = jitter
        self.deliveries: Counter[tuple[str, str]] = Counter()  # (sink, outcome)
        self._redact = {
            name: getattr(sink, "redact", None) or Redactor() for name, sink in self.sinks.items()
        }
        self._failures: dict[str, int] = {name: 0 for name in self.sinks}  # consecutive
        self._hold_until: dict[str, float] = {name: 0.0 for name in self.sinks}
        self._wake = {name: threading.Event() for name in self.sinks}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        now = self.clock()
        # what waited for a backoff before a restart is due now
        self.db.execute(
            "UPDATE outbox SET next_attempt_ts = ? WHERE state = 'pending' AND next_attempt_ts > ?",
            (now, now),
        )
        for sink, count in self.pending_by_sink().items():
            if sink not in self.sinks:
                logger.warning(
                    "%d outbox entries wait for sink %r, which is not configured; they stay "
                    "pending until it is", count, sink,
                )
        for name in self.sinks:
            t = threading.Thread(target=self._run, args=(name,), name=f"lt-sink-{name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self.notify()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        self._threads.clear()
        if stuck:
            # a send still waits for its timeout; its entry stays pending for the next start
            logger.warning("outbox workers still sending at stop: %s", ", ".join(stuck))
            return
        for sink in self.sinks.values():
            try:
                sink.close()
            except Exception:  # noqa: BLE001 - closing anyway
                logger.exception("closing sink %s", sink.name)
        self.db.close()

    def notify(self) -> None:
        """New entries were committed: wake every worker."""
        for event in self._wake.values():
            event.set()

    def _run(self, name: str) -> None:
        wake = self._wake[name]
        while not self._stop.is_set():
            wake.clear()
            try:
                if self.deliver_due(name):
                    continue
                wait = self._next_wait(name)
            except Exception:  # noqa: BLE001 - a database hiccup must not end deliveries
                logger.exception("outbox worker for sink %s", name)
                wait = IDLE_WAIT_S
            wake.wait(wait)

    def _next_wait(self, name: str) -> float:
        now = self.clock()
        row = self.db.query(
            "SELECT MIN(next_attempt_ts) AS due FROM outbox WHERE sink = ? AND state = 'pending'",
            (name,),
        )[0]
        due = max(row["due"] if row["due"] is not None else now + IDLE_WAIT_S,
                  self._hold_until[name])
        return min(IDLE_WAIT_S, max(0.0, due - now))

    # -- one pass --------------------------------------------------------------------

    def deliver_due(self, name: str) -> int:
        """Try the sink's due entries in order; returns how many were attempted."""
        sink = self.sinks.get(name)
        now = self.clock()
        if sink is None or now < self._hold_until[name]:
            return 0
        rows = self.db.query(
            "SELECT id, payload, attempts, created_ts FROM outbox WHERE sink = ? AND "
            "state = 'pending' AND next_attempt_ts <= ? ORDER BY id LIMIT ?",
            (name, now, self.settings.batch),
        )
        attempted = 0
        for row in rows:
            if self._stop.is_set():
                break
            attempted += 1
            if not self._deliver(sink, row):
                break  # held: later entries must not overtake this one
        return attempted

    def _deliver(self, sink: Sink, row: dict[str, Any]) -> bool:
        """One attempt; False when the sink is now held for a backoff."""
        name, entry_id, attempts = sink.name, row["id"], row["attempts"] + 1
        try:
            sink.send(AlertEvent.from_payload(entry_id, row["payload"]))
        except PermanentDelivery as e:
            self._failures[name] = 0  # the receiver answered: it is up
            error = self._redact[name](str(e))
            logger.error("sink %s rejected outbox entry %d (kept as failed; POST "
                         "/v1/sinks/%s/retry re-sends it): %s", name, entry_id, name, error)
            self._finish(name, entry_id, attempts, FAILED, error)
            return True
        except Exception as e:  # noqa: BLE001 - RetryableDelivery, or a bug in a sink
            error = self._redact[name](str(e) or type(e).__name__)
            if not isinstance(e, RetryableDelivery):
                # no traceback: its text may hold what the sink sent
                logger.error("sink %s raised an unexpected %s: %s", name, type(e).__name__,
                             error)
            now = self.clock()
            if now - row["created_ts"] >= self.settings.give_up_after_s:
                logger.error("sink %s: giving up on outbox entry %d after %d attempts: %s",
                             name, entry_id, attempts, error)
                self._finish(name, entry_id, attempts, FAILED, f"gave up: {error}",
                             outcome=GAVE_UP)
                return True
            self._failures[name] += 1
            delay = self.backoff(self._failures[name])
            retry_after = getattr(e, "retry_after_s", None)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.settings.backoff_max_s))
            self._hold_until[name] = now + delay
            self.db.execute(
                "UPDATE outbox SET attempts = ?, last_error = ?, last_attempt_ts = ?, "
                "next_attempt_ts = ? WHERE id = ?", (attempts, error, now, now + delay, entry_id),
            )
            self.deliveries[(name, RETRY)] += 1
            logger.warning("sink %s: delivery %d failed (attempt %d), retrying in %.1f s: %s",
                           name, entry_id, attempts, delay, error)
            return False
        self._failures[name] = 0
        self._finish(name, entry_id, attempts, DELIVERED, None)
        return True

    def _finish(self, name: str, entry_id: int, attempts: int, state: str,
                error: str | None, outcome: str | None = None) -> None:
        now = self.clock()
        self.db.execute(
            "UPDATE outbox SET state = ?, attempts = ?, last_error = ?, last_attempt_ts = ?, "
            "delivered_ts = ? WHERE id = ?",
            (state, attempts, error, now, now if state == DELIVERED else None, entry_id),
        )
        self.deliveries[(name, outcome or state)] += 1

    def retry(self, name: str) -> int:
        """Re-send the sink's failed entries; returns how many were queued again.

        A later change of the same alert that did reach the sink (a resolve after a
        failed trigger) is queued again too, so the receiver sees them in order.
        Re-sent entries get a fresh give-up age."""
        now = self.clock()
        with self.db.transaction() as db:
            first_failed = {r[0]: r[1] for r in db.execute(
                "SELECT alert_id, MIN(id) FROM outbox WHERE sink = ? AND state = ? "
                "GROUP BY alert_id", (name, FAILED),
            )}
            requeued = 0
            for alert_id, first_id in first_failed.items():
                requeued += db.execute(
                    "UPDATE outbox SET state = 'pending', next_attempt_ts = ?, created_ts = ?, "
                    "delivered_ts = NULL WHERE sink = ? AND alert_id = ? AND id >= ? "
                    "AND state != 'pending'", (now, now, name, alert_id, first_id),
                ).rowcount
        self._hold_until[name] = 0.0
        self._failures[name] = 0
        if requeued:
            logger.info("sink %s: %d outbox entries queued again", name, requeued)
        self.notify()
        return requeued

    def backoff(self, failures: int) -> float:
        """base * 2^(failures-1), capped, scaled by a random factor in [0.5, 1)."""
        s = self.settings
        delay = min(s.backoff_max_s, s.backoff_base_s * 2 ** min(failures - 1, 62))
        return float(delay * (0.5 + 0.5 * self.jitter()))

    # -- state -----------------------------------------------------------------------

    def failed_by_sink(self) -> dict[str, int]:
        """Entries that failed for good and were not re-sent, per sink."""
        rows = self.db.query(
            "SELECT sink, COUNT(*) AS n FROM outbox WHERE state = 'failed' GROUP BY sink"
        )
        return {r["sink"]: r["n"] for r in rows}

    def pending_by_sink(self) -> dict[str, int]:
        rows = self.db.query(
            "SELECT sink, COUNT(*) AS n FROM outbox WHERE state = 'pending' GROUP BY sink"
        )
        return {r["sink"]: r["n"] for r in rows}

    def sink_states(self) -> list[dict[str, Any]]:
        """Per sink: entries by state, the held-until time and the last error."""
        counts: dict[str, dict[str, int]] = {}
        for r in self.db.query(
            "SELECT sink, state, COUNT(*) AS n FROM outbox GROUP BY sink, state"
        ):
            counts.setdefault(r["sink"], {})[r["state"]] = r["n"]
        errors = {
            r["sink"]: r["last_error"] for r in self.db.query(
                "SELECT sink, last_error FROM outbox WHERE id IN (SELECT MAX(id) FROM outbox "
                "WHERE last_error IS NOT NULL GROUP BY sink)"
            )
        }
        out = []
        for name in sorted(set(self.sinks) | set(counts)):
            by_state = counts.get(name, {})
            hold = self._hold_until.get(name, 0.0)
            out.append({
                "sink": name,
                "configured": name in self.sinks,
                "pending": by_state.get("pending", 0),
                "delivered": by_state.get("delivered", 0),
                "failed": by_state.get("failed", 0),
                "consecutive_failures": self._failures.get(name, 0),
                "held_until": hold if hold > self.clock() else None,
                "last_error": errors.get(name),
            })
        return out

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no configured sink has a pending entry (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pending = self.pending_by_sink()
            if not any(pending.get(name) for name in self.sinks):
                return True
            time.sleep(0.005)
        return False
