"""Go programs' TLS (issue 13.1): where crypto/tls.(*Conn).Write and .Read are in a
Go executable, read from the binary's own tables, and where Read returns.

Go does not use a shared TLS library: crypto/tls is linked into every Go program.
The functions are found by name in `.gopclntab`, the runtime's function table
(it survives `-ldflags="-s -w"`, which drops only .symtab and DWARF), else in
`.symtab`. A Go binary where neither names them is reported with a reason, never
guessed at.

Read's result (n) exists only when it returns, and uretprobes must not be used
on Go code: a uretprobe replaces the return address on the goroutine stack,
which the runtime moves when it grows the stack (the program then crashes).
Its RET instructions are found by disassembling the function (binutils'
objdump over its address range) and probed one by one; the BPF side matches a
return with its call by goroutine (the g pointer, R14 in the register ABI).

Probes go after the function's stack-growth check (`cmp 0x10(%r14),%rsp; jbe`)
when it has one: a call that grows its stack runs the prologue twice
(morestack re-enters the function), and a probe at the entry would see that
Write twice. The check leaves the argument registers untouched.

Register ABI (Go >= 1.17, amd64): Write(b []byte): receiver *Conn in AX, b's
pointer in BX, its length in CX; Read's n returns in AX; g in R14.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import shutil
import struct
import subprocess
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

from leaktap.controller.plaintext.libraries import ElfError
from leaktap.controller.plaintext.procs import PROC, Library, library_at

logger = logging.getLogger(__name__)

WRITE = "crypto/tls.(*Conn).Write"
READ = "crypto/tls.(*Conn).Read"

# Probe labels: loader.GO_PROGRAMS maps each (before any "@") to its BPF program.
LABEL_WRITE = "go:write"  # Write's entry; reads the socket fd from the Conn
LABEL_WRITE_NOFD = "go:write_nofd"  # same, for a Go whose struct offsets are not known
LABEL_READ = "go:read"  # Read's entry: remembers the buffer per goroutine
LABEL_READ_RET = "go:read_ret"  # one per RET of Read: "go:read_ret@0x<address>"

# Why a Go binary is not inspected (the coverage report shows these).
REASON_NO_TABLES = "go without symbol tables"
REASON_OLD_ABI = "go before 1.17 (stack ABI)"
REASON_NO_DISASSEMBLER = "go: no disassembler (binutils objdump) to find Read's returns"
REASON_NOT_AMD64 = "go: not an amd64 binary"

# Go versions whose tls.Conn -> net.TCPConn -> netFD -> poll.FD.Sysfd layout the
# write probe reads (bpf/ssl_go.bpf.c: conn interface at 0, its data's *netFD at
# 0, poll.FD at 0 of netFD, Sysfd after the 16-byte fdMutex; unchanged since Go
# 1.9). Outside this range the socket is learned from the write's send syscall.
FD_LAYOUT_MINORS = range(17, 24)

_ELF_MAGIC = b"\x7fELF"
_EM_X86_64 = 62
_SHT_SYMTAB = 2
_SECTION = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_PROGRAM = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr
_SYMBOL = struct.Struct("<IBBHQQ")  # Elf64_Sym
_PT_LOAD = 1
_SECTIONS_MAX = 65535
_BUILDINFO_MAGIC = b"\xff Go buildinf:"
# pclntab header magics: Go 1.16-1.17, 1.18-1.19, 1.20 and later
_PCLN_116, _PCLN_118, _PCLN_120 = 0xFFFFFFFA, 0xFFFFFFF0, 0xFFFFFFF1
_PCLN_12 = 0xFFFFFFFB  # Go 1.2-1.15: stack ABI, never probed
_OBJDUMP_TIMEOUT_S = 20
_INSN = re.compile(r"^\s*([0-9a-f]+):\s+(?:[0-9a-f]{2} )+\s*(\S.*)$")


@dataclass(frozen=True, slots=True)
class GoFunction:
    name: str
    entry: int  # virtual address
    end: int  # first address after it


@dataclass(frozen=True, slots=True)
class GoBinary:
    """What the probes need of one Go executable, or why it cannot be probed."""

    version: str | None  # "go1.19.8" (from .go.buildinfo), None when not recorded
    uses_tls: bool  # crypto/tls.(*Conn).Write is in it (False also when unknown)
    reason: str | None  # None: probe-able; else why not (REASON_*)
    table: str | None = None  # ".gopclntab" | ".symtab": where the names were found
    write: GoFunction | None = None
    read: GoFunction | None = None
    probes: tuple[tuple[str, int], ...] = ()  # (label, virtual address)

    @property
    def inspected(self) -> bool:
        return self.reason is None and bool(self.probes)


# ---- ELF ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Elf:
    data: mmap.mmap
    sections: dict[str, tuple[int, int, int, int, int]]  # name -> type, addr, off, size, link
    section_list: list[tuple[int, int, int, int, int]]
    loads: list[tuple[int, int, int]]  # (vaddr, file offset, file size) of PT_LOAD
    machine: int

    def section_bytes(self, name: str) -> bytes | None:
        s = self.sections.get(name)
        if s is None:
            return None
        _t, _a, off, size, _l = s
        if off + size > len(self.data):
            raise ElfError(f"section {name} out of bounds")
        return self.data[off:off + size]

    def at_vaddr(self, vaddr: int, size: int) -> bytes | None:
        for start, off, filesz in self.loads:
            if start <= vaddr and vaddr + size <= start + filesz:
                return self.data[off + vaddr - start:off + vaddr - start + size]
        return None


def _parse_elf(data: mmap.mmap) -> _Elf:
    if len(data) < 64 or data[:4] != _ELF_MAGIC:
        raise ElfError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfError("not a 64-bit little-endian ELF file")
    machine, = struct.unpack_from("<H", data, 0x12)
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", data, 0x36)
    loads = []
    if phoff and phentsize == _PROGRAM.size and phoff + phnum * phentsize <= len(data):
        for i in range(phnum):
            p_type, _f, off, vaddr, _pa, filesz, _m, _al = _PROGRAM.unpack_from(
                data, phoff + i * phentsize)
            if p_type == _PT_LOAD:
                loads.append((vaddr, off, filesz))
    sections: dict[str, tuple[int, int, int, int, int]] = {}
    section_list: list[tuple[int, int, int, int, int]] = []
    if shoff and shnum:
        if (shentsize != _SECTION.size or shnum > _SECTIONS_MAX
                or shoff + shnum * shentsize > len(data) or shstrndx >= shnum):
            raise ElfError("section header table out of bounds")
        raw = [_SECTION.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
        str_off, str_size = raw[shstrndx][4], raw[shstrndx][5]
        if str_off + str_size > len(data):
            raise ElfError("section name table out of bounds")
        for name_off, sh_type, _fl, addr, off, size, link, _i, _al, _es in raw:
            end = data.find(b"\0", str_off + name_off, str_off + str_size)
            name = data[str_off + name_off:end].decode("latin-1") if end >= 0 else ""
            entry = (sh_type, addr, off, size, link)
            section_list.append(entry)
            sections.setdefault(name, entry)
    return _Elf(data, sections, section_list, loads, machine)


def is_go_elf(elf: _Elf) -> bool:
    return any(s in elf.sections for s in (".go.buildinfo", ".note.go.buildid", ".gopclntab"))


def go_version(elf: _Elf) -> str | None:
    """The toolchain version recorded in .go.buildinfo ("go1.19.8"), or None."""
    raw = elf.section_bytes(".go.buildinfo")
    if raw is None or not raw.startswith(_BUILDINFO_MAGIC) or len(raw) < 32:
        return None
    ptr_size, flags = raw[14], raw[15]
    if flags & 2:  # Go 1.18+: the strings follow the header inline, varint-length-prefixed
        length, shift, pos = 0, 0, 32
        while pos < len(raw) and shift < 35:
            b = raw[pos]
            length |= (b & 0x7F) << shift
            pos += 1
            shift += 7
            if not b & 0x80:
                break
        text = raw[pos:pos + length]
        return text.decode("utf-8", "replace") if text.startswith(b"go") else None
    if ptr_size != 8 or flags & 1:  # big-endian or 32-bit: not an amd64 binary
        return None
    # before 1.18: a pointer to the version's string header (pointer, length)
    header = elf.at_vaddr(struct.unpack_from("<Q", raw, 16)[0], 16)
    if header is None:
        return None
    ptr, length = struct.unpack("<QQ", header)
    version = elf.at_vaddr(ptr, length) if 0 < length < 64 else None
    return version.decode("utf-8", "replace") if version and version.startswith(b"go") else None


def _minor(version: str | None) -> int | None:
    m = re.match(r"go1\.(\d+)", version or "")
    return int(m.group(1)) if m else None


# ---- function tables -----------------------------------------------------------------

def _pclntab(elf: _Elf) -> bytes | None:
    """The runtime's function table: its section, else runtime.pclntab..epclntab."""
    raw = elf.section_bytes(".gopclntab")
    if raw is not None:
        return raw
    syms = _symtab_lookup(elf, ("runtime.pclntab", "runtime.epclntab"))
    if "runtime.pclntab" in syms and "runtime.epclntab" in syms:
        start, end = syms["runtime.pclntab"][0], syms["runtime.epclntab"][0]
        return elf.at_vaddr(start, end - start) if end > start else None
    return None


def pclntab_functions(tab: bytes, names: tuple[str, ...]) -> tuple[int, dict[str, GoFunction]]:
    """(magic, {name: GoFunction}) for the `names` the table holds (Go 1.16 and later).

    Layout (runtime/symtab.go, pcHeader): magic u32, 2 pad bytes, minLC u8,
    ptrSize u8, nfunc, nfiles, [textStart (1.18+)], funcnameOffset, cuOffset,
    filetabOffset, pctabOffset, pclnOffset, each pointer-sized. The functab at
    pclnOffset holds nfunc+1 (entry, funcoff) pairs: u32 offsets from textStart
    since 1.18, absolute pointers before; each _func record (at pclnOffset +
    funcoff) starts with that entry and then its name's int32 offset into the
    funcnametab."""
    if len(tab) < 8:
        raise ElfError("function table too short")
    magic, pad1, pad2, _min_lc, ptr_size = struct.unpack_from("<IBBBB", tab, 0)
    if magic == _PCLN_12:
        return magic, {}  # Go 1.2-1.15: the caller reports the old ABI
    if magic not in (_PCLN_116, _PCLN_118, _PCLN_120) or pad1 or pad2 or ptr_size != 8:
        raise ElfError(f"unknown function table header (magic {magic:#x})")
    fields = 8 if magic != _PCLN_116 else 7
    if len(tab) < 8 + fields * 8:
        raise ElfError("function table header truncated")
    words = struct.unpack_from(f"<{fields}Q", tab, 8)
    if magic == _PCLN_116:
        nfunc, _nfiles, name_off, _cu, _file, _pc, pcln_off = words
        text_start = 0
        entry_fmt = struct.Struct("<QQ")
    else:
        nfunc, _nfiles, text_start, name_off, _cu, _file, _pc, pcln_off = words
        entry_fmt = struct.Struct("<II")
    if nfunc > 10_000_000 or pcln_off + (nfunc + 1) * entry_fmt.size > len(tab):
        raise ElfError("function table out of bounds")
    # where each wanted name starts in funcnametab (NUL-separated names)
    wanted: dict[int, str] = {}
    for name in names:
        needle = name.encode() + b"\0"
        at = tab.find(needle, name_off)
        while at >= 0:
            if at == name_off or tab[at - 1] == 0:
                wanted[at - name_off] = name
            at = tab.find(needle, at + 1)
    found: dict[str, GoFunction] = {}
    if not wanted:
        return magic, found
    table = tab[pcln_off:pcln_off + (nfunc + 1) * entry_fmt.size]
    entries = list(entry_fmt.iter_unpack(table))
    for i in range(nfunc):
        entry, func_off = entries[i]
        rec = pcln_off + func_off
        if rec + entry_fmt.size // 2 + 4 > len(tab):
            raise ElfError("function record out of bounds")
        name_at, = struct.unpack_from("<i", tab, rec + entry_fmt.size // 2)
        hit = wanted.get(name_at)
        if hit is not None and hit not in found:
            found[hit] = GoFunction(hit, text_start + entry, text_start + entries[i + 1][0])
    return magic, found


def _symtab_lookup(elf: _Elf, names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """{name: (value, size)} of `names` in .symtab."""
    sec = elf.sections.get(".symtab")
    if sec is None or sec[0] != _SHT_SYMTAB or sec[4] >= len(elf.section_list):
        return {}
    _t, _a, off, size, link = sec
    str_off, str_size = elf.section_list[link][2], elf.section_list[link][3]
    if off + size > len(elf.data) or str_off + str_size > len(elf.data):
        raise ElfError("symbol table out of bounds")
    offsets: dict[int, str] = {}
    for name in names:
        needle = name.encode() + b"\0"
        at = elf.data.find(needle, str_off, str_off + str_size)
        while at >= 0:
            offsets[at - str_off] = name
            at = elf.data.find(needle, at + 1, str_off + str_size)
    found: dict[str, tuple[int, int]] = {}
    if not offsets:
        return found
    for st_name, _info, _other, shndx, value, sym_size in _SYMBOL.iter_unpack(
            elf.data[off:off + size - size % _SYMBOL.size]):
        if st_name in offsets and shndx and value:
            found.setdefault(offsets[st_name], (value, sym_size))
    return found


def tls_functions(elf: _Elf) -> tuple[str | None, int | None, dict[str, GoFunction]]:
    """(table, pclntab magic, {name: GoFunction}) of Write and Read: from the
    function table (its section, or where runtime.pclntab says), else from .symtab
    (also when the function table is not understood); table None when the binary
    has neither."""
    tab = _pclntab(elf)
    if tab is not None:
        try:
            magic, found = pclntab_functions(tab, (WRITE, READ))
            return ".gopclntab", magic, found
        except ElfError:
            if ".symtab" not in elf.sections:
                raise
    syms = _symtab_lookup(elf, (WRITE, READ))
    if syms or ".symtab" in elf.sections:
        return ".symtab", None, {n: GoFunction(n, v, v + s) for n, (v, s) in syms.items() if s}
    return None, None, {}


# ---- disassembly ---------------------------------------------------------------------

def _objdump(path: str, fn: GoFunction) -> list[tuple[int, str]]:
    """(address, instruction text) of `fn`, by binutils objdump."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise FileNotFoundError("objdump")
    out = subprocess.run(
        [objdump, "-d", "--wide", f"--start-address={fn.entry:#x}",
         f"--stop-address={fn.end:#x}", path],
        capture_output=True, text=True, check=True, timeout=_OBJDUMP_TIMEOUT_S).stdout
    insns = []
    for line in out.splitlines():
        m = _INSN.match(line)
        if m:
            insns.append((int(m.group(1), 16), m.group(2).strip()))
    return insns


def return_addresses(insns: list[tuple[int, str]]) -> list[int]:
    """Addresses of the RET instructions (Go emits no tail calls: every return is one)."""
    return [addr for addr, text in insns if re.fullmatch(r"ret[ql]?", text.split("#")[0].strip())]


def after_stack_check(insns: list[tuple[int, str]]) -> int | None:
    """The address after the prologue's stack-growth check, if it has one:

        cmp 0x10(%r14),%rsp   (or: lea -N(%rsp),%r12; cmp 0x10(%r14),%r12)
        jbe <morestack>
        <here>
    """
    for i, (_addr, text) in enumerate(insns[:4]):
        if text.startswith("cmp") and "0x10(%r14)" in text and i + 1 < len(insns):
            jump = insns[i + 1][1]
            if jump.startswith(("jbe", "jna")) and i + 2 < len(insns):
                return insns[i + 2][0]
    return None


# ---- one binary ----------------------------------------------------------------------

def inspect_go_binary(path: str) -> GoBinary | None:
    """What to probe in the Go executable `path`; None when it is not a Go binary.
    Raises OSError when unreadable, ElfError when not an ELF file understood."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ElfError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            elf = _parse_elf(data)
            if not is_go_elf(elf):
                return None
            version = go_version(elf)
            if elf.machine != _EM_X86_64:
                return GoBinary(version, False, REASON_NOT_AMD64)
            table, magic, funcs = tls_functions(elf)
    if table is None:
        return GoBinary(version, False, REASON_NO_TABLES)
    minor = _minor(version)
    if magic == _PCLN_12 or (minor is not None and minor < 17) or (
            magic == _PCLN_116 and minor is None):
        return GoBinary(version, False, REASON_OLD_ABI, table)
    write, read = funcs.get(WRITE), funcs.get(READ)
    if write is None:
        return GoBinary(version, False, None, table)  # no crypto/tls: nothing to see
    try:
        write_insns = _objdump(path, write)
        read_insns = _objdump(path, read) if read is not None else []
    except FileNotFoundError:
        return GoBinary(version, True, REASON_NO_DISASSEMBLER, table, write, read)
    except (subprocess.SubprocessError, OSError) as e:
        raise ElfError(f"disassembling {path}: {e}") from e
    write_label = LABEL_WRITE if minor in FD_LAYOUT_MINORS else LABEL_WRITE_NOFD
    probes = [(write_label, after_stack_check(write_insns) or write.entry)]
    rets = return_addresses(read_insns)
    if read is not None and rets:
        probes.append((LABEL_READ, after_stack_check(read_insns) or read.entry))
        probes.extend((f"{LABEL_READ_RET}@{addr:#x}", addr) for addr in rets)
    return GoBinary(version, True, None, table, write, read, tuple(probes))


def is_go_probe_set(addresses: tuple[tuple[str, int], ...]) -> bool:
    """A Library's addresses are Go probe points (labels), not OpenSSL symbols."""
    return bool(addresses) and addresses[0][0].startswith("go:")


class GoBinaryFinder:
    """inspect_go_binary, cached by (dev, inode, mtime); give-ups counted by reason."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._cache: OrderedDict[tuple[int, int, int], GoBinary | None] = OrderedDict()
        self._max = max_entries
        self.counters: Counter[str] = Counter()

    def inspect(self, path: str, st: os.stat_result) -> GoBinary | None:
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            found = inspect_go_binary(path)
            self.counters["go_elf_read"] += 1
        except ElfError as e:
            logger.debug("%s: %s", path, e)
            self.counters["go_elf_not_understood"] += 1
            found = None
        except OSError as e:
            logger.debug("%s: %s", path, e)
            self.counters["go_elf_unreadable"] += 1
            return None  # not cached: it may be readable on the next look
        if found is not None and found.reason is not None:
            self.counters["go_not_inspectable"] += 1
            logger.info("%s: %s", path, found.reason)
        self._cache[key] = found
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return found


def go_executable(pid: int, proc: Path = PROC,
                  finder: GoBinaryFinder | None = None) -> tuple[Library | None, GoBinary | None]:
    """(the Library to probe, what was found) for `pid`'s executable: (None, None)
    when it is not a Go binary, (None, GoBinary) when it is one that cannot be or
    need not be probed (its reason says which)."""
    try:
        exe = os.readlink(proc / str(pid) / "exe")
    except OSError:
        return None, None  # gone, or a kernel thread
    rooted = f"{proc}/{pid}/root{exe}"  # the process's own root: its container's file
    try:
        st = os.stat(rooted)
    except OSError:
        return None, None
    found = (finder or DEFAULT_GO_FINDER).inspect(rooted, st)
    if found is None or not found.inspected:
        return None, found
    path = rooted
    own = library_at(exe)
    if own is not None and own.key == (st.st_dev, st.st_ino):
        path = exe  # the shorter path
    return Library(path, st.st_dev, st.st_ino, found.probes), found


DEFAULT_GO_FINDER = GoBinaryFinder()
