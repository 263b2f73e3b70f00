"""End to end: `leaktap run` killed (SIGKILL) in the middle of a long TLS upload to a
namespace posing as acme.my.salesforce.com, then started again on the same pinned maps
and database. The restarted agent resumes the live conversation with the names it had:
the whole upload, within 1 % of the interface's tx_bytes, stays on one flow row under
the right tenant, vendor and instance (issue 11.1)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaktap.controller.kernel import loader
from leaktap.controller.storage import minute_of
from tests.netlab import make_cert, tls_sink, veth_lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

SNI = "acme.my.salesforce.com"
TOKEN = "reader-token-restart-0123"
# a private pin root on the real bpffs, so a running agent's pins are untouched
PIN_ROOT = loader.BPFFS / "leaktap-test-restart"
UPLOAD_BYTES = 12_000_000
UPLOAD_S = 8.0
KILL_AFTER_S = 2.5


@pytest.fixture
def pin_root() -> Iterator[Path]:
    shutil.rmtree(PIN_ROOT, ignore_errors=True)
    yield PIN_ROOT
    shutil.rmtree(PIN_ROOT, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _start_agent(cfg: Path, db: Path, iface: str, port: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "leaktap.controller.commands.cli", "run", "--config", str(cfg),
           "--iface", iface, "--listen", f"127.0.0.1:{port}", "--db", str(db)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"agent exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if _get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("agent did not become ready within 30 s")


class PacedUpload(threading.Thread):
    """A TLS upload of `nbytes` spread evenly over `seconds` (a sync job's long upload),
    in the sink's protocol: 8-byte length, the bytes, then the sink's "ok"."""

    def __init__(self, host: str, nbytes: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.host, self.nbytes, self.seconds = host, nbytes, seconds
        self.local: tuple[str, int] | None = None
        self.connected = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with socket.create_connection((self.host, 443), timeout=30) as raw:
                self.local = raw.getsockname()[:2]
                with ctx.wrap_socket(raw, server_hostname=SNI) as tls:
                    self.connected.set()
                    tls.sendall(self.nbytes.to_bytes(8, "big"))
                    block, start, sent = b"x" * 32768, time.monotonic(), 0
                    while sent < self.nbytes:
                        n = min(len(block), self.nbytes - sent)
                        tls.sendall(block[:n])
                        sent += n
                        ahead = start + self.seconds * sent / self.nbytes - time.monotonic()
                        if ahead > 0:
                            time.sleep(ahead)  # pacing, not waiting for an outcome
                    assert tls.recv(2) == b"ok", "the sink did not confirm receipt"
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            self.error = e
            self.connected.set()


def _upload_flows(port: int, local: tuple[str, int]) -> list[dict[str, object]]:
    status, body = _get(f"http://127.0.0.1:{port}/v1/flows")
    assert status == 200, body
    return [f for f in json.loads(body)["flows"]
            if (f["src"], f["sport"], f["dport"]) == (local[0], local[1], 443)]


def test_sigkill_mid_upload_resumes_names_and_flow_row(tmp_path: Path, pin_root: Path) -> None:
    cert, key = make_cert(tmp_path, SNI)
    port = _free_port()
    cfg = tmp_path / "leaktap.yaml"
    cfg.write_text(
        "tenants:\n"
        "  - name: acme\n"
        '    match: {sni: "{tenant}.my.salesforce.com"}\n'
        '    allow: ["salesforce:acme"]\n'
        f"tokens: {{reader: [{TOKEN}]}}\n"
        f"kernel: {{pin_root: {pin_root}}}\n"
    )
    db = tmp_path / "lt.db"
    with veth_lab("lt-rs", "198.18.22.1", "198.18.22.2") as lab, tls_sink(lab, cert, key):
        proc = _start_agent(cfg, db, lab.host_if, port)
        try:
            before = lab.tx_bytes()
            upload = PacedUpload(lab.peer_ip, UPLOAD_BYTES, UPLOAD_S)
            upload.start()
            assert upload.connected.wait(10) and upload.error is None, upload.error
            time.sleep(KILL_AFTER_S)  # the moment of the crash, mid-upload
            proc.kill()
            proc.wait()
            proc = _start_agent(cfg, db, lab.host_if, port)
            upload.join(UPLOAD_S + 30)
            assert not upload.is_alive() and upload.error is None, upload.error
            time.sleep(0.3)  # FIN/ACK exchange
            tx = lab.tx_bytes() - before
            assert upload.local is not None
            # the agent drains once a second: wait until the flow holds the wire bytes
            deadline = time.monotonic() + 10
            while True:
                flows = _upload_flows(port, upload.local)
                total = sum(int(f["bytes_out"]) for f in flows)  # type: ignore[call-overload]
                if abs(total - tx) <= 0.01 * tx or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            minutes = [minute_of(time.time())]  # open when asked, and when answered
            status, body = _get(f"http://127.0.0.1:{port}/v1/tenants/acme/volume")
            assert status == 200, body
            series = json.loads(body)["series"]
            minutes.append(minute_of(time.time()))
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=20)
        assert rc == 0, proc.stderr.read() if proc.stderr else rc
    assert tx > UPLOAD_BYTES
    named = sum(int(f["bytes_out"]) for f in flows  # type: ignore[call-overload]
                if (f["tenant"], f["crm_vendor"], f["crm_instance"]) == ("acme", "salesforce",
                                                                          "acme"))
    misattributed = 1 - named / total if total else 1.0
    assert abs(total - tx) <= 0.01 * tx, (total, tx)
    assert misattributed == 0, f"{misattributed:.1%} of {total} bytes misattributed: {flows}"
    (flow,) = flows  # one conversation, one row, before and after the restart
    # the minute buckets agree, the open minute included (marked partial, issue 11.7)
    crm_bytes = sum(p["crm_bytes_out"] for p in series)
    assert abs(crm_bytes - tx) <= 0.01 * tx, (crm_bytes, tx, series)
    partial = [p["partial"] for p in series]
    assert any(partial == [p["ts"] >= m for p in series] for m in minutes), series
    assert flow["sni"] == SNI
    assert abs(int(flow["bytes_out"]) - tx) <= 0.01 * tx  # type: ignore[call-overload]
