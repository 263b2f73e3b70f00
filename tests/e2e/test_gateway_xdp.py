"""Gateway mode end to end: node namespace -> this host forwarding (the
gateway, XDP on its inside interface) -> CRM namespace. TLS uploads from two
node addresses are attributed to two tenants by source address, and the
counts match the inside interface's rx counter within 1%."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaktap.controller.agent import Agent
from leaktap.controller.config import parse_config
from leaktap.controller.kernel import loader
from leaktap.controller.storage import Store
from tests.netlab import VethLab, make_cert, sh, tls_sink

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
NODE_NS, CRM_NS = "lt-t5-node", "lt-t5-crm"
INSIDE_IF, OUTSIDE_IF = "lt-t5-gi", "lt-t5-go"
CONFIG = f"""
mode: xdp
inside: ["198.18.40.0/24"]
interfaces: [{INSIDE_IF}]
tenants:
  - name: alpha
    match: {{cidrs: ["198.18.40.11/32"]}}
  - name: beta
    match: {{cidrs: ["198.18.40.12/32"]}}
"""
UPLOAD = 1_200_000


@contextlib.contextmanager
def gateway_lab() -> Iterator[VethLab]:
    def teardown() -> None:
        for link in (INSIDE_IF, OUTSIDE_IF):
            sh("ip", "link", "del", link, check=False)
        for ns in (NODE_NS, CRM_NS):
            sh("ip", "netns", "del", ns, check=False)

    teardown()
    try:
        for ns, host_if, peer_if, host_ip, peer_ips in (
            (NODE_NS, INSIDE_IF, "lt-t5-n", "198.18.40.1/24",
             ["198.18.40.11/24", "198.18.40.12/24"]),
            (CRM_NS, OUTSIDE_IF, "lt-t5-c", "198.18.41.1/24", ["198.18.41.2/24"]),
        ):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
            sh("ip", "link", "set", peer_if, "netns", ns)
            sh("sysctl", "-qw", f"net.ipv6.conf.{host_if}.disable_ipv6=1")
            # forwarding on these two interfaces only, not on the host's uplink
            sh("sysctl", "-qw", f"net.ipv4.conf.{host_if}.forwarding=1")
            sh("ip", "addr", "add", host_ip, "dev", host_if)
            sh("ip", "link", "set", host_if, "up")
            inns = ["ip", "netns", "exec", ns]
            sh(*inns, "sysctl", "-qw", f"net.ipv6.conf.{peer_if}.disable_ipv6=1")
            for ip in peer_ips:
                sh(*inns, "ip", "addr", "add", ip, "dev", peer_if)
            sh(*inns, "ip", "link", "set", peer_if, "up")
            sh(*inns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", NODE_NS, "ip", "route", "add", "default", "via", "198.18.40.1")
        sh("ip", "netns", "exec", CRM_NS, "ip", "route", "add", "198.18.40.0/24",
           "via", "198.18.41.1")
        yield VethLab(OUTSIDE_IF, CRM_NS, "198.18.41.1", "198.18.41.2")
    finally:
        teardown()


def _upload_from_node(source: str, sni: str) -> None:
    code = (f"from tests.netlab import tls_upload; "
            f"tls_upload('198.18.41.2', 443, {sni!r}, {UPLOAD}, source={source!r})")
    done = subprocess.run(["ip", "netns", "exec", NODE_NS, sys.executable, "-c", code],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _rx_bytes(iface: str) -> int:
    return int(Path(f"/sys/class/net/{iface}/statistics/rx_bytes").read_text())


def test_gateway_attributes_two_node_addresses_by_cidr(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "crm.test")
    store = Store(tmp_path / "lt.db")
    try:
        with gateway_lab() as crm, tls_sink(crm, cert, key):
            agent = Agent(parse_config(CONFIG), [INSIDE_IF], store, pin=False)
            agent.start()
            try:
                mode = agent.probes.attach_modes[INSIDE_IF]
                assert loader.xdp_program(INSIDE_IF) == ("lt_xdp_gw", mode)
                before = _rx_bytes(INSIDE_IF)
                _upload_from_node("198.18.40.11", "acme.my.salesforce.com")
                _upload_from_node("198.18.40.12", "api.hubapi.com")
                time.sleep(0.3)
                rx = _rx_bytes(INSIDE_IF) - before
                agent.poll_once()
                flows = [f for f in agent.flow_records() if f["dport"] == 443]
            finally:
                agent.stop()
            assert loader.xdp_program(INSIDE_IF) == (None, None)
    finally:
        store.close()
    by_tenant = {f["tenant"]: f for f in flows}
    assert set(by_tenant) == {"alpha", "beta"}, flows
    alpha, beta = by_tenant["alpha"], by_tenant["beta"]
    assert (alpha["src"], alpha["dst"], alpha["sni"], alpha["crm_vendor"]) == (
        "198.18.40.11", "198.18.41.2", "acme.my.salesforce.com", "salesforce")
    assert (beta["src"], beta["sni"], beta["crm_vendor"]) == (
        "198.18.40.12", "api.hubapi.com", "hubspot")
    counted = alpha["bytes_out"] + beta["bytes_out"]
    assert counted > 2 * UPLOAD
    assert abs(counted - rx) <= 0.01 * rx, (counted, rx)
    # only the inside interface is watched: replies leave through it, unseen by XDP
    assert alpha["bytes_in"] == 0
