"""The columnar flow drain on real maps (issue 16.5): FlowDrain reads lt_flows and
the front cache into the same per-flow sums MapReader.drain_flows makes of them."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from leaktap.controller.agent import _front_cache
from leaktap.controller.kernel import loader, testrun
from leaktap.controller.kernel.flow_batch import FlowDrain
from leaktap.controller.kernel.maps import FlowKey, MapReader

pytestmark = pytest.mark.kernel

FLOWS = 12
DATA_PACKETS = 40  # past the probe budget: later packets are counted in the front cache


def _frames() -> list[bytes]:
    out = []
    for i in range(FLOWS):
        ip = IP(src=f"198.18.23.{10 + i}", dst="198.18.24.1")
        out.append(bytes(Ether() / ip / TCP(sport=41000 + i, dport=443, flags="S")))
        out += [bytes(Ether() / ip / TCP(sport=41000 + i, dport=443, flags="PA", seq=n)
                      / Raw(b"x" * (100 + i))) for n in range(DATA_PACKETS)]
    return out


def _sums(rows: list[tuple[FlowKey, int, int, int, int]]) -> dict[FlowKey, list[int]]:
    out: dict[FlowKey, list[int]] = {}
    for key, nbytes, packets, uid, flags in rows:
        s = out.setdefault(key, [0, 0, uid, 0])
        s[0] += nbytes
        s[1] += packets
        s[3] |= flags
    return out


def test_the_columnar_drain_sums_what_drain_flows_sums() -> None:
    probes = loader.load("tc", loader.KernelOptions(flows_max=4096))
    try:
        fd = probes.fd("egress")
        frames = _frames()
        for frame in frames:
            testrun.run_frame(fd, frame)
        objects = _sums([(f.key, f.tx_bytes, f.tx_packets, f.uid, f.flags)
                         for f in MapReader(probes).drain_flows()])
        for frame in frames:
            testrun.run_frame(fd, frame)
        drain = FlowDrain(probes.table("lt_flows"), _front_cache(probes))
        batch = drain.drain()
        columns = _sums([(batch.key(i), int(batch.tx_bytes[i]), int(batch.tx_packets[i]),
                          int(batch.uid[i]), int(batch.flags[i])) for i in range(len(batch))])
        # the data packets past the probe budget came from the front cache
        assert drain.front is not None and drain.front.flips == 1 and len(batch) >= FLOWS
        again = drain.drain()
    finally:
        probes.close()
    assert len(objects) == FLOWS
    assert {k: v[:2] for k, v in columns.items()} == {k: v[:2] for k, v in objects.items()}
    assert all(v[1] == 1 + DATA_PACKETS for v in columns.values())
    assert {k: v[2] for k, v in columns.items()} == {k: v[2] for k, v in objects.items()}
    assert len(again) == 0  # every entry was taken
