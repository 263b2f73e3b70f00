"""Executables that carry their own OpenSSL (issue 13.2), end to end: the monitor
probes SSL_write/SSL_write_ex inside the executable itself when it exports them
or keeps them in its symbol table, and a canary one of them posts is found.

- a C client built here with gcc against Debian's libssl.a/libcrypto.a (-static:
  no shared libssl mapped at all);
- Node.js's `https` module. NodeSource's node (this image's /usr/bin/node) links
  its own OpenSSL and exports SSL_write; Debian's own nodejs package links the
  system libssl.so.3. The test reads which from the binary and expects the probe
  on the executable or on the shared library accordingly.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leaktap.controller.plaintext.monitor import PlaintextMonitor
from tests.e2e.test_plaintext_tls import (
    LIBSSL,
    Collected,
    crm_tls_lab,
    in_cgroup,
    lab_config,
    running_monitor,
    wait_probed,
)

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
CLIENTS = Path(__file__).resolve().parent / "tls_clients"
HOST_IP, CRM_IP = "198.18.113.1", "198.18.113.2"
NODE = "/usr/bin/node"
SNI = "acme.my.salesforce.com"
CANARY = "CANARY-EXE-5d41c0b7e2"
CGROUP, CGROUP_FREE = "lt-x13-acme", "lt-x13-free"  # selected, not selected

CONFIG = f"""
tenants:
  - name: acme
    match: {{cgroup: "/{CGROUP}*"}}
    environment: prod
plaintext:
  enabled: true
  select: {{cgroups: ["/{CGROUP}*"]}}
  canaries:
    - {{token: "{CANARY}", tenant: acme, record: "Account/001EXE", environment: prod}}
"""


def build_static_client(out: Path) -> Path:
    """gcc -static against libssl.a and libcrypto.a: SSL_write is in the executable."""
    exe = out / "crm-static-client"
    subprocess.run(["gcc", "-O1", "-static", "-o", str(exe), str(CLIENTS / "static_client.c"),
                    "-lssl", "-lcrypto", "-pthread"], check=True, capture_output=True,
                   timeout=60)
    return exe


def exports_ssl_write(path: str) -> bool:
    """Whether `path` defines SSL_write in its dynamic symbol table (binutils' reading)."""
    out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True,
                         text=True, check=True).stdout
    return any(line.split()[-1] == "SSL_write" for line in out.splitlines() if line.strip())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with crm_tls_lab(tmp_path_factory.mktemp("executables"), "lt-x13", HOST_IP, CRM_IP,
                     (CGROUP, CGROUP_FREE)) as where:
        yield where


@pytest.fixture(scope="module")
def monitor(lab: dict[str, Any]) -> Iterator[tuple[PlaintextMonitor, Collected]]:
    with running_monitor(lab, lab_config(lab, CONFIG)) as running:
        yield running


@pytest.fixture
def collected(monitor: tuple[PlaintextMonitor, Collected]) -> Collected:
    monitor[1].clear()
    return monitor[1]


def start(lab: dict[str, Any], argv: list[str],
          cgroup: str = CGROUP) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(in_cgroup(lab["mount"], cgroup, argv), cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
    return proc


def post_and_finish(proc: subprocess.Popen[bytes]) -> None:
    """Say go, wait for the answer, then end the client (stdin closed)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    proc.stdin.close()
    err = proc.stderr.read() if proc.stderr is not None else b""
    assert proc.wait(timeout=30) == 0 and line == b"sent\n", err.decode(errors="replace")


def wait_library(mon: PlaintextMonitor, pid: int, path: str) -> None:
    deadline = time.monotonic() + 5
    while path not in mon.probed_pids().get(pid, []):
        assert time.monotonic() < deadline, mon.probed_pids().get(pid)
        time.sleep(0.01)


def body() -> str:
    return json.dumps({"Name": CANARY, "Industry": "Retail"})


def test_a_statically_linked_client_is_probed_in_its_executable(lab, monitor, collected):
    mon, _ = monitor
    exe = build_static_client(lab["tmp"])
    assert b"libssl" not in subprocess.run(["ldd", str(exe)], capture_output=True).stdout
    proc = start(lab, [str(exe), CRM_IP, SNI, body()])
    wait_probed(mon, proc.pid)
    wait_library(mon, proc.pid, str(exe))  # its own SSL_write, found in .symtab
    started = time.monotonic()
    post_and_finish(proc)

    (f,) = collected.finding("canary_token")  # within 5 s of the write
    assert time.monotonic() - started < 5
    assert (f.tenant, f.crm_vendor, f.crm_instance) == ("acme", "salesforce", "acme")
    assert f.evidence["pid"] == proc.pid
    assert CANARY not in json.dumps(f.evidence)


def test_node_https_is_probed_where_its_openssl_lives(lab, monitor, collected):
    mon, _ = monitor
    own_openssl = exports_ssl_write(NODE)
    reads_before = mon.counters["reads"]
    nothing_before = mon.kernel_stats()["ssl_cnt_write_nothing"]
    proc = start(lab, [NODE, str(CLIENTS / "node_client.js"), CRM_IP, SNI, body()])
    wait_probed(mon, proc.pid)
    # NodeSource's node: SSL_write in the executable; Debian's: in libssl.so.3
    wait_library(mon, proc.pid, NODE if own_openssl else LIBSSL)
    probed = mon.probed_pids()[proc.pid]
    started = time.monotonic()
    post_and_finish(proc)

    found = collected.finding("canary_token")
    # Node retries an SSL_write that returned WANT_READ during the handshake with
    # the same buffer: those tries wrote nothing and are not captured (the write
    # is captured at its return), so the canary is seen once, not once per try
    assert len(found) == 1, found
    assert mon.kernel_stats()["ssl_cnt_write_nothing"] - nothing_before >= 1
    f = found[0]
    assert time.monotonic() - started < 5
    assert (f.tenant, f.crm_vendor, f.crm_instance) == ("acme", "salesforce", "acme")
    assert f.evidence["pid"] == proc.pid
    # the system libssl is probed for every selected process before it maps it
    assert probed == sorted({LIBSSL, NODE} if own_openssl else {LIBSSL}), probed
    # its SSL_read, found where its SSL_write is (the read ran before "sent")
    assert collected.wait(lambda: [1] if mon.counters["reads"] > reads_before else []), \
        dict(mon.counters)
    assert os.path.exists(NODE)



def first_byte(pid: int, exe: Path, symbol: str) -> int:
    """The first instruction byte of `symbol` in `pid` (0xCC: a uprobe's breakpoint).
    The static client is not position-independent: its .symtab address is the one."""
    out = subprocess.run(["nm", "--defined-only", str(exe)], capture_output=True, text=True,
                         check=True).stdout
    (address,) = [int(f[0], 16) for f in map(str.split, out.splitlines())
                  if len(f) == 3 and f[2] == symbol]
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(address)
        return mem.read(1)[0]


def test_an_unselected_executable_carrying_openssl_is_not_probed(lab, monitor, collected):
    """Per-process selection holds for executables: only the selected copy of the same
    static client gets the breakpoint in its own SSL_write, and only its canary is seen."""
    mon, _ = monitor
    exe = build_static_client(lab["tmp"])
    free = start(lab, [str(exe), CRM_IP, SNI, body()], cgroup=CGROUP_FREE)
    chosen = start(lab, [str(exe), CRM_IP, SNI, body()])
    wait_library(mon, chosen.pid, str(exe))  # exec notices are handled in order
    assert free.pid not in mon.probed_pids()
    assert first_byte(chosen.pid, exe, "SSL_write") == 0xCC
    assert first_byte(free.pid, exe, "SSL_write") != 0xCC
    post_and_finish(free)
    post_and_finish(chosen)
    found = collected.finding("canary_token")
    assert [f.evidence["pid"] for f in found] == [chosen.pid]


def test_the_read_side_is_probed_in_the_executable_too(lab, monitor, collected):
    """SSL_read in the static client's own .symtab: its answer from the CRM is captured
    through the same attach path as its writes."""
    mon, _ = monitor
    exe = build_static_client(lab["tmp"])
    before = dict(mon.counters)
    proc = start(lab, [str(exe), CRM_IP, SNI, body()])
    wait_probed(mon, proc.pid)
    wait_library(mon, proc.pid, str(exe))
    assert mon.probes is not None
    hooked = mon.probes.attached[str(exe), proc.pid]
    post_and_finish(proc)

    assert {"SSL_write", "SSL_read"} <= set(hooked), hooked
    deadline = time.monotonic() + 5
    while mon.counters["reads"] == before.get("reads", 0):
        assert time.monotonic() < deadline, dict(mon.counters)
        time.sleep(0.05)
    # the crm_server's one answer, in one record, taken by the client's one SSL_read
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
    time.sleep(0.2)  # let a (wrong) second read event arrive before counting
    reads = mon.counters["reads"] - before.get("reads", 0)
    read = mon.counters["captured_read_bytes"] - before.get("captured_read_bytes", 0)
    assert (reads, read) == (1, len(answer))
