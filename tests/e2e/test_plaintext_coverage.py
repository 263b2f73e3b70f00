"""Plaintext coverage end to end (issue 19.2, 19.4, 19.5): real TLS clients in a
tenant cgroup talk to a local TLS server posing as a CRM while the monitor's
uprobes capture their writes.

- a canary deep inside one large write (after 4 KiB of padding, at 70 KB) is
  found: the kernel sends the whole write in ordered chunks;
- a flood of small writes that spends the process's budget before a canary
  write raises `inspection_evaded`, and the mostly unseen connection is audited;
- a renamed copy of libssl (LD_PRELOAD) is probed by its ELF symbols;
- with `select: all`, a copy dlopen'ed by a running process is probed on its
  mmap, before its first write.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leaktap.controller.attribution.attributor import Attributor
from leaktap.controller.plaintext.monitor import PlaintextMonitor
from tests.e2e.test_plaintext_tls import (
    Collected,
    crm_tls_lab,
    in_cgroup,
    lab_config,
    py,
    running_monitor,
    wait_probed,
)

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
HOST_IP, CRM_IP = "198.18.62.1", "198.18.62.2"
LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
CANARY = "CANARY-COVER-3b9d27e1f0"
CGROUP = "lt-cov-acme"
CGROUP_ALL = "lt-cov-all"

CONFIG = f"""
tenants:
  - name: acme
    match: {{cgroup: "/{CGROUP}*"}}
    environment: prod
plaintext:
  enabled: true
  select: {{cgroups: ["/{CGROUP}*"]}}
  canaries:
    - {{token: "{CANARY}", tenant: acme, record: "Account/001COVER", environment: prod}}
"""

# Waits for "go" (the test first waits for the monitor to probe it), then runs
# `body` against the CRM over one TLS connection that first names its host.
CLIENT = """
import os, socket, ssl, sys, time
print("started", flush=True)
sys.stdin.readline()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
canary = {canary!r}.encode()
with ctx.wrap_socket(socket.create_connection(("{ip}", 443)),
                     server_hostname="acme.my.salesforce.com") as tls:
{body}
"""

# one write: request head and a body with the canary `at` bytes in
ONE_WRITE = """
    at = {at}
    body = b"x" * at + b'{{"Name": "' + canary + b'"}}' + b"y" * 1000
    head = (b"POST /services/data/v59.0/sobjects/Note HTTP/1.1\\r\\n"
            b"Host: acme.my.salesforce.com\\r\\nContent-Type: text/plain\\r\\n"
            b"Content-Length: %d\\r\\n\\r\\n" % len(body))
    tls.sendall(head + body)
    assert b"200" in tls.recv(4096)
"""

# a request that names the CRM, then a body of `junk` 32-byte writes as fast as
# the process can make them, then the canary
FLOOD = """
    tls.sendall(b"GET /services/data/v59.0/limits HTTP/1.1\\r\\n"
                b"Host: acme.my.salesforce.com\\r\\n\\r\\n")
    assert b"200" in tls.recv(4096)
    tls.sendall(b"POST /services/data/v59.0/composite HTTP/1.1\\r\\n"
                b"Host: acme.my.salesforce.com\\r\\nContent-Length: 100000000\\r\\n\\r\\n")
    junk = b"j" * 32
    for _ in range({junk}):
        tls.sendall(junk)
    tls.sendall(b'{{"Name": "' + canary + b'"}}')
"""

# drives a dlopen'ed libssl copy through ctypes: SSL_CTX_new .. SSL_write. Before
# writing it waits (at most 5 s) for the uprobe's int3 on its own SSL_write, so
# the test states "probed before the first write" as a condition, and prints the
# monotonic ns of the dlopen, of the handshake's end and of the breakpoint seen.
DLOPEN = """
import ctypes, socket, sys, time
print("started", flush=True)
sys.stdin.readline()
t0 = time.monotonic_ns()
lib = ctypes.CDLL(sys.argv[1])
entry = ctypes.cast(lib.SSL_write, ctypes.c_void_p).value
vp = ctypes.c_void_p
lib.TLS_client_method.restype = vp
lib.SSL_CTX_new.restype, lib.SSL_CTX_new.argtypes = vp, [vp]
lib.SSL_new.restype, lib.SSL_new.argtypes = vp, [vp]
lib.SSL_set_fd.argtypes = [vp, ctypes.c_int]
lib.SSL_connect.argtypes = [vp]
lib.SSL_write.argtypes = [vp, ctypes.c_char_p, ctypes.c_int]
ctx = lib.SSL_CTX_new(lib.TLS_client_method())
s = socket.create_connection(("{ip}", 443))
conn = lib.SSL_new(ctx)
lib.SSL_set_fd(conn, s.fileno())
assert lib.SSL_connect(conn) == 1
t1 = time.monotonic_ns()
while ctypes.string_at(entry, 1) != b"\\xcc" and time.monotonic_ns() - t0 < 5e9:
    time.sleep(0.001)
t2 = time.monotonic_ns()
print(t0, t1, t2, flush=True)
sys.stdin.readline()
body = b'{{"Name": "{canary}"}}'
req = (b"POST /services/data/v59.0/sobjects/Account HTTP/1.1\\r\\n"
       b"Host: acme.my.salesforce.com\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
assert lib.SSL_write(conn, req, len(req)) == len(req)
s.recv(100)
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with crm_tls_lab(tmp_path_factory.mktemp("coverage"), "lt-h8", HOST_IP, CRM_IP,
                     (CGROUP, CGROUP_ALL)) as where:
        yield where


@pytest.fixture(scope="module")
def monitor(lab: dict[str, Any]) -> Iterator[tuple[PlaintextMonitor, Collected]]:
    with running_monitor(lab, lab_config(lab, CONFIG)) as running:
        yield running


@pytest.fixture
def collected(monitor: tuple[PlaintextMonitor, Collected]) -> Collected:
    monitor[1].clear()
    return monitor[1]


def start(lab: dict[str, Any], code: str, env: dict[str, str] | None = None,
          cgroup: str = CGROUP, args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(in_cgroup(lab["mount"], cgroup, [*py(code), *args]), cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
    return proc


def go(proc: subprocess.Popen[bytes]) -> str:
    out, err = proc.communicate(b"go\n", timeout=60)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


@pytest.mark.parametrize("at", [4096, 70_000])
def test_a_canary_deep_inside_one_write_is_found(lab, monitor, collected, at):
    mon, _ = monitor
    before = mon.kernel_stats()
    proc = start(lab, CLIENT.format(canary=CANARY, ip=CRM_IP, body=ONE_WRITE.format(at=at)))
    wait_probed(mon, proc.pid)
    go(proc)

    (f,) = collected.finding("canary_token")
    assert (f.tenant, f.crm_vendor, f.crm_instance) == ("acme", "salesforce", "acme")
    after = mon.kernel_stats()
    written = after["ssl_cnt_bytes_written"] - before["ssl_cnt_bytes_written"]
    captured = after["ssl_cnt_bytes_captured"] - before["ssl_cnt_bytes_captured"]
    assert written > at and captured == written  # every byte of the write, none lost


def test_a_flood_before_a_canary_write_raises_inspection_evaded(lab, monitor, collected):
    mon, _ = monitor
    proc = start(lab, CLIENT.format(canary=CANARY, ip=CRM_IP, body=FLOOD.format(junk=8000)))
    wait_probed(mon, proc.pid)
    go(proc)

    found = collected.wait(lambda: [f for f in collected.findings
                                    if f.kind == "inspection_evaded"
                                    and f.evidence["source"] == "kernel"])
    assert found, mon.counters
    f = found[0]
    assert (f.tenant, f.crm_vendor, f.crm_instance, f.severity) == (
        "acme", "salesforce", "acme", "high")
    assert (f.evidence["pid"], f.evidence["lost"]) == (proc.pid, "rate_limited")
    assert f.evidence["lost_by_reason"]["rate_limited"] == f.evidence["lost_bytes"] > 0
    assert CANARY not in repr(f) and "jjjj" not in repr(f)  # never plaintext
    # 8000 x 32 B with a budget of ~2000 chunks: most of the connection went unseen
    (audit,) = collected.wait(lambda: [a for a in collected.audits
                                       if a.operation == "inspection:unseen"])
    assert (audit.tenant, audit.crm_vendor, audit.pid) == ("acme", "salesforce", proc.pid)
    assert audit.request_bytes >= 8000 * 32 and "unseen" in audit.action


def test_a_renamed_libssl_copy_is_probed_by_its_symbols(lab, monitor, collected):
    mon, _ = monitor
    copy = lab["tmp"] / "libtlsrenamed-7.so"
    shutil.copyfile(LIBSSL, copy)
    # the preloaded copy interposes every SSL_* call of Python's _ssl
    proc = start(lab, CLIENT.format(canary=CANARY, ip=CRM_IP, body=ONE_WRITE.format(at=10)),
                 env={"LD_PRELOAD": str(copy)})
    wait_probed(mon, proc.pid)
    deadline = time.monotonic() + 5
    while str(copy) not in mon.probed_pids().get(proc.pid, []):
        assert time.monotonic() < deadline, mon.probed_pids().get(proc.pid)
        time.sleep(0.01)
    go(proc)

    (f,) = collected.finding("canary_token")
    assert f.tenant == "acme"


def test_select_all_probes_a_dlopened_copy_before_its_first_write(lab, tmp_path):
    # the client runs in a cgroup the module's monitor does not select, so that
    # only this monitor's probe can be the one the client waits for
    config = lab_config(lab, CONFIG.replace(
        f'select: {{cgroups: ["/{CGROUP}*"]}}', "select: all").replace(
        f'cgroup: "/{CGROUP}*"', 'cgroup: "/lt-cov-*"'), "all.db")
    got = Collected()
    mon = PlaintextMonitor(config, Attributor(config, cgroup_mount=lab["mount"]),
                           got.findings.append, got.audits.append, system_library=LIBSSL)
    copy = tmp_path / "libfreshcopy.so"
    shutil.copyfile(LIBSSL, copy)  # a new inode nobody has mapped yet
    mon.start()
    try:
        proc = start(lab, DLOPEN.format(ip=CRM_IP, canary=CANARY), cgroup=CGROUP_ALL,
                     args=(str(copy),))
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        t0, t1, t2 = (int(x) for x in proc.stdout.readline().split())
        # The breakpoint shows once the first of SSL_write's two probes (entry, return) is
        # registered, and a call before the second one is lost (each registration waits
        # for an RCU grace period): the write waits for the whole attach.
        deadline = time.monotonic() + 10
        while not mon.mmap_attach_latency_ms and time.monotonic() < deadline:
            time.sleep(0.005)
        go(proc)
        found = got.wait(lambda: [f for f in got.findings if f.kind == "canary_token"])
        latency = list(mon.mmap_attach_latency_ms)
        state = (dict(mon.counters), mon.kernel_stats(), mon.probed_pids().get(-1))
    finally:
        mon.stop()
    # the delay, for the report (a timing target belongs in perf/): an RCU grace
    # period inside uprobe_register dominates it
    logger.warning("dlopen -> handshake done %.1f ms, -> breakpoint seen %.1f ms; "
                   "mmap notice -> probed %s ms", (t1 - t0) / 1e6, (t2 - t0) / 1e6, latency)
    assert latency, "the copy was not probed on its mmap notice"
    assert t2 - t0 < 5e9, "the copy's SSL_write never carried the uprobe"
    assert found and found[0].tenant == "acme", state
