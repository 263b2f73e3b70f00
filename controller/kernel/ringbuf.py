"""Draining the lt_events ring buffer into Python samples.

The kernel submits only the filled part of each event (header + cap_len
bytes), so the raw bytes are copied first and the header is decoded from the
copy with the ctypes class BCC derives from ``struct lt_event``.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from leaktap.controller.kernel import abi
from leaktap.controller.kernel.maps import format_addr

logger = logging.getLogger(__name__)
_ENFORCE_KIND = abi.enums()["lt_event_kind"]["LT_EV_ENFORCE"]


@dataclass(frozen=True, slots=True)
class Sample:
    """One event from the kernel: a slice of a packet's L4 payload and its flow."""

    kind: str  # tls_hello | quic_initial | dns
    ts_ns: int
    cgroup_id: int
    ifindex: int
    family: int
    proto: int
    dir: int
    src: str
    dst: str
    sport: int
    dport: int
    tcp_flags: int
    seq: int  # TCP sequence of data[0]
    uid: int
    payload_len: int  # L4 payload bytes in the packet
    payload_off: int  # offset of data[0] in the L4 payload
    data: bytes


class EventDecoder:
    """Turns raw ring-buffer records into Samples.

    The struct class is the Leaf BCC derives for lt_scratch (declared with
    struct lt_event): BCC's ringbuf event() cannot map the __u64-style UAPI
    types, its map type descriptions can.
    """

    def __init__(self, event_class: Any) -> None:
        self._cls = event_class
        self._hdr = event_class.payload.offset
        self._kinds = abi.event_kind_names()

    def decode(self, raw: bytes) -> Sample:
        cls = self._cls
        if len(raw) < self._hdr:
            raise ValueError(f"event of {len(raw)} bytes is shorter than its header")
        ev = cls.from_buffer_copy(raw.ljust(ctypes.sizeof(cls), b"\0"))
        cap = min(int(ev.cap_len), len(raw) - self._hdr)
        return Sample(
            kind=self._kinds.get(int(ev.kind), f"unknown_{ev.kind}"),
            ts_ns=int(ev.ts_ns),
            cgroup_id=int(ev.cgroup_id),
            ifindex=int(ev.ifindex),
            family=int(ev.family),
            proto=int(ev.proto),
            dir=int(ev.dir),
            src=format_addr(ev.family, ev.saddr),
            dst=format_addr(ev.family, ev.daddr),
            sport=int(ev.sport),
            dport=int(ev.dport),
            tcp_flags=int(ev.tcp_flags),
            seq=int(ev.seq),
            uid=int(ev.uid),
            payload_len=int(ev.payload_len),
            payload_off=int(ev.payload_off),
            data=raw[self._hdr : self._hdr + cap],
        )


class RingDrainer:
    """Delivers every event of lt_events to `handler`, on the caller's or its own thread."""

    def __init__(self, probes: Any, handler: Callable[[Sample], None]) -> None:
        self._bpf = probes.bpf
        table = probes.table("lt_events")
        scratch = probes.table("lt_scratch")  # per-CPU: sLeaf is one CPU's struct
        self._decoder = EventDecoder(scratch.sLeaf)
        self.handler = handler
        self.received = 0
        self.undecodable = 0
        # enforcement verdicts (struct lt_decision, kind LT_EV_ENFORCE) go here raw,
        # decoded by controller/enforcement/kernel_policy.KernelPolicy.decode_decision
        self.on_enforcement: Callable[[bytes], None] | None = None
        self.enforcement_received = 0
        self.enforcement_dropped = 0  # no on_enforcement set
        table.open_ring_buffer(self._on_event)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_poll_monotonic = 0.0

    def _on_event(self, _ctx: Any, data: int, size: int) -> int:
        raw = ctypes.string_at(data, size)
        # the kind sits at offset 16 in every record (struct lt_event, struct lt_decision)
        if size >= 20 and int.from_bytes(raw[16:20], "little") == _ENFORCE_KIND:
            self._on_decision(raw)
            return 0
        try:
            sample = self._decoder.decode(raw)
        except ValueError as e:
            self.undecodable += 1
            logger.warning("undecodable ring-buffer event: %s", e)
            return 0
        self.received += 1
        try:
            self.handler(sample)
        except Exception:  # noqa: BLE001 - one bad sample must not stop the drain
            logger.exception("handling a %s sample", sample.kind)
        return 0

    def _on_decision(self, raw: bytes) -> None:
        self.enforcement_received += 1
        if self.on_enforcement is None:
            self.enforcement_dropped += 1
            return
        try:
            self.on_enforcement(raw)
        except Exception:  # noqa: BLE001 - one bad decision must not stop the drain
            logger.exception("handling an enforcement decision")

    def poll(self, timeout_ms: int = 0) -> None:
        """Consume what is in the ring now (timeout 0) or wait up to timeout_ms."""
        if timeout_ms:
            self._bpf.ring_buffer_poll(timeout_ms)
        else:
            self._bpf.ring_buffer_consume()
        self.last_poll_monotonic = time.monotonic()

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self.poll(100)

        self._thread = threading.Thread(target=loop, name="lt-ringbuf", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.poll()  # whatever arrived before the stop
