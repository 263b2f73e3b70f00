"""`leaktap replay` and DNS (issue 17.1): the capture's queries play the host's, timed by
the capture's clock; an answer without its query names flows only with
--trust-unmatched-dns. Small captures built here, through the real kernel program."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet
from scapy.utils import wrpcap

from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.commands.cli import build_parser
from leaktap.controller.commands.replay import (
    REPLAY_OPTIONS,
    Replayer,
    _report_dns,
    flow_records,
    main,
)
from leaktap.controller.config import LeaktapConfig
from leaktap.controller.kernel import loader
from leaktap.controller.kernel.ringbuf import RingDrainer

pytestmark = pytest.mark.kernel

CLIENT, RESOLVER, CRM = "198.18.60.1", "198.18.60.53", "198.18.61.7"
NAME = "acme.my.salesforce.com"


def _frame(ts: float, pkt: Packet) -> Packet:
    frame = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / pkt
    frame.time = ts
    return frame


def _capture(tmp_path: Path, *, query: bool, answer_delay: float = 0.01) -> str:
    """[query] answer, then a plain TCP upload to the answered address."""
    frames = []
    if query:
        frames.append(_frame(100.0, IP(src=CLIENT, dst=RESOLVER) / UDP(sport=41000, dport=53)
                             / DNS(id=77, rd=1, qd=DNSQR(qname=NAME))))
    frames.append(_frame(100.0 + answer_delay, IP(src=RESOLVER, dst=CLIENT)
                         / UDP(sport=53, dport=41000)
                         / DNS(id=77, qr=1, qd=DNSQR(qname=NAME),
                               an=DNSRR(rrname=NAME, type="A", ttl=300, rdata=CRM))))
    t = 100.0 + answer_delay + 0.1
    frames += [
        _frame(t, IP(src=CLIENT, dst=CRM) / TCP(sport=41001, dport=8080, flags="S", seq=1)),
        _frame(t + 0.01, IP(src=CRM, dst=CLIENT) / TCP(sport=8080, dport=41001, flags="SA",
                                                       seq=9, ack=2)),
        _frame(t + 0.02, IP(src=CLIENT, dst=CRM) / TCP(sport=41001, dport=8080, flags="PA",
                                                       seq=2, ack=10) / (b"x" * 1000)),
    ]
    path = tmp_path / "dns.pcap"
    wrpcap(str(path), frames)
    return str(path)


@pytest.fixture(scope="module")
def parts() -> Iterator[tuple[Any, RingDrainer]]:
    probes = loader.load("tc", REPLAY_OPTIONS)  # compiled once for the module
    yield probes, RingDrainer(probes, lambda s: None)
    probes.close()


def _upload(parts: tuple[Any, RingDrainer], path: str, trust: bool = False) -> dict[str, Any]:
    probes, drainer = parts
    attributor = Attributor(LeaktapConfig(), live=False, trust_unmatched_dns=trust)
    result = Replayer(probes, attributor, drainer).run(path)
    _report_dns(result.dns)
    [flow] = [r for r in flow_records(result, attributor) if r["dport"] == 8080]
    return flow


def test_answer_to_a_query_in_the_capture_names_the_flow(parts: Any, tmp_path: Path) -> None:
    flow = _upload(parts, _capture(tmp_path, query=True))
    assert (flow["dns_names"], flow["crm_vendor"], flow["crm_instance"]) == (
        [NAME], "salesforce", "acme")


def test_answer_without_its_query_names_the_flow_only_when_trusted(
    parts: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _capture(tmp_path, query=False)
    strict = _upload(parts, path)
    assert (strict["dns_names"], strict["crm_vendor"]) == ([], None)
    assert "--trust-unmatched-dns" in caplog.text  # the replay says what it left unused
    trusting = _upload(parts, path, trust=True)
    assert (trusting["dns_names"], trusting["crm_instance"]) == ([NAME], "acme")


def test_cli_option_trusts_unmatched_answers(tmp_path: Path) -> None:
    out = io.StringIO()
    args = build_parser().parse_args(
        ["replay", _capture(tmp_path, query=False), "--trust-unmatched-dns"])
    assert main(args, out) == 0
    [flow] = [r for r in map(json.loads, out.getvalue().splitlines()) if r["dport"] == 8080]
    assert flow["dns_names"] == [NAME]


def test_answer_late_in_capture_time_is_rejected_however_fast_replay_runs(
    parts: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _capture(tmp_path, query=True, answer_delay=10.0)  # window 5 s
    assert _upload(parts, path)["dns_names"] == []
    assert _upload(parts, path, trust=True)["dns_names"] == []  # late is not unmatched
    assert "rejected_expired=1" in caplog.text
