"""The kernel/user ABI (STYLE.md section 3): layouts pinned, enums as the compiler sees them.

Struct layouts come from the ctypes classes BCC derives from lt_types.h and
are compared with tests/abi_golden.json. After an intended layout change,
regenerate the file with LEAKTAP_UPDATE_ABI_GOLDEN=1 and review the diff.

Enum and #define values are checked against clang itself: a tiny BPF object
whose array maps are sized by each value, so controller/kernel/abi.py's header
parsing cannot drift from what the programs are compiled with.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from leaktap.controller.kernel import abi
from leaktap.controller.kernel.loader import bpf_dir
from tests.bpf.harness import DEFAULT

pytestmark = pytest.mark.kernel

GOLDEN = Path(__file__).resolve().parents[1] / "abi_golden.json"


def layout(cls: Any) -> dict[str, Any]:
    fields = {
        name: getattr(cls, name).offset
        for name, *_ in cls._fields_
        if not name.startswith("__pad")  # BCC's explicit padding members
    }
    return {"size": ctypes.sizeof(cls), "fields": fields}


def current_layouts(probes: Any, ssl: Any) -> dict[str, dict[str, Any]]:
    flows = probes.table("lt_flows")
    return {
        "lt_ssl_event": layout(ssl.table("lt_ssl_scratch").sLeaf),
        "lt_ssl_key": layout(ssl.table("lt_ssl_fds").Key),
        "lt_ssl_sock": layout(ssl.table("lt_ssl_fds").Leaf),
        "lt_ssl_pending": layout(ssl.table("lt_ssl_pend").Leaf),
        "lt_ssl_read_call": layout(ssl.table("lt_ssl_reads").Leaf),
        "lt_ssl_write_call": layout(ssl.table("lt_ssl_writes").Leaf),
        "lt_ssl_budget": layout(ssl.table("lt_ssl_budget").Leaf),
        "lt_ssl_lost": layout(ssl.table("lt_ssl_lost").Leaf),
        "lt_ssl_plan": layout(ssl.table("lt_ssl_plan").sLeaf),  # per-CPU
        "lt_flow_key": layout(flows.Key),
        "lt_flow_val": layout(flows.sLeaf),  # per-CPU: sLeaf is one CPU's value
        "lt_volume": layout(probes.table("lt_cgtot").sLeaf),
        "lt_fcache_ent": layout(probes.table("lt_fcache").Leaf),
        "lt_hello_state": layout(probes.table("lt_hello").Leaf),
        "lt_event": layout(probes.table("lt_scratch").sLeaf),
        # issue 12: kernel-read names and the enforcement policy
        "lt_name_rec": layout(probes.table("lt_names").Leaf),
        "lt_decision": layout(field_type(probes.table("lt_sni_scratch").sLeaf, "dec")),
        "lt_allow_key": layout(probes.table("lt_allow").Key),
        "lt_name_key": layout(probes.table("lt_crm_names").Key),
        "lt_crm_name": layout(probes.table("lt_crm_names").Leaf),
        "lt_tenant_policy": layout(probes.table("lt_tenant_pol").Leaf),
        "lt_tenant_ref": layout(probes.table("lt_ten_cg").Leaf),
        "lt_cidr4_key": layout(probes.table("lt_ten_v4").Key),
        "lt_cidr6_key": layout(probes.table("lt_ten_v6").Key),
        "lt_addr_key": layout(probes.table("lt_crm_addrs").Key),
        "lt_blocked_flow": layout(probes.table("lt_blocked").Leaf),
    }


def field_type(cls: Any, name: str) -> Any:
    """The ctypes class of a struct member (a struct no map holds by itself)."""
    return next(f[1] for f in cls._fields_ if f[0] == name)


def layout_differences(golden: dict[str, Any], now: dict[str, Any]) -> list[str]:
    problems = []
    for struct in sorted(set(golden) | set(now)):
        if struct not in now:
            problems.append(f"struct {struct} is no longer found")
            continue
        if struct not in golden:
            problems.append(f"struct {struct} is not in {GOLDEN.name}")
            continue
        g, n = golden[struct], now[struct]
        for name in g["fields"]:
            if name not in n["fields"]:
                problems.append(f"{struct}.{name} was removed (was at offset {g['fields'][name]})")
            elif n["fields"][name] != g["fields"][name]:
                problems.append(
                    f"{struct}.{name} moved from offset {g['fields'][name]} to {n['fields'][name]}"
                )
        for name in n["fields"]:
            if name not in g["fields"]:
                problems.append(f"{struct}.{name} was added at offset {n['fields'][name]}")
        if g["size"] != n["size"]:
            problems.append(f"sizeof(struct {struct}) changed from {g['size']} to {n['size']}")
    return problems


@pytest.fixture(scope="module")
def probes(kernels):
    return kernels(DEFAULT).probes


@pytest.fixture(scope="module")
def ssl_probes():
    from leaktap.controller.kernel.loader import load_ssl

    ssl = load_ssl()
    yield ssl
    ssl.close()


def test_struct_layouts_match_the_golden_file(probes, ssl_probes):
    now = current_layouts(probes, ssl_probes)
    if os.environ.get("LEAKTAP_UPDATE_ABI_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(now, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())

    problems = layout_differences(golden, now)

    assert not problems, (
        "kernel/user ABI changed:\n  " + "\n  ".join(problems)
        + f"\nIf intended, regenerate {GOLDEN} with LEAKTAP_UPDATE_ABI_GOLDEN=1."
    )


def test_layout_comparison_names_the_changed_field():
    golden = {"s": {"size": 16, "fields": {"a": 0, "b": 8}}}
    now = {"s": {"size": 24, "fields": {"a": 0, "b": 12, "c": 16}}}

    assert layout_differences(golden, now) == [
        "s.b moved from offset 8 to 12",
        "s.c was added at offset 16",
        "sizeof(struct s) changed from 16 to 24",
    ]


def test_event_header_size_is_the_payload_offset(probes):
    event = probes.table("lt_scratch").sLeaf
    assert event.payload.offset == 84
    assert event.payload.size == abi.defines()["LT_SNAP"]


def test_ssl_event_header_and_stats(ssl_probes):
    from leaktap.controller.plaintext.events import ssl_stat_names

    event = ssl_probes.table("lt_ssl_scratch").sLeaf
    assert event.data.offset == 80  # data_off (the chunk's offset in its write) at 32
    assert event.data_off.offset == 32
    assert event.data.size == abi.defines()["LT_SSL_SNAP"]
    names = ssl_stat_names()
    assert len(names) == len(ssl_probes.table("lt_ssl_stats")) == len(set(names))


def test_stats_map_has_one_slot_per_stat_name(probes):
    names = abi.stat_names()
    stat_max = abi.enums()["lt_stat"]["LT_STAT_MAX"]

    assert len(names) == stat_max == len(probes.table("lt_stats"))
    assert all(names) and len(set(names)) == len(names)


def test_every_loss_reason_of_the_header_is_an_exported_stat():
    text = re.sub(r"/\*.*?\*/", "", abi.header_path().read_text(), flags=re.S)
    in_header = set(re.findall(r"\b(LT_LOSS_\w+)\s*,", text))
    parsed = abi.enums()["lt_stat"]

    assert in_header, "no LT_LOSS_* enumerator found in lt_types.h"
    assert in_header <= set(parsed), f"missing from abi.enums(): {in_header - set(parsed)}"
    names = abi.stat_names()
    for member in in_header:
        assert names[parsed[member]] == member.removeprefix("LT_").lower()


def test_parsed_enums_and_defines_equal_the_compilers_values() -> None:
    """Every enumerator and integer LT_* #define as clang evaluates it equals
    what controller/kernel/abi.py parsed: one static assertion per symbol."""
    from bcc import BPF

    parsed = {m: v for e in abi.enums().values() for m, v in e.items()} | abi.defines()
    lines = ['#include "lt_types.h"']
    lines += [f'_Static_assert(({sym}) == {value}ULL, "{sym} is not {value}");'
              for sym, value in parsed.items()]
    try:
        b = BPF(text=("\n".join(lines) + "\n").encode(),
                cflags=["-I", str(bpf_dir() / "include")])
    except Exception as e:  # clang printed which assertion failed above
        raise AssertionError(f"kernel/abi.py parsed a value clang disagrees with: {e}") from e
    b.cleanup()
    assert len(parsed) > 60
