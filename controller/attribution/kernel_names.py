"""Server names the kernel read (lt_names, issue 12: naming at line rate), as hellos.

The kernel names the common single-segment ClientHello itself; only the hellos it
could not name (no valid name, a malformed or over-long hello, no room in lt_names)
and split and QUIC hellos still reach user space through the ring. Each drained
reading is counted by outcome here, so every flow the kernel left unnamed has its
reason in /metrics (leaktap_userspace_dropped{stage="kernel_names"}) next to the
kernel's own counters (cnt_sni_*, sni_giveup_*).
"""

from __future__ import annotations

from dataclasses import dataclass

from leaktap.controller.protocols.tls import ClientHello

# distinct names whose ClientHello stand-in is shared (few hosts, many flows)
_HELLOS_MAX = 4096


@dataclass
class KernelNameStats:
    """Kernel readings drained, by outcome (bpf/include/lt_sni.h enum lt_sni_outcome)."""

    named: int = 0  # a valid host name: the flow is named without the ring
    no_name: int = 0  # a valid hello without a valid host name (user space agrees)
    # the kernel could not name these; their hello went to the ring for user space
    malformed: int = 0  # not a ClientHello the user-space parser accepts
    limit: int = 0  # more extensions or list entries than the kernel's loops walk
    unknown_outcome: int = 0  # a newer kernel program's outcome this controller lacks


class KernelNames:
    """Turns drained kernel readings into the ClientHello the attributor keeps per flow."""

    def __init__(self) -> None:
        self.stats = KernelNameStats()
        self._hellos: dict[tuple[str, bool], ClientHello] = {}

    def hello_of(self, name: str | None, outcome: str, ech: bool,
                 count: bool = True) -> ClientHello | None:
        """The hello a reading (its name, outcome and ECH flag) stands for, shared per
        name, else None; counted by outcome. `count`: False for a reading peeked before
        its drain (the drain counts it)."""
        if outcome == "named" and name is not None:
            self.stats.named += count
            hello = self._hellos.get((name, ech))
            if hello is None:
                if len(self._hellos) >= _HELLOS_MAX:
                    self._hellos.clear()
                hello = self._hellos[name, ech] = ClientHello(name, ech, (), 0, (), name)
            return hello
        if not count:
            return None
        if outcome == "no_name":
            self.stats.no_name += 1
        elif outcome == "malformed":
            self.stats.malformed += 1
        elif outcome == "limit":
            self.stats.limit += 1
        else:
            self.stats.unknown_outcome += 1
        return None
