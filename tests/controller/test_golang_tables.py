"""Go binaries' own tables (issue 13.1): crypto/tls.(*Conn).Write and .Read are found
in `.gopclntab` of a normal and a `-s -w` build at the addresses `go tool nm` reads
from the unstripped build's .symtab; .symtab alone serves when the function table is
gone; Read's returns are the RETs Go's own disassembler lists; a binary with neither
table is reported ("go without symbol tables"). The pclntab layouts of Go 1.16-1.17
and 1.18-1.23 are read from synthetic tables as well (only 1.19 is installed)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from leaktap.controller.plaintext import golang
from leaktap.controller.plaintext.libraries import ElfError
from tests.golang_build import GO_CLIENT, STRIPPED, build, go_binary, go_env, go_tool_nm


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("gotables")
    plain = build(GO_CLIENT, tmp / "plain")
    stripped = build(GO_CLIENT, tmp / "stripped", STRIPPED)
    out = {"plain": plain, "stripped": stripped, "tmp": tmp}
    for name, src in (("renamed", plain), ("no_tables", stripped)):
        out[name] = tmp / name
        subprocess.run(["objcopy", "--rename-section", ".gopclntab=.lt_hidden", str(src),
                        str(out[name])], check=True, capture_output=True)
    # a function table this reader does not understand (its magic zeroed): .symtab serves
    sections = subprocess.run(["readelf", "-S", "--wide", str(plain)], capture_output=True,
                              text=True, check=True).stdout
    at = int(re.search(r"\.gopclntab\s+PROGBITS\s+[0-9a-f]+\s+([0-9a-f]+)", sections)[1], 16)
    data = bytearray(plain.read_bytes())
    assert data[at:at + 4] in (struct.pack("<I", 0xFFFFFFF0), struct.pack("<I", 0xFFFFFFF1))
    data[at:at + 4] = b"\0\0\0\0"
    out["symtab_only"] = tmp / "symtab_only"
    out["symtab_only"].write_bytes(bytes(data))
    return out


@pytest.fixture(scope="module")
def nm(builds: dict[str, Path]) -> dict[str, int]:
    return go_tool_nm(builds["plain"], builds["tmp"])


@pytest.mark.parametrize("kind", ["plain", "stripped"])
def test_pclntab_addresses_equal_go_tool_nm(builds, nm, kind):
    assert "crypto/tls.(*Conn).Write" not in go_tool_nm_or_empty(builds["stripped"], builds)
    found = golang.inspect_go_binary(str(builds[kind]))

    assert found is not None and found.reason is None and found.table == ".gopclntab"
    assert found.version is not None and found.version.startswith("go1.")
    assert found.write is not None and found.read is not None
    assert found.write.entry == nm[golang.WRITE]
    assert found.read.entry == nm[golang.READ]
    assert found.inspected and found.uses_tls


def go_tool_nm_or_empty(binary: Path, builds: dict[str, Path]) -> dict[str, int]:
    """`go tool nm` of a -s -w build has no symbols to list (it fails): the names
    can only come from .gopclntab."""
    try:
        return go_tool_nm(binary, builds["tmp"])
    except subprocess.CalledProcessError:
        return {}


def test_function_table_found_through_runtime_pclntab_when_its_section_is_renamed(builds, nm):
    found = golang.inspect_go_binary(str(builds["renamed"]))

    assert found is not None and found.table == ".gopclntab" and found.reason is None
    assert found.write is not None and found.write.entry == nm[golang.WRITE]


def test_symtab_serves_when_the_function_table_is_not_understood(builds, nm):
    found = golang.inspect_go_binary(str(builds["symtab_only"]))

    assert found is not None and found.table == ".symtab" and found.reason is None
    assert found.write is not None and found.write.entry == nm[golang.WRITE]
    assert found.read is not None and found.read.entry == nm[golang.READ]


def test_binary_without_tables_is_reported_with_its_reason(builds):
    found = golang.inspect_go_binary(str(builds["no_tables"]))

    assert found is not None and found.reason == "go without symbol tables"
    assert not found.inspected and found.probes == () and found.write is None


def test_probe_points_are_the_returns_go_objdump_lists(builds, nm):
    found = golang.inspect_go_binary(str(builds["stripped"]))
    assert found is not None and found.read is not None and found.write is not None
    listing = subprocess.run(
        [go_binary(), "tool", "objdump", "-s", r"^crypto/tls\.\(\*Conn\)\.(Read|Write)$",
         str(builds["plain"])], env=go_env(builds["tmp"]), capture_output=True, text=True,
        check=True).stdout
    insns: dict[str, list[tuple[int, str]]] = {}
    current = ""
    for line in listing.splitlines():
        if line.startswith("TEXT "):
            current = line.split()[1].removesuffix("(SB)")
        m = re.match(r"\s*\S+:\d+\s+0x([0-9a-f]+)\s+[0-9a-f]+\s+(.*)$", line)
        if m:
            insns.setdefault(current, []).append((int(m.group(1), 16), m.group(2).strip()))
    rets = [addr for addr, text in insns[golang.READ] if text == "RET"]
    probes = dict(found.probes)

    assert sorted(a for label, a in probes.items() if label.startswith("go:read_ret@")) == rets
    assert len(rets) >= 2
    # entry probes sit right after the stack check's JBE (morestack re-runs the prologue)
    for label, fn in (("go:write", golang.WRITE), ("go:read", golang.READ)):
        listing_fn = insns[fn]
        jbe = next(i for i, (_a, text) in enumerate(listing_fn[:4]) if text.startswith("JBE"))
        assert probes[label] == listing_fn[jbe + 1][0] > nm[fn]


def test_not_a_go_binary_is_none():
    assert golang.inspect_go_binary(shutil.which("ls") or "/bin/ls") is None


def _synthetic_pclntab(magic: int, funcs: list[tuple[str, int]], text_start: int) -> bytes:
    """A function table in the layout of `magic` holding `funcs` (name, entry)."""
    names = b""
    offsets = []
    for name, _entry in funcs:
        offsets.append(len(names))
        names += name.encode() + b"\0"
    old = magic == 0xFFFFFFFA
    words = 7 if old else 8
    header_size = 8 + words * 8
    name_off = header_size
    pcln_off = name_off + len(names)
    pcln_off += -pcln_off % 8
    entry = struct.Struct("<QQ" if old else "<II")
    functab_size = (len(funcs) + 1) * entry.size
    records = b""
    functab = b""
    for (_name, addr), noff in zip(funcs, offsets, strict=True):
        funcoff = functab_size + len(records)
        pc = addr if old else addr - text_start
        functab += entry.pack(pc, funcoff)
        records += (struct.pack("<Q", pc) if old else struct.pack("<I", pc)) + struct.pack(
            "<i", noff) + b"\0" * 4
    end_pc = funcs[-1][1] + 0x100
    functab += entry.pack(end_pc if old else end_pc - text_start, 0)
    fields = [len(funcs), 0] + ([] if old else [text_start]) + [name_off, 0, 0, 0, pcln_off]
    header = struct.pack("<IBBBB", magic, 0, 0, 1, 8) + struct.pack(f"<{words}Q", *fields)
    body = header + names
    return body + b"\0" * (pcln_off - len(body)) + functab + records


@pytest.mark.parametrize("magic", [0xFFFFFFFA, 0xFFFFFFF0, 0xFFFFFFF1],
                         ids=["go1.16-1.17", "go1.18-1.19", "go1.20-1.23"])
def test_pclntab_layouts_of_each_go_version_range(magic):
    funcs = [("main.main", 0x401000), ("xcrypto/tls.(*Conn).Write", 0x401100),
             (golang.WRITE, 0x401200), (golang.READ, 0x401400), ("runtime.exit", 0x401800)]
    tab = _synthetic_pclntab(magic, funcs, text_start=0x401000)

    got_magic, found = golang.pclntab_functions(tab, (golang.WRITE, golang.READ))

    assert got_magic == magic
    assert found[golang.WRITE] == golang.GoFunction(golang.WRITE, 0x401200, 0x401400)
    assert found[golang.READ] == golang.GoFunction(golang.READ, 0x401400, 0x401800)


def test_unknown_or_truncated_function_table_is_refused():
    with pytest.raises(ElfError, match="unknown function table header"):
        golang.pclntab_functions(struct.pack("<IBBBB", 0x12345678, 0, 0, 1, 8) + b"\0" * 64,
                                 (golang.WRITE,))
    tab = _synthetic_pclntab(0xFFFFFFF1, [(golang.WRITE, 0x401000)], 0x401000)
    with pytest.raises(ElfError, match="out of bounds"):
        golang.pclntab_functions(tab[:80], (golang.WRITE,))
