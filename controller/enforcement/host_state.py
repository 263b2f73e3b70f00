"""Which enforcement state the host is in, as `leaktap doctor` reports it.

What is attached in the kernel (leaktap's connect programs on the cgroup root, its
TC filters on interfaces) is read from the kernel itself; whether an agent runs is
read from /proc. Attached programs with no agent are a crashed run's: they keep
enforcing the last policy until the next start replaces them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from leaktap.controller.enforcement.connect_guard import attached_here


@dataclass(frozen=True)
class HostEnforcement:
    connect_programs: int  # leaktap connect programs on the cgroup2 root
    tc_interfaces: list[str] = field(default_factory=list)  # interfaces with leaktap filters
    agent_pids: list[int] = field(default_factory=list)


def running_agents(proc: Path = Path("/proc")) -> list[int]:
    """Pids of `leaktap run` processes (other than this one)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [os.path.basename(a.decode(errors="replace")) for a in argv if a]
        if "run" in words and any(w.startswith("leaktap") or w.endswith("commands.cli")
                                  for w in words):
            found.append(int(entry.name))
    return found


def tc_interfaces() -> list[str]:
    """Interfaces that carry a leaktap TC filter."""
    from pyroute2 import IPRoute

    from leaktap.controller.kernel import loader

    out = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if any(loader._our_filters(ipr, link["index"], parent)  # noqa: SLF001 - same filter test
                   for parent in loader.TC_PARENT.values()):
                out.append(str(name))
    return sorted(out)


def host_enforcement(cgroup_root: Path | None) -> HostEnforcement:
    programs = attached_here(cgroup_root) if cgroup_root is not None else 0
    return HostEnforcement(programs, tc_interfaces(), running_agents())
