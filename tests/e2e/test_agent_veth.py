"""End to end: the agent in the host namespace, a real TLS upload over a veth
to a namespace posing as a CRM; counts checked against the interface."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from leaktap.controller.agent import Agent
from leaktap.controller.config import parse_config
from leaktap.controller.storage import Store
from tests.netlab import make_cert, sh, tls_sink, tls_upload, veth_lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

CONFIG = """
tenants:
  - name: acme
    match: {sni: "{tenant}.my.salesforce.com"}
    allow: ["salesforce:acme"]
"""


def _our_filters(iface: str) -> list[str]:
    out = []
    for direction in ("egress", "ingress"):
        text = sh("tc", "filter", "show", "dev", iface, direction, check=False).stdout
        out += [line for line in text.splitlines() if "lt_tc_" in line]
    return out


def test_tls_upload_counted_within_1pct_of_tx_bytes(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "acme.my.salesforce.com")
    with veth_lab("lt-t1", "198.18.20.1", "198.18.20.2") as lab, tls_sink(lab, cert, key):
        store = Store(tmp_path / "lt.db")
        agent = Agent(parse_config(CONFIG), [lab.host_if], store, pin=False)
        agent.start()
        try:
            assert len(_our_filters(lab.host_if)) == 2
            before = lab.tx_bytes()
            tls_upload(lab.peer_ip, 443, "acme.my.salesforce.com", 3_000_000)
            time.sleep(0.3)  # FIN/ACK exchange
            after = lab.tx_bytes()
            agent.poll_once()
            flows = [f for f in agent.flow_records() if f["dport"] == 443]
        finally:
            agent.stop()
        assert _our_filters(lab.host_if) == []
    assert len(flows) == 1
    flow = flows[0]
    assert flow["src"] == "198.18.20.1" and flow["dst"] == "198.18.20.2"
    assert flow["sni"] == "acme.my.salesforce.com"
    assert (flow["crm_vendor"], flow["crm_instance"], flow["tenant"]) == (
        "salesforce", "acme", "acme"
    )
    tx = after - before
    assert tx > 3_000_000
    assert abs(flow["bytes_out"] - tx) <= 0.01 * tx, (flow["bytes_out"], tx)
    assert flow["bytes_in"] > 0  # the ingress program counted the server's replies


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _start_cli(tmp_path: Path, iface: str, port: int) -> subprocess.Popen[str]:
    cfg = tmp_path / "leaktap.yaml"
    cfg.write_text(CONFIG + "tokens: {reader: [reader-token-0123456789]}\n")
    cmd = [
        sys.executable, "-m", "leaktap.controller.commands.cli", "run", "--config", str(cfg),
        "--iface", iface, "--listen", f"127.0.0.1:{port}", "--db", str(tmp_path / "lt.db"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"agent exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if _get(f"http://127.0.0.1:{port}/healthz", None)[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("agent did not start within 30 s")


def test_cli_run_serves_api_and_sigterm_detaches(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "acme.my.salesforce.com")
    port = _free_port()
    token = "reader-token-0123456789"
    with veth_lab("lt-t2", "198.18.20.5", "198.18.20.6") as lab, tls_sink(lab, cert, key):
        proc = _start_cli(tmp_path, lab.host_if, port)
        try:
            assert len(_our_filters(lab.host_if)) == 2
            tls_upload(lab.peer_ip, 443, "acme.my.salesforce.com", 200_000)
            time.sleep(2.5)  # two poll intervals
            assert _get(f"http://127.0.0.1:{port}/v1/flows", None)[0] == 401
            assert _get(f"http://127.0.0.1:{port}/v1/flows", "wrong-token-0123456789")[0] == 401
            status, body = _get(f"http://127.0.0.1:{port}/readyz", token)
            assert status == 200 and json.loads(body)["attached"] == {lab.host_if: "tc"}
            status, body = _get(f"http://127.0.0.1:{port}/v1/flows?tenant=acme", token)
            assert status == 200
            flows = json.loads(body)["flows"]
            assert [f["sni"] for f in flows] == ["acme.my.salesforce.com"]
            assert flows[0]["bytes_out"] > 200_000
            status, metrics = _get(f"http://127.0.0.1:{port}/metrics", token)
            assert status == 200 and b'leaktap_interface_bytes_total{direction="egress"}' in metrics
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=20)
        assert rc == 0, proc.stderr.read()
        assert _our_filters(lab.host_if) == []


def test_crash_leaves_no_filter_behind_on_next_start(tmp_path: Path) -> None:
    port = _free_port()
    with veth_lab("lt-t3", "198.18.20.9", "198.18.20.10") as lab:
        proc = _start_cli(tmp_path, lab.host_if, port)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(_our_filters(lab.host_if)) == 2  # the crash left them
        proc = _start_cli(tmp_path, lab.host_if, port)
        try:
            assert len(_our_filters(lab.host_if)) == 2  # replaced, not duplicated
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        assert _our_filters(lab.host_if) == []
