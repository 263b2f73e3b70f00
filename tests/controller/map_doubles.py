"""A map reader double for agent tests that script only the flows (and names) a
poll drains: the rest of MapReader's interface answers as an idle kernel would."""

from __future__ import annotations

from leaktap.controller.kernel.maps import FlowCounters, KernelName, NameRow, name_row


class IdleMapReader:
    """No flows, names, losses or cgroup totals; subclasses give the drains."""

    def drain_flows(self) -> list[FlowCounters]:
        return []

    def drain_names(self) -> list[KernelName]:
        return []

    def drain_name_rows(self) -> list[NameRow]:
        return [name_row(n) for n in self.drain_names()]

    def stats(self) -> dict[str, int]:
        return {}

    def totals(self) -> dict[int, tuple[int, int]]:
        return {0: (0, 0)}

    def cgroup_totals(self) -> dict[int, tuple[int, int]]:
        return {}

    def remove_cgroups(self, ids: list[int]) -> dict[int, tuple[int, int]]:
        return {}

    def expire_hellos(self, max_age_ns: int) -> int:
        return 0
