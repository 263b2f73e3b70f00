"""Joining the two directions of a flow into one conversation.

The kernel counts packets in packet direction (src sent them). A
conversation is both directions of one 5-tuple; its initiator is the side
that sent the SYN, or the side whose first packet came first (a UDP
client, or a TCP flow whose handshake was not seen). bytes_out are the
initiator's bytes: on a node, the inside host's upload.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from leaktap.controller.kernel import abi
from leaktap.controller.kernel.maps import FlowCounters, FlowKey

NO_UID = 0xFFFFFFFF


def _overflow_uid() -> int:
    try:
        return int(Path("/proc/sys/kernel/overflowuid").read_text())
    except (OSError, ValueError):
        return 65534


OVERFLOW_UID = _overflow_uid()
_FLAGS = abi.flow_flags()
FF_SYN = _FLAGS["LT_FF_SYN"]
FF_SYNACK = _FLAGS["LT_FF_SYNACK"]


@dataclass(slots=True)
class Direction:
    """Accumulated counters of one direction of a conversation."""

    bytes: int = 0
    packets: int = 0
    first_seen_ns: int = 0
    last_seen_ns: int = 0
    flags: int = 0
    cgroup_id: int = 0
    uid: int = NO_UID

    def add(self, c: FlowCounters, extra_bytes: int = 0) -> None:
        self.bytes += c.tx_bytes + extra_bytes
        self.packets += c.tx_packets
        if not self.first_seen_ns or c.first_seen_ns < self.first_seen_ns:
            self.first_seen_ns = c.first_seen_ns
        self.last_seen_ns = max(self.last_seen_ns, c.last_seen_ns)
        self.flags |= c.flags
        if c.key.cgroup_id:
            self.cgroup_id = c.key.cgroup_id
        # keep the first real owner: packets without a full socket (time-wait
        # ACKs, ingress) report the kernel's overflow uid instead
        if self.uid == NO_UID and c.uid not in (NO_UID, OVERFLOW_UID):
            self.uid = c.uid


@dataclass(slots=True)
class Conversation:
    """Both directions of one (family, proto, endpoints) flow."""

    family: int
    proto: int
    a: tuple[str, int]
    b: tuple[str, int]
    a_to_b: Direction = field(default_factory=Direction)
    b_to_a: Direction = field(default_factory=Direction)
    # live agent: which endpoint is this host (known from the hook that saw it)
    local_is_a: bool | None = None
    row_id: int | None = None  # the storage row recording this conversation
    named: bool = False  # its volume has been attributed (by SNI, or DNS after waiting)

    def initiator_is_a(self) -> bool:
        ab, ba = self.a_to_b, self.b_to_a
        if bool(ab.flags & FF_SYN) != bool(ba.flags & FF_SYN):
            return bool(ab.flags & FF_SYN)
        if bool(ab.flags & FF_SYNACK) != bool(ba.flags & FF_SYNACK):
            return bool(ba.flags & FF_SYNACK)
        if not ba.packets:
            return True
        if not ab.packets:
            return False
        return ab.first_seen_ns <= ba.first_seen_ns

    def is_outbound(self, key: FlowKey) -> bool:
        """Whether packets counted under `key` left the local (tenant) side."""
        (src, sport), _, _, _ = self.oriented(prefer_local=True)
        return (key.src, key.sport) == (src, sport)

    def oriented(
        self, prefer_local: bool = False
    ) -> tuple[tuple[str, int], tuple[str, int], Direction, Direction]:
        """(src, dst, out, in): src is the initiator, or with prefer_local this host."""
        a_first = self.local_is_a if prefer_local and self.local_is_a is not None else None
        if a_first is None:
            a_first = self.initiator_is_a()
        if a_first:
            return self.a, self.b, self.a_to_b, self.b_to_a
        return self.b, self.a, self.b_to_a, self.a_to_b


ConversationId = tuple[int, int, tuple[str, int], tuple[str, int]]


def conversation_id(key: FlowKey) -> ConversationId:
    """Direction-free identity: endpoints in a canonical order (cgroup and hook ignored)."""
    ends = sorted([(key.src, key.sport), (key.dst, key.dport)])
    return key.family, key.proto, ends[0], ends[1]


class ConversationTable:
    """Accumulates drained flow counters into conversations.

    `inside` (gateway mode): the networks whose hosts are the tenant side; a
    conversation is then oriented from its inside endpoint. Without it the
    local side is known from the hook (egress: this host sent it).
    """

    def __init__(self, inside: list[str] | None = None) -> None:
        self.conversations: dict[ConversationId, Conversation] = {}
        self.inside = [ipaddress.ip_network(n, strict=False) for n in inside or []]

    def _is_inside(self, addr: str) -> bool:
        ip = ipaddress.ip_address(addr)
        return any(ip.version == n.version and ip in n for n in self.inside)

    def add(self, c: FlowCounters, extra_bytes: int = 0) -> Conversation:
        """Add one drained entry; extra_bytes corrects for synthetic link headers."""
        cid = conversation_id(c.key)
        conv = self.conversations.get(cid)
        if conv is None:
            conv = Conversation(cid[0], cid[1], cid[2], cid[3])
            self.conversations[cid] = conv
        sent_by_a = (c.key.src, c.key.sport) == conv.a
        (conv.a_to_b if sent_by_a else conv.b_to_a).add(c, extra_bytes)
        if self.inside:
            a_in, b_in = self._is_inside(conv.a[0]), self._is_inside(conv.b[0])
            conv.local_is_a = a_in if a_in != b_in else None  # both or neither: initiator
        else:
            # egress entries were sent by this host, ingress entries received by it
            conv.local_is_a = sent_by_a if c.key.dir == 0 else not sent_by_a
        return conv

    def adopt(self, conv: Conversation) -> None:
        """Take in a conversation restored from storage (attribution/resume.py)."""
        self.conversations[(conv.family, conv.proto, conv.a, conv.b)] = conv

    def expire(self, idle_before_ns: int) -> list[Conversation]:
        """Remove and return conversations with no packet since idle_before_ns."""
        gone = [
            cid for cid, c in self.conversations.items()
            if max(c.a_to_b.last_seen_ns, c.b_to_a.last_seen_ns) < idle_before_ns
        ]
        return [self.conversations.pop(cid) for cid in gone]

    def __len__(self) -> int:
        return len(self.conversations)
