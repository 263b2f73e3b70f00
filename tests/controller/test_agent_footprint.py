"""The resident agent's footprint (issue 16.5): it imports neither bcc nor pandas
(nor cryptography, ~7 MB: QUIC Initials are opened with libcrypto through ctypes),
and a poll larger than one write chunk stores every conversation's row once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from leaktap.controller import agent as agent_module
from leaktap.controller.agent import Agent
from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.config import parse_config
from leaktap.controller.kernel.maps import FlowCounters, FlowKey
from leaktap.controller.storage import Store
from tests.controller.map_doubles import IdleMapReader


def test_agent_and_api_import_neither_bcc_nor_pandas() -> None:
    script = ("import sys, leaktap.controller.agent, leaktap.controller.api.main; "
              "print(sorted(m for m in ('bcc', 'pandas', 'cryptography') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class _Flows(IdleMapReader):
    """A map reader whose flow map holds `n` distinct flows at every drain."""

    def __init__(self, n: int) -> None:
        self.keys = [FlowKey(1, 4, 6, 0, f"198.18.{40 + i // 250}.{1 + i % 250}",
                             "198.18.60.1", 10000 + i, 443) for i in range(n)]

    def drain_flows(self) -> list[FlowCounters]:
        now = time.monotonic_ns()
        return [FlowCounters(k, 100, 1, now - 1000, now, 0, 0) for k in self.keys]


def test_a_poll_of_several_write_chunks_stores_each_conversation_once(tmp_path: Path) -> None:
    n = 2 * agent_module.FLOW_WRITE_CHUNK + 17
    config = parse_config("tenants: []\n")
    store = Store(tmp_path / "lt.db")
    agent = Agent(config, ["lt-none"], store)
    agent.attributor = Attributor(config, cgroup_mount=None)
    agent.reader = _Flows(n)  # type: ignore[assignment]
    agent.poll_once(final=True)
    agent.poll_once(final=True)  # the same flows again: rows updated, not added
    row_ids = agent.table.cols["row_id"][agent.table.live_slots()].tolist()
    rows = store.flows(limit=10 * n)
    store.close()
    assert len(row_ids) == n and all(row_ids)
    assert len(set(row_ids)) == n
    assert len(rows) == n
    assert {r["bytes_out"] for r in rows} == {200}  # both polls counted in every row
