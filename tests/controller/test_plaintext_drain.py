"""The plaintext drain reads chunks that arrived without a ring-buffer wakeup.

ssl_emit wakes the controller for chunks at most every LT_SSL_WAKE_NS per CPU;
the ones in between raise no epoll event, and a poll that times out reads
nothing: the drain must consume after every poll or they wait for the next burst.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.config import parse_config
from leaktap.controller.plaintext.monitor import PlaintextMonitor


class FakeRing:
    """Stands in for BCC: a poll sees only woken records, a consume sees all."""

    def __init__(self, woken: int, unwoken: int) -> None:
        self.woken, self.unwoken, self.delivered = woken, unwoken, 0

    def ring_buffer_poll(self, timeout: int = -1) -> None:
        self.delivered += self.woken
        self.woken = 0

    def ring_buffer_consume(self) -> None:
        self.delivered += self.woken + self.unwoken
        self.woken = self.unwoken = 0


class FakeProbes:
    def __init__(self, ring: FakeRing) -> None:
        self.bpf = ring


def test_drain_after_a_timed_out_poll_reads_unwoken_chunks(tmp_path: Path) -> None:
    config = parse_config(f"""
plaintext:
  enabled: true
  select: {{uids: [4242]}}
  hmac_secret_file: {tmp_path / 'hmac.key'}
""")
    monitor = PlaintextMonitor(config, Attributor(config), lambda f: None, lambda a: None)
    ring = FakeRing(woken=0, unwoken=7)  # seven chunks, none of them woke the consumer
    probes: Any = FakeProbes(ring)
    monitor.probes = probes
    monitor._drain(100)
    assert ring.delivered == 7
    ring.woken, ring.unwoken = 1, 3
    monitor._drain(100)
    assert ring.delivered == 11
