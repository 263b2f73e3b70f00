"""The live agent's conversations as columns (issue 16.5: 100,000 flows a second
in a bounded, small heap).

attribution/flows.py's ConversationTable keeps one Python object graph per
conversation (about 1 KB each); here a conversation is a slot in numpy columns
(about 160 bytes) and a drained FlowBatch is folded in with array operations.
Python objects (flows.Conversation) are made only for the conversations that
need them: new ones, ones waiting for a name, ones whose names may have changed,
and the ones that expire. The semantics are ConversationTable's: both packet
directions of one (family, proto, endpoints) are one conversation, `a` is the
lower endpoint as conversation_id orders them, the local side comes from the
hook (or the `inside` networks in gateway mode), else the initiator.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from leaktap.controller.attribution.attributor import Attributor, _sample_key
from leaktap.controller.attribution.flows import (
    FF_SYN,
    FF_SYNACK,
    NO_UID,
    OVERFLOW_UID,
    Conversation,
    ConversationId,
    Direction,
    conversation_id,
)
from leaktap.controller.kernel.flow_batch import IDENT, U64_MAX, FlowBatch
from leaktap.controller.kernel.maps import NameRow, addr_bytes, addr_text
from leaktap.controller.kernel.ringbuf import Sample

Array = npt.NDArray[Any]
_IDENT = struct.Struct("<16s16sHHBBH")
assert _IDENT.size == IDENT.itemsize
FIRST_CAPACITY = 1024
# per slot: (kind, dtype, shape after the slot axis); side 0 is a->b, side 1 is b->a
_COLUMNS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "family": (np.uint8, ()), "proto": (np.uint8, ()),
    "addr": (np.uint8, (2, 16)), "port": (np.uint16, (2,)),
    "bytes": (np.uint64, (2,)), "packets": (np.uint64, (2,)),
    "first": (np.uint64, (2,)), "last": (np.uint64, (2,)),
    "flags": (np.uint32, (2,)), "cgroup": (np.uint64, (2,)), "uid": (np.uint32, (2,)),
    "local_is_a": (np.int8, ()),  # 1, 0, or -1: unknown (the initiator is local)
    "row_id": (np.int64, ()),  # 0: no storage row yet
    "named": (np.bool_, ()),  # its volume has been attributed (Conversation.named)
    "names_id": (np.int32, ()),  # NameSets id of its current names; -1: to (re)compute
    "row_names_id": (np.int32, ()),  # the names its storage row holds
    "dirty": (np.bool_, ()),  # counters changed since its row was written
    "written_ns": (np.int64, ()),  # when its row was last written (oldest first)
    "live": (np.bool_, ()),
}
_INITIAL = {"uid": NO_UID, "local_is_a": -1, "names_id": -1, "row_names_id": -1}


def ident_of(family: int, proto: int, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """The FlowBatch.idents bytes of packets from `src` to `dst`."""
    return _IDENT.pack(addr_bytes(src[0]), addr_bytes(dst[0]), src[1], dst[1], family, proto,
                       0)


_SEED, _MIX = np.uint64(0xCBF29CE484222325), np.uint64(0x9E3779B97F4A7C15)


def ident_hashes(idents: Array) -> Array:
    """64-bit hashes of (n,) IDENT-sized identities (the index's sort key)."""
    words = np.ascontiguousarray(idents).view(np.uint64).reshape(-1, IDENT.itemsize // 8)
    h = np.full(len(words), _SEED, np.uint64)
    for j in range(words.shape[1]):
        h = (h ^ words[:, j]) * _MIX
        h ^= h >> np.uint64(31)
    return h


def _reverse_idents(idents: Array) -> Array:
    """The identities of the other packet direction ((n,) V40)."""
    rows = np.ascontiguousarray(idents).view(IDENT)
    out = rows.copy()
    out["saddr"], out["daddr"] = rows["daddr"], rows["saddr"]
    out["sport"], out["dport"] = rows["dport"], rows["sport"]
    return out.view(f"V{IDENT.itemsize}").ravel()


def _reverse(ident: bytes) -> bytes:
    return ident[16:32] + ident[0:16] + ident[34:36] + ident[32:34] + ident[36:]


class LiveConversations:
    """Conversations of the live agent, one slot of numpy columns each."""

    def __init__(self, inside: list[str] | None = None) -> None:
        self.inside = [ipaddress.ip_network(n, strict=False) for n in inside or []]
        # the index: packet-direction identity -> code (slot * 2 + 1 when b sent those
        # packets), as sorted identity hashes and their codes (12 bytes an entry where a
        # dict of bytes takes ~170); an identity whose hash another one holds waits in
        # `_collided` (a 64-bit hash: practically never)
        self._hashes = np.zeros(0, np.uint64)
        self._codes = np.zeros(0, np.int64)
        self._collided: dict[bytes, int] = {}
        self.capacity = 0
        self.size = 0  # slots ever used (high-water mark)
        self._free: list[int] = []
        self._count = 0
        self.cols: dict[str, Array] = {}
        self._grow(FIRST_CAPACITY)

    def __len__(self) -> int:
        return self._count

    def _grow(self, capacity: int) -> None:
        for name, (dtype, shape) in _COLUMNS.items():
            col = np.full((capacity, *shape), _INITIAL.get(name, 0), dtype=dtype)
            old = self.cols.get(name)
            if old is not None:
                col[: self.capacity] = old
            self.cols[name] = col
        self.capacity = capacity

    def _new_slot(self) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            if self.size == self.capacity:
                # by a quarter: 100,000 conversations take 102,400 slots, not 131,072
                # (the copy is one column at a time, amortised over the growth)
                self._grow(self.capacity + max(self.capacity // 4, FIRST_CAPACITY))
            slot = self.size
            self.size += 1
        self._count += 1
        self.cols["live"][slot] = True
        return slot

    def _clear_slot(self, slot: int) -> None:
        for name, col in self.cols.items():
            col[slot] = _INITIAL.get(name, 0)
        self._free.append(slot)
        self._count -= 1

    # -- folding a drain in ------------------------------------------------------

    def locate(self, batch: FlowBatch) -> tuple[Array, Array, list[int]]:
        """(slot, sent by a) of each row, and the rows that opened a conversation."""
        idents = batch.idents()
        hashes = ident_hashes(idents)
        codes = self._find(idents, hashes)
        created: list[int] = []
        misses = np.flatnonzero(codes < 0)
        if len(misses) and self._collided:
            for i in misses.tolist():
                codes[i] = self._collided.get(idents[i].tobytes(), -1)
            misses = np.flatnonzero(codes < 0)
        if len(misses):
            self._open(batch, idents, hashes, codes, misses, created)
        return codes >> 1, (codes & 1) == 0, created

    def _open(self, batch: FlowBatch, idents: Array, hashes: Array, codes: Array,
              misses: Array, created: list[int]) -> None:
        """Codes for the identities the index lacks, in arrays: the first row of each
        (its lead) joins the conversation of its other direction (indexed, or a lead
        of this drain) or opens one, in row order; no per-row dict of bytes."""
        distinct, first, inverse = np.unique(hashes[misses], return_index=True,
                                             return_inverse=True)
        leads = misses[first]
        lead_idents = idents[leads]
        same = idents[misses] == lead_idents[inverse]  # False: a hash shared in this drain
        reverse = _reverse_idents(lead_idents)
        reverse_hashes = ident_hashes(reverse)
        lead_codes = self._find(reverse, reverse_hashes)
        lead_codes[lead_codes >= 0] ^= 1  # the conversation's other direction
        partner = np.minimum(np.searchsorted(distinct, reverse_hashes), len(distinct) - 1)
        paired = (distinct[partner] == reverse_hashes) & (lead_idents[partner] == reverse)
        for k in np.argsort(leads, kind="stable").tolist():  # row order
            if lead_codes[k] >= 0:
                continue
            other = int(lead_codes[partner[k]]) if paired[k] else -1
            if other >= 0:
                lead_codes[k] = other ^ 1
            else:
                lead_codes[k] = self._create(batch, int(leads[k]))
                created.append(int(leads[k]))
        codes[misses[same]] = lead_codes[inverse[same]]
        taken = self._hashes_taken(distinct)
        for k in np.flatnonzero(taken).tolist():  # another identity holds its hash
            self._collided[lead_idents[k].tobytes()] = int(lead_codes[k])
        hs = np.concatenate([self._hashes, distinct[~taken]])
        cs = np.concatenate([self._codes, lead_codes[~taken]])
        order = np.argsort(hs, kind="stable")
        self._hashes, self._codes = hs[order], cs[order]
        for i in misses[~same].tolist():  # practically never: one by one
            ident = idents[i].tobytes()
            code = self.code_of(ident)
            if code is None:
                other_code = self.code_of(_reverse(ident))
                if other_code is not None:
                    code = other_code ^ 1
                else:
                    code = self._create(batch, i)
                    created.append(i)
                self._collided[ident] = code
            codes[i] = code
        created.sort()

    def _find(self, idents: Array, hashes: Array) -> Array:
        """Codes of identities in the sorted index (-1: not there)."""
        codes = np.full(len(idents), -1, np.int64)
        if not len(self._hashes) or not len(idents):
            return codes
        at = np.minimum(np.searchsorted(self._hashes, hashes), len(self._hashes) - 1)
        rows = np.flatnonzero(self._hashes[at] == hashes)
        found = self._codes[at[rows]]
        # the slot's own identity in that direction: a hash match is checked
        same = self._slot_idents(found >> 1, (found & 1) == 0) == idents[rows]
        codes[rows[same]] = found[same]
        return codes

    def _hashes_taken(self, hashes: Array) -> Array:
        if not len(self._hashes):
            return np.zeros(len(hashes), bool)
        at = np.minimum(np.searchsorted(self._hashes, hashes), len(self._hashes) - 1)
        return self._hashes[at] == hashes  # type: ignore[no-any-return]

    def code_of(self, ident: bytes) -> int | None:
        """The index's code of one identity, if any."""
        code = self._collided.get(ident)
        if code is not None:
            return code
        one = np.frombuffer(ident, f"V{IDENT.itemsize}")
        found = int(self._find(one, ident_hashes(one))[0])
        return None if found < 0 else found

    def _slot_idents(self, slots: Array, sender_is_a: Array) -> Array:
        """The identities of packets sent by a (or b) of each slot."""
        c = self.cols
        out = np.zeros(len(slots), IDENT)
        a, b = c["addr"][slots, 0], c["addr"][slots, 1]
        src = np.where(sender_is_a[:, None], a, b)
        dst = np.where(sender_is_a[:, None], b, a)
        out["saddr"] = np.ascontiguousarray(src).view("V16").ravel()
        out["daddr"] = np.ascontiguousarray(dst).view("V16").ravel()
        port_a, port_b = c["port"][slots, 0], c["port"][slots, 1]
        out["sport"] = np.where(sender_is_a, port_a, port_b)
        out["dport"] = np.where(sender_is_a, port_b, port_a)
        out["family"], out["proto"] = c["family"][slots], c["proto"][slots]
        return out.view(f"V{IDENT.itemsize}").ravel()

    def _create(self, batch: FlowBatch, i: int) -> int:
        family = int(batch.family[i])
        saddr, daddr = batch.saddr[i].tobytes(), batch.daddr[i].tobytes()
        src = (addr_text(family, saddr), int(batch.sport[i]))
        dst = (addr_text(family, daddr), int(batch.dport[i]))
        sender_is_a = src <= dst  # conversation_id's order
        slot = self._new_slot()
        c = self.cols
        c["family"][slot], c["proto"][slot] = family, int(batch.proto[i])
        a_raw, b_raw = (saddr, daddr) if sender_is_a else (daddr, saddr)
        c["addr"][slot, 0] = np.frombuffer(a_raw, np.uint8)
        c["addr"][slot, 1] = np.frombuffer(b_raw, np.uint8)
        c["port"][slot] = (src[1], dst[1]) if sender_is_a else (dst[1], src[1])
        if self.inside:
            a_in, b_in = (self._is_inside(x[0]) for x in ((src, dst) if sender_is_a
                                                          else (dst, src)))
            c["local_is_a"][slot] = int(a_in) if a_in != b_in else -1
        return slot * 2 + (0 if sender_is_a else 1)

    def _is_inside(self, addr: str) -> bool:
        ip = ipaddress.ip_address(addr)
        return any(ip.version == n.version and ip in n for n in self.inside)

    def accumulate(self, batch: FlowBatch, slots: Array, sent_by_a: Array) -> Array:
        """Add each row to its conversation (Direction.add); returns the slots whose
        owner (cgroup, uid) or orientation changed, whose names may differ now."""
        c = self.cols
        side = np.where(sent_by_a, 0, 1)
        at = (slots, side)
        before = (c["cgroup"][slots].copy(), c["uid"][slots].copy(), self.local_a(slots))
        np.add.at(c["bytes"], at, batch.tx_bytes)
        np.add.at(c["packets"], at, batch.tx_packets)
        first = c["first"]
        unset = first[at] == 0
        first[slots[unset], side[unset]] = U64_MAX
        np.minimum.at(first, at, batch.first_seen_ns)
        first[first == U64_MAX] = 0
        np.maximum.at(c["last"], at, np.uint64(batch.now_ns))
        np.bitwise_or.at(c["flags"], at, batch.flags)
        nz = batch.cgroup_id != 0  # the latest non-zero cgroup
        c["cgroup"][slots[nz], side[nz]] = batch.cgroup_id[nz]
        # the first real owner: time-wait ACKs and ingress report the overflow uid
        real = ((c["uid"][at] == NO_UID) & (batch.uid != NO_UID)
                & (batch.uid != OVERFLOW_UID))
        c["uid"][slots[real][::-1], side[real][::-1]] = batch.uid[real][::-1]
        if not self.inside:  # egress entries were sent by this host, ingress received
            c["local_is_a"][slots] = np.where(batch.dir == 0, sent_by_a, ~sent_by_a)
        c["dirty"][slots] = True
        changed = ((c["cgroup"][slots] != before[0]).any(axis=1)
                   | (c["uid"][slots] != before[1]).any(axis=1)
                   | (self.local_a(slots) != before[2]))
        return np.unique(slots[changed])

    def local_a(self, slots: Array) -> Array:
        """Whether `a` is the side Conversation.oriented(prefer_local=True) puts first."""
        c = self.cols
        flags, packets, first = c["flags"][slots], c["packets"][slots], c["first"][slots]
        syn, synack = (flags & FF_SYN) != 0, (flags & FF_SYNACK) != 0
        initiator_a = np.where(
            syn[:, 0] != syn[:, 1], syn[:, 0],
            np.where(synack[:, 0] != synack[:, 1], synack[:, 1],
                     np.where(packets[:, 1] == 0, True,
                              np.where(packets[:, 0] == 0, False, first[:, 0] <= first[:, 1]))))
        local = c["local_is_a"][slots]
        return np.where(local >= 0, local == 1, initiator_a)

    def outbound(self, slots: Array, sent_by_a: Array) -> Array:
        """Conversation.is_outbound of each row's packets."""
        return sent_by_a == self.local_a(slots)  # type: ignore[no-any-return]

    # -- objects for the few that need them ---------------------------------------

    def ends(self, slot: int) -> tuple[tuple[str, int], tuple[str, int]]:
        family = int(self.cols["family"][slot])
        raw = self.cols["addr"][slot].tobytes()
        port_a, port_b = self.cols["port"][slot].tolist()
        return ((addr_text(family, raw[:16]), port_a), (addr_text(family, raw[16:]), port_b))

    def conversation(self, slot: int) -> Conversation:
        """A copy of the slot as flows.Conversation (store() writes one back)."""
        c = self.cols
        a, b = self.ends(slot)
        per_side = zip(c["bytes"][slot].tolist(), c["packets"][slot].tolist(),
                       c["first"][slot].tolist(), c["last"][slot].tolist(),
                       c["flags"][slot].tolist(), c["cgroup"][slot].tolist(),
                       c["uid"][slot].tolist(), strict=True)
        ab, ba = (Direction(*values) for values in per_side)
        local = int(c["local_is_a"][slot])
        return Conversation(int(c["family"][slot]), int(c["proto"][slot]), a, b, ab, ba,
                            None if local < 0 else bool(local), int(c["row_id"][slot]) or None,
                            bool(c["named"][slot]))

    def store(self, slot: int, conv: Conversation) -> None:
        """Write a conversation's counters and state into its slot (a resumed one)."""
        c = self.cols
        for s, d in enumerate((conv.a_to_b, conv.b_to_a)):
            c["bytes"][slot, s], c["packets"][slot, s] = d.bytes, d.packets
            c["first"][slot, s], c["last"][slot, s] = d.first_seen_ns, d.last_seen_ns
            c["flags"][slot, s], c["cgroup"][slot, s], c["uid"][slot, s] = (
                d.flags, d.cgroup_id, d.uid)
        c["local_is_a"][slot] = -1 if conv.local_is_a is None else int(conv.local_is_a)
        c["row_id"][slot] = conv.row_id or 0
        c["named"][slot] = conv.named

    def slot_of(self, cid: ConversationId) -> int | None:
        family, proto, a, b = cid
        try:
            ident = ident_of(family, proto, a, b)
        except (OSError, ValueError):
            return None
        code = self.code_of(ident)
        if code is None:
            code = self.code_of(_reverse(ident))
        return None if code is None else code >> 1

    def slots_with_addresses(self, addrs: set[str]) -> Array:
        """Live slots with one of `addrs` as an endpoint."""
        wanted: set[bytes] = set()
        for text in addrs:
            try:
                wanted.add(ipaddress.ip_address(text).packed.ljust(16, b"\0"))
            except ValueError:
                continue
        if not wanted or not self.size:
            return np.zeros(0, np.int64)
        words = self.cols["addr"][: self.size].view(np.uint64)  # (slots, 2, 2)
        lows = np.frombuffer(b"".join(w[:8] for w in wanted), np.uint64)
        maybe = np.flatnonzero(np.isin(words[:, :, 0], lows).any(axis=1)
                               & self.cols["live"][: self.size])
        addr = self.cols["addr"]
        return np.array([s for s in maybe.tolist() if addr[s, 0].tobytes() in wanted
                         or addr[s, 1].tobytes() in wanted], np.int64)

    def forget_names(self) -> None:
        """Every conversation's names are worked out again (tenants changed)."""
        self.cols["names_id"][:] = -1

    def live_slots(self) -> Array:
        return np.flatnonzero(self.cols["live"][: self.size])

    def expire(self, idle_before_ns: int) -> list[Conversation]:
        """Remove and return conversations with no packet since idle_before_ns."""
        c = self.cols
        n = self.size
        idle = c["live"][:n] & (c["last"][:n].max(axis=1) < np.uint64(max(idle_before_ns, 0)))
        slots = np.flatnonzero(idle)
        if not len(slots):
            return []
        gone = [self.conversation(slot) for slot in slots.tolist()]
        for slot in slots.tolist():
            self._clear_slot(slot)
        kept = ~np.isin(self._codes >> 1, slots)
        self._hashes, self._codes = self._hashes[kept], self._codes[kept]
        dropped = set(slots.tolist())
        self._collided = {k: v for k, v in self._collided.items() if v >> 1 not in dropped}
        return gone


def destination_of(names: Any, remote: str) -> str:
    """The destination a minute bucket names: the server name, else the first DNS
    name, else the remote address."""
    return str(names.sni or (names.dns_names[0] if names.dns_names else remote))


class NameSets:
    """Distinct (names, bucket destination) pairs, each conversation holding an id:
    a poll groups its volume by id instead of naming every flow again."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, str]] = []
        self._ids: dict[tuple[Any, ...], int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def intern(self, names: Any, remote: str) -> int:
        destination = destination_of(names, remote)
        key = (names.sni, names.ech, tuple(names.dns_names), names.crm_vendor,
               names.crm_instance, names.tenant, names.cgroup, names.shared, names.crm_region,
               names.named_by, destination)
        found = self._ids.get(key)
        if found is None:
            found = self._ids[key] = len(self.items)
            self.items.append((names, destination))
        return found

    def compact(self, *columns: Array) -> None:
        """Keep only the ids `columns` use (renumbered in place): bounds the table."""
        used = np.unique(np.concatenate([c[c >= 0] for c in columns]))
        remap = np.full(len(self.items) + 1, -1, np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        items = [self.items[i] for i in used.tolist()]
        self.items, self._ids = [], {}
        for names, destination in items:
            self.intern(names, destination)
        for col in columns:
            col[:] = remap[col]  # -1 maps to remap[-1] == -1


class TrackedAttributor(Attributor):
    """An Attributor that notes which conversations' names may have changed (a hello,
    a kernel-read name, a plaintext refinement) and which addresses DNS named, so the
    agent names only those again instead of every conversation every poll."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.renamed: set[ConversationId] = set()
        self.renamed_addrs: set[str] = set()

    def on_sample(self, s: Sample) -> None:
        super().on_sample(s)
        if s.kind in ("tls_hello", "quic_initial"):
            self.renamed.add(conversation_id(_sample_key(s)))

    def on_kernel_names(self, rows: list[NameRow]) -> list[ConversationId]:
        named = super().on_kernel_names(rows)
        self.renamed.update(named)
        return named

    def refine_instance(self, family: int, local: tuple[str, int], remote: tuple[str, int],
                        vendor: str, instance: str, proto: int = 6) -> bool:
        changed = super().refine_instance(family, local, remote, vendor, instance, proto)
        if changed:
            ends = sorted([local, remote])
            self.renamed.add((family, proto, ends[0], ends[1]))
        return changed

    def dns_learned(self, ip: str) -> None:
        self.renamed_addrs.add(ip)

    def take_renamed(self) -> tuple[set[ConversationId], set[str]]:
        renamed, addrs = self.renamed, self.renamed_addrs
        self.renamed, self.renamed_addrs = set(), set()
        return renamed, addrs
