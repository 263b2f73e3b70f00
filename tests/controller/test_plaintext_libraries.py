"""TLS libraries found by content (issue 19.5): ELF symbol tables, not file names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from leaktap.controller.plaintext.libraries import (
    ElfError,
    SslLibraryFinder,
    ssl_function_addresses,
)
from leaktap.controller.plaintext.procs import ssl_libraries

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
LIBCRYPTO = "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"


def nm_defined(path: str) -> dict[str, int]:
    out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[-1].split("@")[0]: int(line.split()[0], 16)
            for line in out.splitlines() if len(line.split()) == 3}


def test_a_renamed_libssl_copy_is_a_tls_library_with_nm_addresses(tmp_path):
    copy = tmp_path / "libnot-a-tls-name.so.9"
    shutil.copyfile(LIBSSL, copy)
    found = ssl_function_addresses(str(copy))
    nm = nm_defined(LIBSSL)
    assert found == {s: nm[s] for s in ("SSL_write", "SSL_write_ex", "SSL_set_fd", "SSL_read",
                                        "SSL_read_ex")}


def test_files_that_only_import_ssl_write_or_lack_it_are_not_tls_libraries():
    curl = shutil.which("curl")
    assert curl is not None
    assert ssl_function_addresses(curl) == {}  # SSL_write is undefined (imported) there
    assert ssl_function_addresses(LIBCRYPTO) == {}
    assert ssl_function_addresses(sys.executable) == {}


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"#!/bin/sh\necho hi\n" * 10, "not an ELF file"),
    (b"\x7fELF\x01\x01" + b"\0" * 80, "not a 64-bit little-endian ELF file"),
])
def test_non_elf_files_are_refused_with_a_reason(tmp_path, content, message):
    path = tmp_path / "f"
    path.write_bytes(content)
    with pytest.raises(ElfError, match=message):
        ssl_function_addresses(str(path))


def test_a_truncated_library_is_refused_not_misread(tmp_path):
    path = tmp_path / "cut.so"
    path.write_bytes(Path(LIBSSL).read_bytes()[:200_000])  # section headers are at the end
    with pytest.raises(ElfError, match="out of bounds"):
        ssl_function_addresses(str(path))


def test_the_finder_reads_a_file_once_per_identity_and_again_when_rewritten(tmp_path):
    finder = SslLibraryFinder()
    copy = tmp_path / "libx.so"
    shutil.copyfile(LIBSSL, copy)
    for _ in range(3):
        assert finder.is_tls_library(str(copy), os.stat(copy))
    assert finder.counters["elf_read"] == 1
    shutil.copyfile(LIBCRYPTO, tmp_path / "other")
    os.replace(tmp_path / "other", copy)  # new inode and mtime: read again
    assert not finder.is_tls_library(str(copy), os.stat(copy))
    assert finder.counters["elf_read"] == 2


def test_a_process_mapping_a_renamed_copy_has_it_among_its_tls_libraries(tmp_path):
    copy = tmp_path / "libcustomtls.so"
    shutil.copyfile(LIBSSL, copy)
    code = f"import ctypes, sys; ctypes.CDLL({str(copy)!r}); print('ok', flush=True); " \
           "sys.stdin.readline()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
        libs = ssl_libraries(proc.pid, finder=SslLibraryFinder())
    finally:
        proc.kill()
        proc.wait()
    assert [lib.path for lib in libs] == [str(copy)]
    assert dict(libs[0].addresses)["SSL_write_ex"] == nm_defined(LIBSSL)["SSL_write_ex"]
