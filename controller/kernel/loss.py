"""Turns the kernel's monotonic loss counters into warnings with a remedy.

Counters are read as totals and compared with the previous reading (never
read-then-reset, which races with the kernel). Every increase of a LT_LOSS_*
counter is logged once per poll at WARNING with what to change.
"""

from __future__ import annotations

import logging

from leaktap.controller.kernel import abi

logger = logging.getLogger(__name__)

REMEDIES = {
    "loss_ringbuf_full": "raise kernel.ringbuf_pages or check that the controller keeps up",
    "loss_rate_limited": "raise LT_EVENTS_PER_SEC if this rate of new TLS flows is expected",
    "loss_truncated": (
        f"payload longer than one event (DNS > {abi.defines()['LT_DNS_SNAP']} B, hello > "
        f"{abi.defines()['LT_HELLO_CHUNKS']} chunks); usually benign"
    ),
    "loss_flow_insert": "raise kernel.flows_max",
    "loss_cgroup_full": "more cgroups than LT_CGROUPS_MAX; their bytes stay in the global totals",
    "loss_hello_pending": "raise LT_HELLO_PENDING_MAX (too many handshakes in flight)",
    "loss_hello_segs": "raise kernel.hello_segments_max (ClientHello spans more segments)",
    "loss_hello_walk": (
        "a ClientHello split into more TLS records per segment than LT_HELLO_WALK_STEPS "
        "walks (an evasion attempt?); it is still captured up to kernel.hello_segments_max"
    ),
    "loss_hello_gap": (
        "a ClientHello segment arrived past bytes never seen (reordering on a mirror port, "
        "or an earlier event lost); it is still captured up to kernel.hello_segments_max"
    ),
    "loss_load_bytes": "packet payload unreadable; report this with the kernel version",
    "loss_sni_tail": (
        "the server-name tail program could not be called (not loaded, or the tail-call "
        "limit): those hellos are named from the ring event only; restart the agent"
    ),
    # server names the kernel could not read (issue 12): each such hello goes to the
    # ring and user space names it there, unless the ring loses it too (loss_ringbuf_full)
    "sni_giveup_names_full": (
        "lt_names was full: the agent's poll fell behind the new TLS flows (see the poll "
        "duration and the flow drain); those names went through the ring instead; raise "
        "LT_NAMES_MAX if this recurs"
    ),
    "sni_giveup_too_long": (
        f"a ClientHello longer than LT_HELLO_BUF ({abi.defines()['LT_HELLO_BUF']} B): named "
        "by user space from the ring"
    ),
    "sni_giveup_limit": (
        "a ClientHello with more extensions or list entries than the kernel's loops walk "
        "(LT_SNI_EXT_MAX, LT_SNI_LIST_MAX): named by user space from the ring"
    ),
    "sni_giveup_records": (
        "a ClientHello spread over several TLS records (an evasion of SNI inspection, or an "
        "unusual client): named by user space from the ring; an enforcing tenant's is "
        "judged by address"
    ),
    "sni_giveup_gap": (
        "a split ClientHello with a hole, or no room in lt_hello_bufs: named by user space "
        "from the ring; an enforcing tenant's is judged by address"
    ),
    "loss_enf_event": (
        "an enforcement decision was not reported (ring full): it was still enforced, "
        "but its alert, audit row and socket destruction are missing; raise "
        "kernel.ringbuf_pages"
    ),
    "loss_enf_block_insert": (
        "a blocked flow could not be remembered (lt_blocked full): its hello was dropped, "
        "but later packets of that flow may pass; raise LT_BLOCKED_MAX"
    ),
}


class LossMonitor:
    """Logs the increase of each loss counter since the previous check."""

    def __init__(self, prefix: str | tuple[str, ...] = ("loss_", "sni_giveup_"),
                 remedies: dict[str, str] | None = None) -> None:
        self._last: dict[str, int] | None = None
        self._prefix = prefix
        self._remedies = REMEDIES if remedies is None else remedies

    def check(self, stats: dict[str, int]) -> dict[str, int]:
        """Returns {reason: increase} for the loss counters that rose."""
        last = self._last if self._last is not None else stats
        self._last = dict(stats)
        rises = {
            k: v - last.get(k, 0)
            for k, v in stats.items()
            if k.startswith(self._prefix) and v > last.get(k, 0)
        }
        for reason, count in sorted(rises.items()):
            logger.warning(
                "kernel lost %d sample(s)/update(s): %s — %s",
                count, reason, self._remedies.get(reason, "see bpf/include/lt_types.h"),
            )
        return rises
