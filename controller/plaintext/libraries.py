"""TLS libraries: where the system's shared libssl lives, and which mapped files
define SSL_write/SSL_write_ex whatever their name (read from their ELF symbol
tables: .dynsym for a shared library, .symtab for a static binary)."""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import struct
import subprocess
from collections import Counter, OrderedDict

logger = logging.getLogger(__name__)

LIBSSL_SONAME = "libssl.so.3"


def find_shared_library(soname: str) -> str | None:
    """Return the path the dynamic linker would use for `soname`, from `ldconfig -p`."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        listing = subprocess.run(
            [ldconfig, "-p"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        logger.info("ldconfig -p failed (%s); cannot locate %s", e, soname)
        return None
    # "\tlibssl.so.3 (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl.so.3"
    for entry in listing.splitlines():
        name, _, rest = entry.strip().partition(" ")
        if name == soname and "=>" in rest:
            return rest.split("=>", 1)[1].strip()
    return None


# ---- libraries by content: any mapped file that defines SSL_write(_ex) ----------

SSL_WRITE_SYMBOLS = ("SSL_write", "SSL_write_ex")
# what the uprobes hook (loader.SSL_SYMBOLS): read with the test, so attaching
# needs no second pass over the symbol table
SSL_PROBED_SYMBOLS = (*SSL_WRITE_SYMBOLS, "SSL_set_fd", "SSL_read", "SSL_read_ex")
_ELF_MAGIC = b"\x7fELF"
_SHT_SYMTAB, _SHT_DYNSYM = 2, 11
_SHN_UNDEF = 0
_STT_FUNC, _STT_GNU_IFUNC = 2, 10
# section headers beyond this are not an ELF file a loader produced (bounds the work)
_SECTIONS_MAX = 65535
# symbol tables scanned per file, at most (a static binary's .symtab: 64 MiB = 2.7M symbols)
_SYMTAB_BYTES_MAX = 64 << 20
_SECTION = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_SYMBOL = struct.Struct("<IBBHQQ")  # Elf64_Sym


class ElfError(ValueError):
    """The file is not a 64-bit little-endian ELF object this reader understands."""


def _defined_functions(elf: mmap.mmap, wanted: tuple[str, ...]) -> dict[str, int]:
    """{name: st_value} of the `wanted` functions the file defines."""
    if len(elf) < 64 or elf[:4] != _ELF_MAGIC:
        raise ElfError("not an ELF file")
    if elf[4] != 2 or elf[5] != 1:
        raise ElfError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    if shoff == 0 or shnum == 0:
        return {}  # no section headers (stripped of them): nothing to find by name
    if shentsize != _SECTION.size or shnum > _SECTIONS_MAX or shoff + shnum * shentsize > len(
            elf):
        raise ElfError("section header table out of bounds")
    sections = [_SECTION.unpack_from(elf, shoff + i * shentsize) for i in range(shnum)]
    found: dict[str, int] = {}
    scanned = 0
    for _name, sh_type, _f, _a, off, size, link, _i, _al, entsize in sections:
        if sh_type not in (_SHT_SYMTAB, _SHT_DYNSYM) or link >= shnum:
            continue
        str_off, str_size = sections[link][4], sections[link][5]
        if off + size > len(elf) or str_off + str_size > len(elf) or entsize != _SYMBOL.size:
            raise ElfError("symbol table out of bounds")
        # where the wanted names sit in the string table (a cheap test first:
        # most files do not contain them at all)
        names: dict[int, str] = {}
        for name in wanted:
            # a name can end a longer one (string tail merging): "XSSL_write" holds
            # "SSL_write" at its offset + 1, so every occurrence is a candidate
            needle = name.encode() + b"\0"
            at = elf.find(needle, str_off, str_off + str_size)
            while at >= 0:
                names[at - str_off] = name
                at = elf.find(needle, at + 1, str_off + str_size)
        if not names:
            continue
        scanned += size
        if scanned > _SYMTAB_BYTES_MAX:
            raise ElfError(f"symbol tables larger than {_SYMTAB_BYTES_MAX} bytes")
        for st_name, st_info, _other, shndx, value, _sz in _SYMBOL.iter_unpack(
                elf[off:off + size]):
            if st_name in names and shndx != _SHN_UNDEF and value and (st_info & 0xF) in (
                    _STT_FUNC, _STT_GNU_IFUNC):
                found.setdefault(names[st_name], value)
    return found


def ssl_function_addresses(path: str) -> dict[str, int]:
    """{symbol: address} of the probed OpenSSL functions `path` defines (exports,
    or keeps in .symtab); empty unless it defines SSL_write or SSL_write_ex.

    A file that only imports them (curl's binary) defines none. Raises OSError
    when unreadable, ElfError when not an ELF file this reader understands."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ElfError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as elf:
            found = _defined_functions(elf, SSL_PROBED_SYMBOLS)
    return found if any(s in found for s in SSL_WRITE_SYMBOLS) else {}


class SslLibraryFinder:
    """Which files define SSL_write(_ex), cached by (dev, inode, mtime).

    A file is read once per identity; a rewritten file (new mtime) is read
    again. Unreadable or non-ELF files are remembered as not TLS libraries
    and counted by reason."""

    def __init__(self, max_entries: int = 16384) -> None:
        self._cache: OrderedDict[tuple[int, int, int], dict[str, int]] = OrderedDict()
        self._max = max_entries
        self.counters: Counter[str] = Counter()

    def is_tls_library(self, path: str, st: os.stat_result) -> bool:
        return bool(self.addresses(path, st))

    def addresses(self, path: str, st: os.stat_result) -> dict[str, int]:
        """{symbol: address} to probe in `path` (whose stat is `st`); empty for a
        file that is not a TLS library."""
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        known = self._cache.get(key)
        if known is not None:
            self._cache.move_to_end(key)
            return known
        try:
            found = ssl_function_addresses(path)
            self.counters["elf_read"] += 1
        except ElfError as e:
            logger.debug("%s: %s", path, e)
            self.counters["elf_not_understood"] += 1
            found = {}
        except OSError as e:
            logger.debug("%s: %s", path, e)
            self.counters["elf_unreadable"] += 1
            return {}  # not cached: it may be readable on the next look
        self._cache[key] = found
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return found
