"""TLS stack recognition and the coverage tracker (issue 13.3), on real processes
and their /proc maps; no BPF.

Real binaries where the distribution has them: Python's ssl (shared libssl),
Node.js, a JVM (the JDK runs Client.java), `sleep` (no TLS), a C client built
-static against libssl.a and the same stripped. BoringSSL and rustls have no
binary in the distribution: their recognition is tested on ELF executables built
here with gcc that carry BoringSSL's BORINGSSL_* and SSL_write functions, or a
rustls-shaped mangled Rust symbol name
(_ZN6rustls6client4conn16ClientConnection3new17h...E).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leaktap.controller.plaintext import coverage, tls_class
from leaktap.controller.plaintext.libraries import SslLibraryFinder
from leaktap.controller.plaintext.tls_class import TlsClassifier
from tests.e2e.test_plaintext_executables import CLIENTS, build_static_client

RUSTLS_C = """
#include <stdio.h>
#include <unistd.h>
void _ZN6rustls6client4conn16ClientConnection3new17h5c8a1d2e3f4b6a7cE(void) {}
int main(void) {
    char b[8];
    _ZN6rustls6client4conn16ClientConnection3new17h5c8a1d2e3f4b6a7cE();
    puts("started"); fflush(stdout);
    return read(0, b, sizeof b) < 0;
}
"""

# BoringSSL's exports a probe needs, beside one only BoringSSL has
BORINGSSL_C = """
#include <stdio.h>
#include <unistd.h>
int SSL_write(void *ssl, const void *buf, int n) { return n; }
int SSL_write_ex(void *ssl, const void *buf, unsigned long n, unsigned long *w) { return 1; }
int BORINGSSL_self_test(void) { return 1; }
int main(void) {
    char b[8];
    puts("started"); fflush(stdout);
    return read(0, b, sizeof b) < 0 || !SSL_write(0, b, 0) || !BORINGSSL_self_test();
}
"""

WAITING_PYTHON = "import ssl, sys; print('started', flush=True); sys.stdin.read()"


def gcc(tmp: Path, name: str, source: str, *flags: str) -> Path:
    src = tmp / f"{name}.c"
    src.write_text(source)
    subprocess.run(["gcc", "-O1", "-o", str(tmp / name), str(src), *flags], check=True,
                   capture_output=True, timeout=60)
    return tmp / name


@pytest.fixture
def running() -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def run(argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"started\n", proc.stderr.read() if proc.stderr else b""
        return proc

    yield run
    for p in procs:
        p.kill()
        p.wait()


def classify(pid: int) -> tls_class.TlsStack | None:
    return TlsClassifier(SslLibraryFinder()).classify(pid)


def key(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_python_ssl_is_openssl_shared(running):
    p = running([sys.executable, "-c", WAITING_PYTHON])
    stack = classify(p.pid)
    assert stack is not None and (stack.tls, stack.reason) == (tls_class.OPENSSL_SHARED, None)
    assert stack.targets == (key("/usr/lib/x86_64-linux-gnu/libssl.so.3"),)


def test_static_client_is_openssl_static_and_stripped_it_cannot_be_probed(running, tmp_path):
    exe = build_static_client(tmp_path)
    p = running([str(exe), "198.18.0.1", "x", "y"])
    assert classify(p.pid) == tls_class.TlsStack(tls_class.OPENSSL_STATIC, (key(exe),))
    stripped = tmp_path / "stripped-client"
    subprocess.run(["strip", "-o", str(stripped), str(exe)], check=True)
    q = running([str(stripped), "198.18.0.1", "x", "y"])
    assert classify(q.pid) == tls_class.TlsStack(tls_class.OPENSSL_STATIC, (),
                                                  tls_class.REASON_STRIPPED)


def test_node_is_recognised_by_where_its_ssl_write_is(running):
    p = running(["node", "-e", "console.log('started'); process.stdin.resume()"])
    stack = classify(p.pid)
    own = b" T SSL_write\n" in subprocess.run(["nm", "-D", "/usr/bin/node"],
                                              capture_output=True).stdout
    expected = (tls_class.OPENSSL_STATIC, (key("/usr/bin/node"),)) if own else (
        tls_class.OPENSSL_SHARED, (key("/usr/lib/x86_64-linux-gnu/libssl.so.3"),))
    assert stack is not None and (stack.tls, stack.targets) == expected


def test_a_jvm_is_java_and_not_inspectable(running):
    p = running(["java", str(CLIENTS / "Client.java"), "198.18.0.1", "x", "y"])
    assert classify(p.pid) == tls_class.TlsStack(tls_class.JAVA, (), tls_class.REASON_JSSE)


def test_boringssl_and_rustls_recognised_in_built_elfs(running, tmp_path):
    boring = gcc(tmp_path, "boring-client", BORINGSSL_C)
    p = running([str(boring)])
    assert classify(p.pid) == tls_class.TlsStack(tls_class.BORINGSSL, (key(boring),))
    rust = gcc(tmp_path, "rust-client", RUSTLS_C)
    q = running([str(rust)])
    assert classify(q.pid) == tls_class.TlsStack(tls_class.RUSTLS, (), tls_class.REASON_RUSTLS)


def test_no_tls_library_is_unknown_and_a_gone_process_is_none(running):
    p = running(["sh", "-c", "echo started; exec cat"])
    assert classify(p.pid) == tls_class.TlsStack(tls_class.UNKNOWN, (),
                                                  tls_class.REASON_NO_TLS)
    p.kill()
    p.wait()
    assert classify(p.pid) is None


# ---- the tracker --------------------------------------------------------------------

class FakeMonitor:
    """The two things the tracker asks a PlaintextMonitor: what it probes, whom it selects."""

    def __init__(self, probed: dict[int, list[str]], selected: set[int]) -> None:
        self.probed = probed
        self.finder = SslLibraryFinder()
        self.selector = self
        self.selected = selected

    def probed_pids(self) -> dict[int, list[str]]:
        return self.probed

    def matches(self, info: Any) -> bool:
        return info.pid in self.selected


CONNECTING_PYTHON = """
import socket, ssl, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("started", flush=True)
sys.stdin.read()
"""


def test_tracker_finds_owners_by_socket_and_judges_them(running):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    selected = running([sys.executable, "-c", CONNECTING_PYTHON, str(port)])
    other = running([sys.executable, "-c", CONNECTING_PYTHON, str(port)])
    conns = [server.accept()[0] for _ in range(2)]
    monitor = FakeMonitor({selected.pid: ["/lib/x86_64-linux-gnu/libssl.so.3"]}, {selected.pid})
    now = [1000.0]
    tracker = coverage.CoverageTracker(monitor, clock=lambda: now[0])
    for c, n in zip(conns, (700, 300), strict=True):
        far, local = c.getsockname(), c.getpeername()  # the clients' view
        tracker.observe(4, (local[0], local[1]), (far[0], far[1]), "salesforce", "acme",
                        "acme", "/x", n)
    tracker.observe(4, ("127.0.0.1", 9), ("127.0.0.1", 1), "hubspot", None, "globex", "/y", 50)
    tracker.refresh()
    assert {e["pid"] for e in tracker.report()} == {selected.pid, other.pid}
    tracker.refresh()  # the closed connection's second miss: reported without an owner
    exe = os.path.realpath(sys.executable)
    comm = Path(sys.executable).name[:15]
    by_pid = {e["pid"]: e for e in tracker.report()}
    assert by_pid == {
        selected.pid: {"pid": selected.pid, "exe": exe, "comm": comm, "tenant": "acme",
                       "destinations": ["salesforce:acme"], "tls": "openssl-shared",
                       "inspected": True, "reason": "probed"},
        other.pid: {"pid": other.pid, "exe": exe, "comm": comm, "tenant": "acme",
                    "destinations": ["salesforce:acme"], "tls": "openssl-shared",
                    "inspected": False, "reason": "not selected"},
        None: {"pid": None, "exe": None, "comm": None, "tenant": "globex",
               "destinations": ["hubspot:?"], "tls": "unknown", "inspected": False,
               "reason": "exited before the probe attached"},
    }
    assert tracker.bytes_by_coverage == {("acme", True): 700, ("acme", False): 300,
                                         ("globex", False): 50}
    # the monitor's exec/mmap notice of a listed process wakes the refresh; others not
    tracker.touch(other.pid)
    tracker.touch(os.getpid())
    assert tracker.stats()["coverage_process_changes"] == 1 and tracker._wake.is_set()
    assert tracker.processes_by_class()["openssl-shared", True] == 1
    assert tracker.summary() == ("1 of 3 process(es) talking to CRMs inspected "
                                 "(1 not selected; 1 exited before the probe attached)")
    # the selected process exits: its entry stays as it stood; after 24 h all go
    selected.kill()
    selected.wait()
    tracker.refresh()
    assert {e["pid"]: e["inspected"] for e in tracker.report()}[selected.pid] is True
    now[0] += coverage.RETENTION_S + 1
    tracker.refresh()
    assert tracker.report() == []
    assert tracker.stats()["coverage_processes_expired"] == 3
    server.close()
    for c in conns:
        c.close()


def test_tracker_is_bounded_and_counts_evictions(monkeypatch):
    monkeypatch.setattr(coverage, "CONNECTIONS_MAX", 5)
    monkeypatch.setattr(coverage, "PROCESSES_MAX", 2)
    monkeypatch.setattr(coverage, "TENANT_SERIES_MAX", 2)
    tracker = coverage.CoverageTracker(None)
    for i in range(8):
        tracker.observe(4, ("198.18.0.1", 40000 + i), ("198.18.0.2", 443), "salesforce", "a",
                        f"t{i}", f"/c{i}", 10)
    tracker.refresh()
    tracker.refresh()
    stats = tracker.stats()
    assert (stats["coverage_connections"], stats["coverage_connections_evicted"]) == (5, 3)
    assert (stats["coverage_processes"], stats["coverage_processes_evicted"]) == (2, 3)
    # the 5 ownerless connections' bytes: two tenants keep their label, the rest fold
    assert tracker.bytes_by_coverage == {("t3", False): 10, ("t4", False): 10,
                                         ("other", False): 30}
    assert tracker.tenant_series.folded == 3


# ---- leaktap doctor's line ------------------------------------------------------------

def test_doctor_summarises_the_running_agents_coverage():
    from leaktap.controller.commands.doctor import Status, check_coverage, coverage_url
    from leaktap.controller.config import parse_config

    asked: list[tuple[str, str]] = []
    report = [
        {"pid": 1, "inspected": True, "reason": "probed"},
        {"pid": 2, "inspected": False, "reason": "not selected"},
        {"pid": 3, "inspected": False, "reason": tls_class.REASON_JSSE},
        {"pid": 4, "inspected": False, "reason": "not selected"},
    ]

    def fetch(url: str, token: str) -> list[dict[str, Any]]:
        asked.append((url, token))
        return report

    config = parse_config("listen: 0.0.0.0:9470\ntokens: {reader: [reader-token-0123456789]}\n")
    url = coverage_url(config)
    assert url == "http://127.0.0.1:9470/v1/coverage"
    result = check_coverage(url, "reader-token-0123456789", fetch)
    assert asked == [(url, "reader-token-0123456789")]
    assert (result.status, result.detail, result.fix) == (
        Status.WARN, "1 of 4 process(es) talking to CRMs inspected (2 not selected; "
        f"1 {tls_class.REASON_JSSE})", "add them to plaintext.select")
    assert check_coverage(url, "t", lambda u, t: report[:1]).status is Status.OK

    def down(url: str, token: str) -> list[dict[str, Any]]:
        raise ConnectionRefusedError(111, "Connection refused")

    assert check_coverage(url, "t", down).status is Status.OK
    assert check_coverage(url, None, fetch).detail == "not read: the config names no reader token"


@pytest.mark.parametrize("ldflags", ["", "-s -w"])
def test_a_go_program_is_go_with_golang_pys_verdict(running, tmp_path, ldflags):
    """The Go client of issue 13.1, built with the distribution's toolchain: `go`,
    probe-able even stripped of .symtab (.gopclntab names crypto/tls)."""
    exe = tmp_path / "go-client"
    subprocess.run(["go", "build", "-ldflags", ldflags, "-o", str(exe),
                    str(Path(__file__).resolve().parents[1] / "e2e" / "go_client" / "main.go")],
                   check=True, capture_output=True, timeout=120, cwd=tmp_path,
                   env={**os.environ, "GO111MODULE": "off"})
    p = running([str(exe), "https://198.18.0.1/", "x", "{}"])
    assert classify(p.pid) == tls_class.TlsStack(tls_class.GO, (key(exe),), None)


def test_a_selected_process_gone_before_its_probe_is_reported_so(running):
    server = socket.create_server(("127.0.0.1", 0))
    client = running([sys.executable, "-c", CONNECTING_PYTHON, str(server.getsockname()[1])])
    conn, (ip, port) = server.accept()
    tracker = coverage.CoverageTracker(FakeMonitor({}, {client.pid}))  # selected, not probed
    tracker.observe(4, (ip, port), conn.getsockname(), "hubspot", "42", "acme", "/x", 10)
    tracker.refresh()
    (entry,) = tracker.report()
    assert (entry["pid"], entry["inspected"], entry["reason"]) == (
        client.pid, False, coverage.REASON_NOT_YET)
    client.kill()
    client.wait()
    tracker.refresh()
    (entry,) = tracker.report()
    assert (entry["pid"], entry["tls"], entry["inspected"], entry["reason"]) == (
        client.pid, "openssl-shared", False, "exited before the probe attached")
    server.close()
    conn.close()
