"""Per-connection, per-direction byte streams rebuilt from captured writes.

The kernel hands over each application write in chunks: bytes
[offset, offset + len) of a write of `total_len` bytes, in increasing offset
order, a new write starting again at offset 0. `WriteCursor` turns that into
the stream's bytes and gaps: a jump in offsets, a write whose captured bytes
end before its length, a write whose head was not captured, and bytes the
monitor reported lost (`announce_loss`: whole writes that left no chunk) are
gaps of known size. `StreamTable` holds the streams (LRU, bounded in number,
evictions counted) and the bytes their parsers hold (bounded in total).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

EVICTED_KEYS_MAX = 65536  # remembered to report a stream that comes back
# (True, bytes) is data, (False, n) a gap of n bytes
Piece = tuple[bool, bytes | int]


@dataclass(slots=True)
class StreamLoss:
    """What one stream was written and what of it was not seen, by reason."""

    written: int = 0  # bytes the process wrote (seen + lost)
    seen: int = 0
    lost: Counter[str] = field(default_factory=Counter)

    @property
    def lost_bytes(self) -> int:
        return sum(self.lost.values())

    def unseen_share(self) -> float:
        return self.lost_bytes / self.written if self.written else 0.0


@dataclass(slots=True)
class WriteCursor:
    """Where the stream stands within the current write."""

    write_total: int = 0
    write_pos: int = 0
    announced: int = 0  # bytes the monitor reported lost, not yet placed in the stream
    announced_reason: str = "kernel"

    def announce_loss(self, nbytes: int, reason: str) -> None:
        self.announced += max(0, nbytes)
        self.announced_reason = reason

    def pieces(self, data: bytes, total_len: int, offset: int,
               loss: StreamLoss) -> list[Piece]:
        """The gaps and data one captured chunk adds to the stream, in order."""
        total_len = max(total_len, offset + len(data))
        out: list[Piece] = []
        new_write = (offset == 0 or offset < self.write_pos
                     or total_len != self.write_total or self.write_pos >= self.write_total)
        observed = 0  # gap bytes the offsets show
        if new_write:
            observed += self.write_total - self.write_pos  # the last write's uncaptured tail
            observed += offset  # this write's uncaptured head
            self.write_total, self.write_pos = total_len, 0
            loss.written += total_len
        else:
            observed += offset - self.write_pos
        if observed or self.announced:
            # the monitor's report and the offsets may describe the same bytes
            gap = max(observed, self.announced)
            reason = self.announced_reason if self.announced >= observed else "not_captured"
            loss.lost[reason] += gap
            if gap > observed:
                # whole writes lost before this one: not in `written` yet
                loss.written += gap - observed
            out.append((False, gap))
            self.announced = 0
        if data:
            out.append((True, data))
            loss.seen += len(data)
        self.write_pos = offset + len(data)
        return out

    def close(self, loss: StreamLoss) -> int:
        """The stream ends: the last write's uncaptured tail and unplaced reports."""
        tail = self.write_total - self.write_pos
        gap = max(tail, self.announced)
        if gap:
            loss.lost["not_captured" if tail >= self.announced else self.announced_reason] += gap
            loss.written += gap - tail
        self.write_pos, self.announced = self.write_total, 0
        return gap


S = TypeVar("S")


class StreamTable(Generic[S]):
    """Streams by (connection, direction), least recently used evicted first.

    `buffered` is told the bytes each stream's parser holds; when their sum
    passes `total_bytes_max` the caller spills the largest holders (their
    bodies are scanned early in windows) and, failing that, streams are
    evicted. Every eviction is counted by reason.
    """

    def __init__(self, make: Callable[[], S], streams_max: int, total_bytes_max: int) -> None:
        self._make = make
        self._streams: OrderedDict[Hashable, S] = OrderedDict()
        self._held: dict[Hashable, int] = {}
        self.streams_max = streams_max
        self.total_bytes_max = total_bytes_max
        self.held_bytes = 0
        self.evicted: Counter[str] = Counter()
        # keys evicted recently: a write on one of them resumes a stream mid-way
        self.evicted_keys: OrderedDict[Hashable, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[tuple[Hashable, S]]:
        return iter(list(self._streams.items()))

    def get(self, key: Hashable) -> tuple[S, str | None]:
        """The stream for key (made if new) and why an earlier one was evicted, if so."""
        stream = self._streams.get(key)
        if stream is not None:
            self._streams.move_to_end(key)
            return stream, None
        stream = self._streams[key] = self._make()
        self._held[key] = 0
        return stream, self.evicted_keys.pop(key, None)

    def over_count(self) -> bool:
        return len(self._streams) > self.streams_max

    def peek(self, key: Hashable) -> S | None:
        """The stream for key if followed, without making it or refreshing its age."""
        return self._streams.get(key)

    def hold(self, key: Hashable, nbytes: int) -> None:
        self.held_bytes += nbytes - self._held.get(key, 0)
        if key in self._streams:
            self._held[key] = nbytes

    def over_total(self) -> bool:
        return self.held_bytes > self.total_bytes_max

    def largest(self) -> list[Hashable]:
        return sorted(self._held, key=self._held.__getitem__, reverse=True)

    def pop(self, key: Hashable) -> S | None:
        self.held_bytes -= self._held.pop(key, 0)
        return self._streams.pop(key, None)

    def evict_oldest(self, reason: str) -> tuple[Hashable, S] | None:
        if not self._streams:
            return None
        key = next(iter(self._streams))
        stream = self.pop(key)
        assert stream is not None
        self.evicted[reason] += 1
        self.evicted_keys[key] = reason
        while len(self.evicted_keys) > EVICTED_KEYS_MAX:
            self.evicted_keys.popitem(last=False)
        return key, stream
