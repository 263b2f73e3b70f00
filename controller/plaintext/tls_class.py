"""Which TLS implementation a process uses, read from its executable and its
mappings (/proc/PID/exe, /proc/PID/maps), for the coverage report (issue 13.3).

Order of the tests, first match wins:
- a JVM (libjvm.so mapped): `java`, its TLS is JSSE, Java code the uprobes cannot see;
- a Go executable (golang.py's reading of .gopclntab/.symtab, or a Go build-info
  header): `go`, with golang.py's reason when its crypto/tls cannot be probed;
- the executable itself defines SSL_write/SSL_write_ex (exported or in .symtab):
  `boringssl` when it carries BoringSSL's marks (its BORINGSSL_* functions, the
  "BoringSSL" version string), else `openssl-static`;
- a mapped library defines them: `openssl-shared` (`boringssl` with those marks);
- the executable names rustls (mangled Rust symbols and panic paths keep the
  crate name): `rustls`;
- an executable with OpenSSL's (version text, source paths) or BoringSSL's marks
  but no symbol to hook (stripped): that class, with the reason;
- else `unknown`.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from leaktap.controller.plaintext import golang
from leaktap.controller.plaintext.libraries import SslLibraryFinder
from leaktap.controller.plaintext.procs import PROC, Library, executable_mappings, ssl_libraries

logger = logging.getLogger(__name__)

OPENSSL_SHARED = "openssl-shared"
OPENSSL_STATIC = "openssl-static"
BORINGSSL = "boringssl"
GO = "go"
JAVA = "java"
RUSTLS = "rustls"
UNKNOWN = "unknown"
TLS_CLASSES = (OPENSSL_SHARED, OPENSSL_STATIC, BORINGSSL, GO, JAVA, RUSTLS, UNKNOWN)

REASON_JSSE = "JSSE: Java's own TLS, no native library to probe"
REASON_RUSTLS = "rustls: Rust code without stable symbols to probe"
REASON_STRIPPED = "SSL_write not in the executable's symbol tables (stripped)"
REASON_NO_TLS = "no TLS library found"

_BORINGSSL_MARKS = (b"BORINGSSL_", b"BoringSSL\0")
_RUSTLS_MARK = b"rustls"
# OPENSSL_VERSION_TEXT, e.g. "OpenSSL 3.0.19 27 Jan 2026"; a static link that never
# asks for its version keeps the source paths of OpenSSL's error macros instead
_OPENSSL_SOURCE = b"ssl/statem/statem_clnt.c"
_OPENSSL_VERSION = re.compile(rb"OpenSSL [0-9]+\.[0-9]+\.[0-9]+[a-z]{0,2}(?:-[a-z]+)? +"
                              rb"[0-9]{1,2} [A-Z][a-z]{2} [0-9]{4}")
_GO_BUILDINFO = b"\xff Go buildinf:"
_JVM = "libjvm.so"
_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class TlsStack:
    """A process's TLS implementation; `targets` are the files to probe (device,
    inode: one file may have several paths) when it is probed through OpenSSL's
    symbols or Go's, and `reason` says why it cannot be probed (None: it can be)."""

    tls: str
    targets: tuple[tuple[int, int], ...] = ()
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class _Marks:
    boringssl: bool
    rustls: bool
    openssl_version: bool
    go_buildinfo: bool


def _read_marks(path: str) -> _Marks:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return _Marks(False, False, False, False)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _Marks(
                boringssl=any(data.find(m) >= 0 for m in _BORINGSSL_MARKS),
                rustls=data.find(_RUSTLS_MARK) >= 0,
                openssl_version=data.find(_OPENSSL_SOURCE) >= 0
                or _OPENSSL_VERSION.search(data) is not None,
                go_buildinfo=data.find(_GO_BUILDINFO) >= 0,
            )


class TlsClassifier:
    """classify(pid): reads each executable's marks once per (dev, inode, mtime)."""

    def __init__(self, finder: SslLibraryFinder, proc: Path = PROC) -> None:
        self.finder = finder
        self.proc = proc
        self._marks: OrderedDict[tuple[int, int, int], _Marks] = OrderedDict()
        self._go: OrderedDict[tuple[int, int, int], golang.GoBinary | None] = OrderedDict()

    def marks(self, path: str, st: os.stat_result) -> _Marks:
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        found = self._marks.get(key)
        if found is None:
            found = self._marks[key] = _read_marks(path)
            if len(self._marks) > _CACHE_MAX:
                self._marks.popitem(last=False)
        return found

    def _go_binary(self, path: str, st: os.stat_result,
                   marks: _Marks) -> tuple[bool, golang.GoBinary | None]:
        """(is Go, golang.py's reading of it: its authority on what can be probed)."""
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if key not in self._go:
            try:
                self._go[key] = golang.inspect_go_binary(path)
            except (OSError, ValueError) as e:
                logger.debug("%s: %s", path, e)
                self._go[key] = None
            if len(self._go) > _CACHE_MAX:
                self._go.popitem(last=False)
        found = self._go[key]
        return found is not None or marks.go_buildinfo, found

    def classify(self, pid: int) -> TlsStack | None:
        """The TLS stack of `pid`, or None when it is gone (or has no executable)."""
        try:
            exe = os.readlink(f"{self.proc}/{pid}/exe")
        except OSError:
            return None
        rooted = f"{self.proc}/{pid}/root{exe.removesuffix(' (deleted)')}"
        mapped = executable_mappings(pid, self.proc)
        if any(os.path.basename(p) == _JVM for p in mapped):
            return TlsStack(JAVA, reason=REASON_JSSE)
        try:
            st = os.stat(rooted)
            marks = self.marks(rooted, st)
        except OSError:
            return None
        is_go, go_binary = self._go_binary(rooted, st, marks)
        if is_go:
            # one golang.py could not read (a build-info header only) is not probed either
            reason = go_binary.reason if go_binary is not None else golang.REASON_NO_TABLES
            return TlsStack(GO, ((st.st_dev, st.st_ino),), reason)
        libraries = ssl_libraries(pid, self.proc, self.finder)
        own = [lib for lib in libraries if _same_file(lib, st)]
        if own:
            return TlsStack(BORINGSSL if marks.boringssl else OPENSSL_STATIC,
                            tuple(lib.key for lib in own))
        if libraries:
            boring = any(self._library_is_boringssl(lib) for lib in libraries)
            return TlsStack(BORINGSSL if boring else OPENSSL_SHARED,
                            tuple(lib.key for lib in libraries))
        if marks.rustls:
            return TlsStack(RUSTLS, reason=REASON_RUSTLS)
        if marks.boringssl:
            return TlsStack(BORINGSSL, reason=REASON_STRIPPED)
        if marks.openssl_version:
            return TlsStack(OPENSSL_STATIC, reason=REASON_STRIPPED)
        return TlsStack(UNKNOWN, reason=REASON_NO_TLS)

    def _library_is_boringssl(self, lib: Library) -> bool:
        try:
            return self.marks(lib.path, os.stat(lib.path)).boringssl
        except OSError:
            return False


def _same_file(lib: Library, st: os.stat_result) -> bool:
    return lib.key == (st.st_dev, st.st_ino)
