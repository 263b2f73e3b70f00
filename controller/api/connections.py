"""The API server's HTTP/1.1 protocol: uvicorn's h11 one with a deadline for each
request head.

uvicorn closes a kept-alive connection only while it is completely silent (any
byte cancels its timer), and a fresh connection gets no timer at all: one that
sends nothing, or its head a byte at a time, holds one of the server's
`limit_concurrency` slots for as long as it likes, and a few dozen of them shut
everyone else out (503). Here every connection waiting for a request head, new
or kept alive, must complete it within `timeout_keep_alive` seconds or is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadTimeoutH11Protocol(H11Protocol):
    _head_timer: asyncio.TimerHandle | None = None
    _waiting_cycle: Any = None  # the cycle current when the deadline was set

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not self._waiting_cycle:
            # a complete head started a new request/response cycle
            self._head_timer.cancel()
            self._head_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()  # for the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self.transport.is_closing() or (self.cycle is not None
                                           and not self.cycle.response_complete):
            return  # closing, or a pipelined request is already being served
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._waiting_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.cycle is self._waiting_cycle and not self.transport.is_closing():
            self.transport.close()
