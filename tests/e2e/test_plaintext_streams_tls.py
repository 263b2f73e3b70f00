"""Stream inspection end to end (issue 19): the main evasion classes of the catalogue
sent by a real TLS client (Python ssl over OpenSSL, one SSL_write per piece) in a
tenant cgroup, through the real uprobes and monitor; each is a canary_token finding
within 5 s.
"""

from __future__ import annotations

import base64
import json
import subprocess

import pytest

from leaktap.analytics.plaintext.canary import Canary
from tests.analytics.plaintext_evasions import BY_ID, CANARY
from tests.e2e.test_plaintext_tls import (  # noqa: F401 - fixtures shared with that module
    CRM_IP,
    REPO,
    collected,
    config,
    in_cgroup,
    lab,
    monitor,
    py,
    wait_probed,
)

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

WRITER = """
import base64, json, socket, ssl, sys
pieces = [base64.b64decode(p) for p in json.loads(sys.argv[1])]
print("started", flush=True)
sys.stdin.readline()  # the test says go once the monitor has probed this process
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols([sys.argv[2]])
with ctx.wrap_socket(socket.create_connection(("{ip}", 443)),
                     server_hostname="acme.my.salesforce.com") as tls:
    for piece in pieces:
        tls.sendall(piece)  # one SSL_write each
    tls.settimeout(3)
    try:
        tls.recv(4096)
    except (OSError, ssl.SSLError):
        pass
print("done", flush=True)
"""

CLASSES = ["split_two_writes", "byte_at_a_time", "chunked_boundary", "h2_two_data_frames",
           "gzip", "json_u_escaped", "base64_lines", "hex", "utf16", "double_url",
           # one large write: the kernel hands it over in chunks (head and tail first)
           "after_4kb_padding", "at_70kb"]


def writes_of(steps: list[tuple]) -> list[bytes]:
    """The application writes the catalogue's chunks came from (offset 0 starts one)."""
    out: list[bytes] = []
    for step in steps:
        assert step[0] == "w"
        if step[3] == 0:
            out.append(step[1])
        else:
            out[-1] += step[1]
    return out


@pytest.fixture(scope="module")
def catalogue_canary(monitor):  # noqa: F811 - the imported fixture
    mon, _ = monitor
    mon.inspector.canaries.add(Canary(CANARY, "acme", "Account/EVASION"))
    return CANARY


@pytest.mark.parametrize("evasion_id", CLASSES)
def test_evasion_class_through_real_tls_is_a_canary_finding(lab, monitor, collected,  # noqa: F811
                                                            catalogue_canary, evasion_id):
    mon, _ = monitor
    evasion = BY_ID[evasion_id]
    assert evasion.steps is not None
    pieces = json.dumps([base64.b64encode(w).decode() for w in writes_of(evasion.steps())])
    alpn = "h2" if evasion_id.startswith("h2") else "http/1.1"
    argv = in_cgroup(lab["mount"], "lt-pt-acme", py(WRITER.format(ip=CRM_IP)) + [pieces, alpn])
    p = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline() == b"started\n"
        wait_probed(mon, p.pid)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        found = collected.finding("canary_token")
        assert found, (evasion_id, [f.evidence for f in collected.findings], dict(mon.counters),
                       dict(mon.inspector.stats))
        (f,) = [f for f in found if f.evidence["canary_record"] == "Account/EVASION"]
        # the HTTP/2 request names HubSpot's shared API host: a vendor, no instance
        expected = ("hubspot", None) if alpn == "h2" else ("salesforce", "acme")
        assert (f.tenant, f.crm_vendor, f.crm_instance) == ("acme", *expected)
        assert f.evidence["pid"] == p.pid
        assert CANARY not in json.dumps(f.evidence)
    finally:
        p.communicate(b"", timeout=15)
    assert p.returncode == 0


def test_decompression_bomb_through_real_tls_is_inspection_evaded(lab, monitor,  # noqa: F811
                                                                   collected):  # noqa: F811
    mon, _ = monitor
    pieces = json.dumps([base64.b64encode(w).decode()
                         for w in writes_of(BY_ID["decompression_bomb"].steps())])
    argv = in_cgroup(lab["mount"], "lt-pt-acme",
                     py(WRITER.format(ip=CRM_IP)) + [pieces, "http/1.1"])
    p = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline() == b"started\n"
        wait_probed(mon, p.pid)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        found = collected.wait(lambda: [
            f for f in collected.findings if f.kind == "inspection_evaded"
            and f.evidence.get("lost") == "decompression_bomb"])
        assert found, [f.evidence for f in collected.findings]
        f = found[0]
        assert (f.tenant, f.crm_vendor, f.evidence["pid"]) == ("acme", "salesforce", p.pid)
        assert f.evidence["encoding"] == "gzip" and f.evidence["source"] == "stream"
    finally:
        p.communicate(b"", timeout=15)
