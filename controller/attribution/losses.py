"""User-space give-ups as loss counters with a remedy, like the kernel's.

The ClientHello reassembler, the QUIC Initial assembler and the DNS cache count
what they give up in their stats dataclasses (ReassemblyStats, QuicStats,
DnsCacheStats). Every field of those is exported: a field named in OUTCOMES is
a normal outcome (a hello completed, an answer learned); any other field,
including ones added later, is a drop reason, with its remedy from REMEDIES or
the stage's default. So a new counter is exported the day it is added.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

logger = logging.getLogger(__name__)

# stage -> the Attributor attribute whose `.stats` dataclass it exports
STAGES = {"tls_reassembly": "hellos", "quic": "quic", "dns_cache": "dns",
          "kernel_names": "kernel_names"}

# fields that count normal outcomes, not losses
OUTCOMES = {
    "tls_reassembly": frozenset({"completed", "ignored"}),  # ignored: after completion
    "quic": frozenset({"completed", "gquic", "ignored"}),
    # no_name: a hello without a server name, as user space reads it too
    "kernel_names": frozenset({"named", "no_name"}),
    # expired: the TTL passed; queries*: the pending-query table's bookkeeping;
    # trusted_unmatched: learned without a query where that is configured;
    # dns_sni_mismatch: a finding (a hello contradicted the DNS name), nothing lost
    "dns_cache": frozenset({"learned", "expired", "queries", "queries_matched",
                            "queries_inbound", "queries_not_inside", "queries_other_resolver",
                            "trusted_unmatched", "dns_sni_mismatch"}),
}

REMEDIES = {
    "tls_reassembly": {
        "not_tls": "a stream opening like a TLS record is no ClientHello (or is malformed); "
                   "benign unless it grows: those flows have no SNI",
        "gave_up_bytes": "ClientHello larger than the reassembly bound (large post-quantum key "
                         "shares, many extensions): raise MAX_HELLO_BYTES",
        "gave_up_segments": "ClientHello spread over more segments than the bound (a split-hello "
                            "evasion or a tiny MSS): raise the reassembler's max_segments",
        "evicted": "more handshakes in flight than the reassembler holds: a burst of new TLS "
                   "flows; raise its max_flows",
        "expired": "ClientHello not completed within its age limit: segments lost in the kernel "
                   "(see the kernel losses) or a stalled client",
    },
    "quic": {
        "not_initial": "UDP datagrams sampled as QUIC that hold no client Initial; benign unless "
                       "it grows with QUIC use",
        "decrypt_failed": "Initial not decryptable (unknown QUIC version or corrupted): those "
                          "flows have no SNI; report the version",
        "bad_frames": "malformed frames in a decrypted Initial; report with a capture",
        "not_client_hello": "CRYPTO stream is not a ClientHello; report with a capture",
        "gave_up_bytes": "ClientHello larger than the CRYPTO bound: raise MAX_CRYPTO_BYTES",
        "gave_up_datagrams": "ClientHello spread over more Initials than the bound: raise the "
                             "assembler's max_datagrams",
        "evicted": "more QUIC handshakes in flight than the assembler holds: raise its max_flows",
        "expired": "QUIC ClientHello not completed within its age limit: Initials lost in the "
                   "kernel (see the kernel losses)",
    },
    "kernel_names": {
        "malformed": "hellos the kernel found malformed went to the ring instead of being "
                     "named in the kernel; user space reports what was sent (see "
                     "tls_reassembly); benign unless it grows",
        "limit": "hellos with more extensions or list entries than the kernel's loops walk "
                 "(LT_SNI_EXT_MAX, LT_SNI_LIST_MAX) went to the ring for user space to name; "
                 "raise those bounds if this grows",
        "unknown_outcome": "the kernel program is newer than this controller: restart the "
                           "agent so both come from one build",
    },
    "dns_cache": {
        "evictions": "more addresses than the DNS cache holds: SNI-less flows to evicted "
                     "addresses lose their names; raise the cache's max_entries",
        "unrelated": "answer records not chained to the question, ignored on purpose "
                     "(spoofing or an unusual resolver)",
        "ignored_messages": "queries, error answers and unparsable messages; expected unless "
                            "answers are unparsable",
        "queries_evicted": "more DNS queries in flight than the pending table holds: their "
                           "answers will not name addresses; raise dns.pending_max",
        "queries_unanswered": "queries whose answer never came (or was lost in the kernel: see "
                              "the kernel losses); benign in small numbers",
        "rejected_no_query": "answers to no query this host sent (spoofed, or the query was not "
                             "captured): not trusted for names",
        "rejected_wrong_resolver": "an answer from another address than the query went to: "
                                   "spoofing, or a NAT/anycast resolver to list in dns.resolvers",
        "rejected_question_mismatch": "an answer whose question is not the query's: spoofing "
                                      "or a broken resolver",
        "rejected_id_mismatch": "an answer with another id than the query's: a burst is a "
                                "spoofing attempt",
        "rejected_expired": "an answer later than dns.query_window_s after its query: raise it "
                            "for slow resolvers",
        "rejected_outbound_answer": "a local process answering DNS: its answers never name this "
                                    "host's flows",
    },
}
DEFAULT_REMEDY = {
    "tls_reassembly": "ClientHellos given up: those flows have no SNI; "
                      "see controller/protocols/tls.py",
    "quic": "QUIC Initials given up: those flows have no SNI; see controller/protocols/quic.py",
    "kernel_names": "hellos the kernel did not name went to the ring; see "
                    "controller/attribution/kernel_names.py",
    "dns_cache": "DNS answers not used for names: SNI-less flows to those addresses stay "
                 "unnamed; see controller/attribution/dns_cache.py",
}
FALLBACK_REMEDY = "user-space give-up without a documented remedy: report it with /v1/stats"


def remedy(stage: str, reason: str) -> str:
    return REMEDIES.get(stage, {}).get(reason) or DEFAULT_REMEDY.get(stage, FALLBACK_REMEDY)


def counters(attributor: Any) -> dict[str, dict[str, int]]:
    """stage -> every counter of its stats dataclass (outcomes and drops)."""
    out: dict[str, dict[str, int]] = {}
    for stage, attr in STAGES.items():
        stats = getattr(getattr(attributor, attr, None), "stats", None)
        if stats is None or not dataclasses.is_dataclass(stats):
            continue
        out[stage] = {
            f.name: int(getattr(stats, f.name)) for f in dataclasses.fields(stats)
            if isinstance(getattr(stats, f.name), int)
        }
    return out


def drops(attributor: Any) -> dict[tuple[str, str], int]:
    """(stage, reason) -> count of every drop counter, zero ones included."""
    return {
        (stage, name): value
        for stage, values in counters(attributor).items()
        for name, value in values.items()
        if name not in OUTCOMES.get(stage, frozenset())
    }


class UserspaceLossMonitor:
    """Logs the rise of each user-space drop counter since the previous check."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], int] | None = None

    def check(self, attributor: Any) -> dict[tuple[str, str], int]:
        now = drops(attributor)
        last = self._last if self._last is not None else {}
        self._last = now
        rises = {k: v - last.get(k, 0) for k, v in now.items() if v > last.get(k, 0)}
        for (stage, reason), count in sorted(rises.items()):
            logger.warning("user space gave up %d time(s): %s/%s — %s",
                           count, stage, reason, remedy(stage, reason))
        return rises
