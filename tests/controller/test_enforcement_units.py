"""Issue 12 (controller side), pure and loopback parts: which DNS-learned addresses a
tenant is refused at connect, and SOCK_DESTROY of a client socket (in this network
namespace and in another one, reached through a process's /proc/<pid>/ns/net)."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from leaktap.controller.attribution.catalogue import CrmCatalogue
from leaktap.controller.config import parse_config
from leaktap.controller.enforcement.refusals import Refusal, kernel_address, refused_addresses
from leaktap.controller.enforcement.sock_destroy import SocketDestroyer, destroy_request

CONFIG = """
tenants:
  - name: acme
    match: {cgroup: "/acme*"}
    allow: ["salesforce:acme"]
    enforce: block
  - name: globex
    match: {uids: [4242]}
    allow: ["salesforce:globex"]
    enforce: dry-run
  - name: watch
    match: {cgroup: "/watch*"}
    allow: ["salesforce:watch"]
"""


def test_refused_only_where_every_name_is_an_unsanctioned_instance() -> None:
    config = parse_config(CONFIG)
    bindings = {
        "198.18.9.1": [("globex.my.salesforce.com",)],
        "198.18.9.2": [("acme.my.salesforce.com",), ("globex.my.salesforce.com",)],  # shared
        "198.18.9.3": [("login.salesforce.com",), ("initech.my.salesforce.com",)],  # shared host
        "198.18.9.4": [("cdn.example.net",), ("initech.my.salesforce.com",)],  # not only CRMs
        "2001:db8::5": [("initech.my.salesforce.com", "na9.force.example")],  # via an alias
        "198.18.9.6": [("www.example.org",)],
    }
    got = refused_addresses(bindings, CrmCatalogue(config.catalogue), config.tenants)
    initech = Refusal("salesforce", "initech", "initech.my.salesforce.com")
    assert got == {
        "acme": {"198.18.9.1": Refusal("salesforce", "globex", "globex.my.salesforce.com"),
                 "2001:db8::5": initech},
        "globex": {"2001:db8::5": initech},
    }  # the monitor tenant has no entry at all


def test_kernel_address_forms() -> None:
    assert kernel_address("198.18.9.1") == (2, bytes([198, 18, 9, 1]) + b"\0" * 12)
    assert kernel_address("2001:db8::5") == (10, socket.inet_pton(socket.AF_INET6, "2001:db8::5"))


def test_destroy_request_layout() -> None:
    msg = destroy_request(socket.AF_INET, 6, "198.18.0.1", 40000, "198.18.0.2", 443, seq=7)
    assert len(msg) == 16 + 56
    assert msg[4:6] == (21).to_bytes(2, "little")  # SOCK_DESTROY
    assert msg[16:18] == bytes([socket.AF_INET, 6])
    assert msg[24:28] == (40000).to_bytes(2, "big") + (443).to_bytes(2, "big")
    assert msg[28:32] == bytes([198, 18, 0, 1]) and msg[44:48] == bytes([198, 18, 0, 2])


def _read_error(sock: socket.socket, out: dict[str, object]) -> None:
    started = time.monotonic()
    try:
        sock.recv(16)
        out["error"] = None
    except OSError as e:
        out["error"] = e.errno
    out["after_s"] = time.monotonic() - started


@pytest.mark.kernel
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_destroyed_client_gets_econnaborted_at_once(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family) as server:
        port = server.getsockname()[1]
        client = socket.create_connection((host, port))
        peer, _ = server.accept()
        src, sport = client.getsockname()[:2]
        out: dict[str, object] = {}
        reader = threading.Thread(target=_read_error, args=(client, out))
        reader.start()
        time.sleep(0.05)  # the reader is blocked in recv
        destroyer = SocketDestroyer()
        assert destroyer.destroy(6, src, sport, host, port)
        reader.join(timeout=2)
        assert out["error"] == errno.ECONNABORTED
        assert float(str(out["after_s"])) < 1.0
        # gone: a second destroy finds nothing, and says so
        assert not destroyer.destroy(6, src, sport, host, port)
        assert (destroyer.stats.destroyed, destroyer.stats.not_found) == (1, 1)
        client.close()
        peer.close()


# a client in its own network namespace: connects over lo and waits for an answer
NS_CLIENT = textwrap.dedent(
    """
    import errno, socket, subprocess, sys
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    srv = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(srv.getsockname())
    print(c.getsockname()[1], srv.getsockname()[1], flush=True)
    try:
        c.recv(1)
        print("no error", flush=True)
    except OSError as e:
        print(errno.errorcode[e.errno], flush=True)
    """
)


@pytest.mark.kernel
def test_destroy_reaches_another_network_namespace() -> None:
    proc = subprocess.Popen(["unshare", "-n", sys.executable, "-c", NS_CLIENT],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        sport, dport = map(int, proc.stdout.readline().split())
        destroyer = SocketDestroyer()
        # not in ours; found in the namespace of the process
        assert destroyer.destroy(6, "127.0.0.1", sport, "127.0.0.1", dport,
                                 other_netns=[f"/proc/{proc.pid}/ns/net"])
        assert proc.stdout.readline().strip() == "ECONNABORTED"
        assert os.waitpid(proc.pid, 0)[1] == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_doctor_names_the_state_and_a_crashed_runs_programs() -> None:
    from leaktap.controller.commands.doctor import Status, check_enforcement
    from leaktap.controller.enforcement.host_state import HostEnforcement

    config = parse_config(CONFIG)
    running = check_enforcement(config, HostEnforcement(2, ["eth9"], [4242]), None, [])
    assert (running.status, running.detail) == (
        Status.OK, "block: acme; dry-run: globex; agent pid 4242; 2 connect program(s) on "
        "the cgroup root, TC filters on eth9")
    crashed = check_enforcement(config, HostEnforcement(2, ["eth9"], []))
    assert crashed.status is Status.WARN
    assert crashed.detail.startswith("no agent runs but 2 connect program(s)")
    assert "keep enforcing its last policy" in crashed.impact
    # the running agent's own account (its /readyz): when it was loaded, and a stale one
    host = HostEnforcement(2, ["eth9"], [4242])
    same = check_enforcement(config, host, {"block_tenants": ["acme"],
                                            "dry_run_tenants": ["globex"],
                                            "policy_loaded_at": 86400.0}, [])
    assert (same.status, same.detail) == (
        Status.OK, "block: acme; dry-run: globex; agent pid 4242 (its policy: block acme, "
        "dry-run globex, loaded 1970-01-02 00:00:00 UTC); 2 connect program(s) on the cgroup "
        "root, TC filters on eth9")
    stale = check_enforcement(config, host, {"block_tenants": ["acme"], "dry_run_tenants": [],
                                             "policy_loaded_at": 86400.0}, [])
    assert stale.status is Status.WARN and "kill -HUP" in stale.fix
    # the shipped catalogue's regex rules: named, the impact said
    shipped = check_enforcement(config, host)
    assert shipped.status is Status.WARN
    assert "catalogue rule(s) the kernel cannot recognise: salesforce (crm_catalogue.yaml: " \
        "rules[3])" in shipped.detail
    assert "refused at connect" in shipped.impact
    off = check_enforcement(None, HostEnforcement(0, [], []))
    assert (off.status, off.detail) == (
        Status.OK, "off (every tenant monitors); no agent running; 0 connect program(s) on "
        "the cgroup root, TC filters on no interface")


def test_reload_summary_names_what_changed_and_what_needs_a_restart() -> None:
    from leaktap.controller.agent import reload_summary

    old = parse_config(CONFIG)
    new = parse_config(CONFIG.replace('allow: ["salesforce:acme"]',
                                      'allow: ["salesforce:acme", "salesforce:initech"]')
                       .replace("enforce: dry-run", "enforce: block")
                       + "listen: 127.0.0.1:9999\n")
    assert reload_summary(old, new) == {
        "tenants_added": [], "tenants_removed": [],
        "tenants_changed": {
            "acme": {"allow_added": ["salesforce:initech"], "allow_removed": []},
            "globex": {"enforce": ["dry-run", "block"]}},
        "enforcement_changed": False, "restart_required": ["listen"]}


def test_audit_lists_decisions_on_their_flow_or_alone() -> None:
    from leaktap.controller.api.routes.audit import with_decisions

    flow = {"id": 7, "src": "198.18.0.1", "sport": 40000, "dst": "198.18.0.2", "dport": 443,
            "last_seen": 10.0, "outcome": "reset"}
    other = {**flow, "id": 8, "sport": 40001, "last_seen": 11.0, "outcome": "completed"}
    hello = {"src": "198.18.0.1", "sport": 40000, "dst": "198.18.0.2", "dport": 443,
             "action": "blocked", "reason": "unsanctioned_instance", "ts": 9.0}
    connects = [{"src": "", "sport": 0, "dst": "198.18.0.3", "dport": 443, "action": a,
                 "reason": "address", "ts": 12.0, "host": "globex.my.salesforce.com",
                 "crm_vendor": "salesforce", "crm_instance": "globex", "tenant": t}
                for a, t in (("blocked", "acme"), ("would_block", "globex"))]
    rows = with_decisions([other, flow], [hello, *connects], attempted_only=False, limit=10)
    assert [(r["id"], r["outcome"], r.get("enforcement_reason")) for r in rows] == [
        (None, "blocked", "address"), (None, "would_block", "address"),
        (8, "completed", None), (7, "blocked", "unsanctioned_instance")]
    attempts = with_decisions([flow], [hello, *connects], attempted_only=True, limit=10)
    assert [(r["id"], r["outcome"]) for r in attempts] == [(None, "blocked"), (7, "blocked")]
