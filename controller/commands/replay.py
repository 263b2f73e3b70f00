"""`leaktap replay PCAP`: a capture through the real kernel program and pipeline.

Every frame goes through the compiled egress program with BPF_PROG_TEST_RUN
(so the kernel parser, counters and samplers are exactly the agent's), the
samples through the same attribution pipeline, and one JSON line per
conversation is printed, oriented from its initiator.

Byte counts are the initiator's frame lengths as stored in the file (what
Suricata counts). Frames without an Ethernet header are fed with a synthetic
one, so each drained batch is corrected by packets x (stored length - fed
length); the map is drained whenever that difference changes, which keeps the
correction exact for files mixing link types.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.attribution.dns_cache import DnsCacheStats
from leaktap.controller.attribution.flows import ConversationTable
from leaktap.controller.config import LeaktapConfig, load_config
from leaktap.controller.kernel import loader, testrun
from leaktap.controller.kernel.maps import MapReader
from leaktap.controller.kernel.ringbuf import RingDrainer, Sample
from leaktap.controller.protocols.pcap import iter_frames

logger = logging.getLogger(__name__)

# Drain often enough that the LRU never evicts (flows per batch < flows_max)
# and the ring never fills (events per batch x 16 KiB < ring size).
DRAIN_EVERY = 2048
POLL_EVERY = 32
# dns_both_ways: a capture holds both directions and runs through one program,
# so the capture's own queries play the role of the host's (see DnsCache.observe)
REPLAY_OPTIONS = loader.KernelOptions(
    flows_max=1 << 16, ringbuf_pages=1 << 10, events_per_sec=1 << 24, hello_pending_max=1 << 14,
    dns_both_ways=True,
    # offline, no flood to outrun: names come from the hello bytes, as sent (an invalid
    # name is reported too), through the same reassembler as the agent's split hellos
    ring_named_hellos=True,
)
PROGRESS_EVERY_S = 2.0


@dataclass
class ReplayResult:
    frames: int = 0
    too_short: int = 0
    cut_to_fit: int = 0  # frames larger than a test-run skb, fed truncated
    # IP frames too short for their IP header, which a TC test run refuses: counted
    # as the program counts a cut IP header (parse_trunc_l3), bytes in the totals
    short_l3: int = 0
    short_l3_bytes: int = 0
    conversations: ConversationTable = field(default_factory=ConversationTable)
    stats: dict[str, int] = field(default_factory=dict)
    totals_bytes: int = 0
    dns: DnsCacheStats | None = None  # the attributor's: answers learned and rejected


class Replayer:
    """Pushes frames through one loaded program set and collects conversations."""

    def __init__(
        self, probes: Any, attributor: Attributor, drainer: RingDrainer | None = None
    ) -> None:
        """`drainer`: reuse one already opened on these probes (a ring buffer opens once)."""
        self.probes = probes
        self.reader = MapReader(probes)
        self.attributor = attributor
        self.drainer = drainer or RingDrainer(probes, self._on_sample)
        self.drainer.handler = self._on_sample
        self.fd = probes.fd("egress" if probes.mode == "tc" else "ingress")
        # (kernel clock before the frame ran, capture time of the frame) since the last
        # poll: a sample is stamped with its frame's capture time, so a DNS answer is
        # timed against its query as the capture saw them, not as fast as replay runs
        self._clock_marks: list[tuple[int, int]] = []

    def _on_sample(self, sample: Sample) -> None:
        marks = self._clock_marks
        i = bisect.bisect_right(marks, (sample.ts_ns, 1 << 63)) - 1
        if i >= 0:
            sample = dataclasses.replace(sample, ts_ns=marks[i][1])
        self.attributor.on_sample(sample)

    def _poll(self) -> None:
        self.drainer.poll()
        del self._clock_marks[:-1]

    def _drain(self, result: ReplayResult, delta: int) -> None:
        self._poll()
        for counters in self.reader.drain_flows():
            result.conversations.add(counters, extra_bytes=counters.tx_packets * delta)

    def run(self, path: str) -> ReplayResult:
        result = ReplayResult()
        self._drain(result, 0)  # start from empty maps
        stats_before = self.reader.stats()
        totals_before = self.reader.totals()
        delta = 0
        pending = 0
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        try:
            for frame in iter_frames(path):
                result.frames += 1
                if len(frame.frame) < testrun.ETH_HLEN:
                    result.too_short += 1
                    continue
                data = frame.frame
                if self.probes.mode == "tc" and testrun.tc_refuses(data):
                    result.short_l3 += 1
                    result.short_l3_bytes += frame.captured_len
                    continue
                if len(data) > testrun.MAX_FRAME:
                    # GRO/TSO captures: feed what fits; the IP length then claims
                    # more than the frame (parse_len_clamped) and bytes are corrected
                    data = data[: testrun.MAX_FRAME]
                    result.cut_to_fit += 1
                frame_delta = frame.captured_len - len(data)
                if frame_delta != delta:
                    self._drain(result, delta)
                    delta, pending = frame_delta, 0
                self._clock_marks.append((time.monotonic_ns(), int(frame.ts * 1e9)))
                testrun.run_frame(self.fd, data)
                pending += 1
                if pending % POLL_EVERY == 0:
                    self._poll()
                if pending >= DRAIN_EVERY:
                    self._drain(result, delta)
                    pending = 0
                if time.monotonic() > next_progress:
                    logger.info("replay: %d frames, %d conversations", result.frames,
                                len(result.conversations))
                    next_progress = time.monotonic() + PROGRESS_EVERY_S
        finally:
            self._drain(result, delta)
        stats_after = self.reader.stats()
        result.stats = {
            k: stats_after[k] - stats_before.get(k, 0)
            for k in stats_after
            if stats_after[k] != stats_before.get(k, 0)
        }
        if result.short_l3:
            result.stats["parse_trunc_l3"] = result.stats.get("parse_trunc_l3", 0) + result.short_l3
        result.totals_bytes = sum(b for b, _ in self.reader.totals().values()) - sum(
            b for b, _ in totals_before.values()
        ) + result.short_l3_bytes
        result.dns = self.attributor.dns.stats
        return result


def flow_records(result: ReplayResult, attributor: Attributor) -> list[dict[str, Any]]:
    """One record per conversation, in order of first packet."""
    records = []
    convs = sorted(
        result.conversations.conversations.values(),
        key=lambda c: min(d.first_seen_ns or 1 << 63 for d in (c.a_to_b, c.b_to_a)),
    )
    for conv in convs:
        (src, sport), (dst, dport), out, _in = conv.oriented()
        names = attributor.names(conv)
        records.append(
            {
                "src": src,
                "dst": dst,
                "sport": sport,
                "dport": dport,
                "proto": {6: "tcp", 17: "udp"}.get(conv.proto, str(conv.proto)),
                "sni": names.sni,
                "dns_names": names.dns_names,
                "crm_vendor": names.crm_vendor,
                "crm_instance": names.crm_instance,
                "shared": names.shared,
                "crm_region": names.crm_region,
                "named_by": names.named_by,
                "tenant": names.tenant,
                "bytes_out": out.bytes,
                "packets_out": out.packets,
            }
        )
    return records


def replay(
    path: str, config: LeaktapConfig, mode: str = "tc", trust_unmatched_dns: bool = False
) -> tuple[list[dict[str, Any]], ReplayResult]:
    """`trust_unmatched_dns`: an answer whose query is not in the capture (it started
    after the query) names addresses too; one answering another query never does."""
    probes = loader.load(mode, REPLAY_OPTIONS)
    try:
        attributor = Attributor(config, live=False, trust_unmatched_dns=trust_unmatched_dns)
        result = Replayer(probes, attributor).run(path)
        return flow_records(result, attributor), result
    finally:
        probes.close()


def main(args: Any, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout  # looked up now: tests swap stdout
    config = load_config(args.config)
    # a PcapError reaches the CLI, which prints it as one line (exit 2)
    records, result = replay(
        args.pcap, config, getattr(args, "mode", "tc") or "tc",
        trust_unmatched_dns=bool(getattr(args, "trust_unmatched_dns", False)),
    )
    for rec in records:
        out.write(json.dumps(rec) + "\n")
    # parse_len_clamped and the port-less kinds are still attributed to a flow
    attributed_anyway = {"parse_len_clamped", "parse_fragment", "parse_other_l4"}
    unparsed = {
        k: v for k, v in result.stats.items()
        if k.startswith("parse_") and k not in attributed_anyway
    }
    losses = {k: v for k, v in result.stats.items() if k.startswith("loss_")}
    logger.info("replayed %d frames into %d flows", result.frames, len(records))
    if unparsed or result.too_short:
        logger.warning(
            "packets not attributed to a flow (counted in totals): %s%s",
            ", ".join(f"{k}={v}" for k, v in sorted(unparsed.items())) or "none",
            f", shorter than an Ethernet header={result.too_short}" if result.too_short else "",
        )
    if result.cut_to_fit:
        logger.info(
            "%d frames larger than a test-run skb (%d bytes) were fed truncated; their "
            "bytes are counted in full", result.cut_to_fit, testrun.MAX_FRAME,
        )
    if losses:
        logger.warning("samples lost: %s", ", ".join(f"{k}={v}" for k, v in sorted(losses.items())))
    _report_dns(result.dns)
    return 0


def _report_dns(stats: DnsCacheStats | None) -> None:
    """Say which DNS answers named nothing, and why."""
    if stats is None:
        return
    rejected = {
        f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)
        if f.name.startswith("rejected_") and getattr(stats, f.name)
    }
    if rejected:
        logger.warning(
            "DNS answers not learned: %s", ", ".join(f"{k}={v}" for k, v in rejected.items())
        )
    if stats.rejected_no_query:
        logger.warning(
            "%d DNS answer(s) without their query in the capture named nothing; if the "
            "capture started after the queries, --trust-unmatched-dns learns them",
            stats.rejected_no_query,
        )
    if stats.trusted_unmatched:
        logger.info("%d DNS answer(s) without a query learned (--trust-unmatched-dns)",
                    stats.trusted_unmatched)
