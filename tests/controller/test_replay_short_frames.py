"""`leaktap replay` never crashes on short frames (issue 17.7).

The kernel's test run refuses an IPv4 frame shorter than Ethernet + IPv4
header (34 bytes) and an IPv6 one shorter than Ethernet + IPv6 header (54) in
TC mode; the replay counts them as unparsed (parse_trunc_l3, as the program
itself counts a cut IP header) and goes on with the rest of the capture.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import wrpcap

from leaktap.controller.commands.replay import replay
from leaktap.controller.config import LeaktapConfig
from tests.bpf.lt_frames import SNI, client_hello

pytestmark = pytest.mark.kernel

LEAKTAP = Path(sys.executable).parent / "leaktap"
MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}
# Ethernet header + a cut IP header: 14 + 19 = 33 (IPv4), 14 + 39 = 53 (IPv6), and tinier
SHORT = [
    bytes(Ether(**MACS, type=0x0800)) + bytes(IP(src="198.18.0.1", dst="198.19.0.2"))[:19],
    bytes(Ether(**MACS, type=0x0800)) + b"\x45",
    bytes(Ether(**MACS, type=0x86DD)) + b"\x60" + b"\0" * 38,
    bytes(Ether(**MACS, type=0x86DD)),
]


def _capture(tmp_path: Path) -> Path:
    c = Ether(**MACS) / IP(src="198.18.0.1", dst="198.19.0.2")
    good = [
        c / TCP(sport=45300, dport=443, flags="S", seq=100),
        c / TCP(sport=45300, dport=443, flags="PA", seq=101) / Raw(client_hello()),
        c / TCP(sport=45301, dport=443, flags="S", seq=500),
    ]
    frames = [bytes(good[0]), SHORT[0], SHORT[1], bytes(good[1]), SHORT[2], SHORT[3],
              bytes(good[2])]
    path = tmp_path / "short.pcap"
    wrpcap(str(path), [Ether(f) for f in frames])
    return path


@pytest.mark.parametrize("mode", ["tc", "xdp"])
def test_short_frames_are_counted_unparsed_and_the_rest_replayed(tmp_path, mode):
    records, result = replay(str(_capture(tmp_path)), LeaktapConfig(), mode)

    assert result.frames == 7
    assert [(r["sport"], r["sni"]) for r in records] == [(45300, SNI), (45301, None)]
    assert result.stats.get("parse_trunc_l3", 0) == len(SHORT)


def test_cli_replays_a_capture_with_short_frames_and_exits_0(tmp_path):
    proc = subprocess.run([str(LEAKTAP), "replay", str(_capture(tmp_path))],
                          capture_output=True, text=True, timeout=120, check=False)

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [ln.count(SNI) for ln in proc.stdout.splitlines()] == [1, 0]
    assert f"parse_trunc_l3={len(SHORT)}" in proc.stderr
