"""`leaktap replay`: captures through the real compiled program and the user-space pipeline.

Suricata's own per-flow counts (suricata/expected_flows.tsv) are the oracle
for bytes and packets; crafted captures check the link-layer correction for
raw IP and Linux cooked captures; broken files give one clear line.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import CookedLinux, Ether
from scapy.packet import Packet, Raw
from scapy.utils import wrpcap

from leaktap.controller.commands.replay import ReplayResult, replay
from leaktap.controller.config import LeaktapConfig
from leaktap.controller.errors import PcapError
from tests.corpus import load_tsv

pytestmark = pytest.mark.kernel

LEAKTAP = Path(sys.executable).parent / "leaktap"


def ip_text(addr: str) -> str:
    return str(ipaddress.ip_address(addr))


_replays: dict[str, tuple[list[dict[str, Any]], ReplayResult]] = {}


def replayed(path: str) -> tuple[list[dict[str, Any]], ReplayResult]:
    """Each capture is replayed once per session (a replay compiles the program)."""
    if path not in _replays:
        _replays[path] = replay(path, LeaktapConfig())
    return _replays[path]


def _corpus_flows() -> list[dict[str, str]]:
    return load_tsv("suricata/expected_flows.tsv")


def _expected_sni(row: dict[str, str]) -> str | None:
    for e in load_tsv("suricata/expected.tsv"):
        if (
            e["pcap"] == row["pcap"] and e["match"] == "exact-eve"
            and ip_text(e["src_ip"]) == ip_text(row["src_ip"])
            and ip_text(e["dest_ip"]) == ip_text(row["dest_ip"])
            and e["dest_port"] == row["dest_port"]
        ):
            return e["server_name"]
    return None


FLOWS = _corpus_flows()


@pytest.mark.parametrize(
    "row", FLOWS, ids=[f"{Path(r['pcap']).stem}:{r['src_port']}" for r in FLOWS]
)
def test_replay_matches_suricata_flow_counts(row):
    records, _ = replayed(row["pcap_path"])
    src, dst = ip_text(row["src_ip"]), ip_text(row["dest_ip"])
    sport, dport = int(row["src_port"]), int(row["dest_port"])

    matching = [
        r for r in records
        if {(r["src"], r["sport"]), (r["dst"], r["dport"])} == {(src, sport), (dst, dport)}
    ]

    assert len(matching) == 1, f"no single record for {src}:{sport} <-> {dst}:{dport}: {records}"
    rec = matching[0]
    assert (rec["src"], rec["sport"], rec["dst"], rec["dport"]) == (src, sport, dst, dport), (
        "initiator"
    )
    assert rec["proto"] == row["proto"].lower()
    assert rec["bytes_out"] == int(row["bytes_toserver"])
    assert rec["packets_out"] == int(row["pkts_toserver"])
    sni = _expected_sni(row)
    if sni is not None:
        assert rec["sni"] == sni


def _conversation(
    client: str, server: str, sport: int, dport: int, net: type[Packet]
) -> list[tuple[bool, Packet]]:
    """(sent by the initiator, L3 packet) of a short TCP exchange."""
    c = net(src=client, dst=server)
    s = net(src=server, dst=client)
    return [
        (True, c / TCP(sport=sport, dport=dport, flags="S", seq=100)),
        (False, s / TCP(sport=dport, dport=sport, flags="SA", seq=900, ack=101)),
        (True, c / TCP(sport=sport, dport=dport, flags="A", seq=101, ack=901)),
        (True, c / TCP(sport=sport, dport=dport, flags="PA", seq=101, ack=901) / Raw(b"u" * 333)),
        (False, s / TCP(sport=dport, dport=sport, flags="PA", seq=901, ack=434) / Raw(b"d" * 1000)),
        (True, c / TCP(sport=sport, dport=dport, flags="FA", seq=434, ack=1901)),
    ]


def _udp_conversation() -> list[tuple[bool, Packet]]:
    c = IPv6(src="2001:db8::10", dst="2001:db8:1::20")
    s = IPv6(src="2001:db8:1::20", dst="2001:db8::10")
    return [
        (True, c / UDP(sport=45100, dport=4242) / Raw(b"q" * 77)),
        (False, s / UDP(sport=4242, dport=45100) / Raw(b"r" * 500)),
        (True, c / UDP(sport=45100, dport=4242) / Raw(b"q" * 5)),
    ]


def _check_records(records: list[dict[str, Any]], convs: dict[tuple, list[int]]) -> None:
    got = {(r["src"], r["sport"], r["dst"], r["dport"], r["proto"]):
           (r["bytes_out"], r["packets_out"]) for r in records}
    want = {k: (sum(v), len(v)) for k, v in convs.items()}
    assert got == want


@pytest.mark.parametrize("linktype", [101, 113], ids=["raw-ip", "linux-sll"])
def test_replay_counts_stored_frame_lengths_for_non_ethernet_links(tmp_path, linktype):
    tcp4 = _conversation("198.18.0.1", "198.19.0.2", 45000, 443, IP)
    udp6 = _udp_conversation()
    stored: list[Packet] = []
    convs: dict[tuple, list[int]] = {
        ("198.18.0.1", 45000, "198.19.0.2", 443, "tcp"): [],
        ("2001:db8::10", 45100, "2001:db8:1::20", 4242, "udp"): [],
    }
    keys = list(convs)
    for key, conv in zip(keys, (tcp4, udp6), strict=True):
        for from_initiator, l3 in conv:
            pkt = l3 if linktype == 101 else (
                CookedLinux(pkttype=4 if from_initiator else 0, lladdrtype=1, lladdrlen=6,
                            src=b"\x02\0\0\0\0\x01\0\0",
                            proto=0x0800 if l3.haslayer(IP) else 0x86DD) / l3
            )
            stored.append(pkt)
            if from_initiator:
                convs[key].append(len(bytes(pkt)))
    path = tmp_path / f"lt{linktype}.pcap"
    wrpcap(str(path), stored, linktype=linktype)

    records, result = replay(str(path), LeaktapConfig())

    assert result.frames == len(stored)
    _check_records(records, convs)


def _truncated_pcap(tmp_path: Path) -> Path:
    frames = [Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / l3
              for _, l3 in _conversation("198.18.0.1", "198.19.0.2", 45200, 443, IP)[:3]]
    path = tmp_path / "bad.pcap"
    wrpcap(str(path), frames)
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # the third record loses its last 10 bytes
    return path


def test_truncated_pcap_raises_pcap_error_naming_the_packet(tmp_path):
    path = _truncated_pcap(tmp_path)

    with pytest.raises(PcapError, match=r"packet 3: truncated"):
        replay(str(path), LeaktapConfig())


def test_cli_reports_a_truncated_pcap_in_one_line_and_exits_2(tmp_path):
    path = _truncated_pcap(tmp_path)

    proc = subprocess.run([str(LEAKTAP), "replay", str(path)], capture_output=True, text=True,
                          timeout=120, check=False)

    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"leaktap replay: {path}: packet 3: truncated")
    assert proc.stdout == ""
