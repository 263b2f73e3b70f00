"""The API refuses before it reads (issue 17.2): a real uvicorn server in its own
process, built by the agent's own `api_server`, is sent 256 MB uploads with and
without credentials, with and without a declared length, and its resident memory
(VmRSS of the server process) is read at idle and at its peak (VmHWM) during them."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from leaktap.controller.agent import (
    API_HEAD_TIMEOUT_S,
    API_MAX_CONNECTIONS,
    API_MAX_HEAD_BYTES,
    api_server,
)
from leaktap.controller.api import guard
from leaktap.controller.api.connections import HeadTimeoutH11Protocol
from leaktap.controller.api.guard import BODY_MAX, SESSION_FORM_MAX, body_limit
from leaktap.controller.api.main import create_app

READER = "reader-token-0123456789"
ADMIN = "admin-token-0123456789ab"
BIG = 256 * 1024 * 1024
CHUNK = b"\0" * (256 * 1024)
RSS_SLACK_KB = 20 * 1024

SERVER = textwrap.dedent("""
    import sys
    from types import SimpleNamespace
    from leaktap.controller.agent import api_server
    from leaktap.controller.api.main import create_app

    agent = SimpleNamespace(plaintext=None, ready=lambda: (True, "ok"),
                            probes=SimpleNamespace(attach_modes={}))
    app = create_app(agent, readers=[sys.argv[2]], admins=[sys.argv[3]], manage=False)
    api_server(app, "127.0.0.1", int(sys.argv[1]), None).run()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    port: int

    def _status_kb(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field}")

    def rss_kb(self) -> int:
        return self._status_kb("VmRSS")

    def idle_rss_kb(self) -> int:
        """The resident size now, with the peak (VmHWM) reset to it: a body held
        only while a request runs is freed before it ends, so growth is read
        from the peak, not from the size afterwards."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        return self.rss_kb()

    def peak_growth_kb(self, idle_kb: int) -> int:
        return self._status_kb("VmHWM") - idle_kb


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    script = tmp_path_factory.mktemp("guard") / "server.py"
    script.write_text(SERVER)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(script), str(port), READER, ADMIN],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the API server did not start"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    srv = Server(proc, url, port)
    # warm every code path measured below, so that idle is idle
    for _ in range(3):
        _normal_traffic(srv)
        _upload(srv, "/v1/canaries", {}, 1 << 20, declared=False)
        _upload(srv, "/v1/canaries", auth(ADMIN), 1 << 20, declared=True)
    yield srv
    proc.terminate()
    proc.wait(10)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Outcome:
    status: int | None  # None: the server closed before the client read an answer
    sent: int  # body bytes the client managed to hand to its socket


def _upload(srv: Server, path: str, headers: dict[str, str], size: int,
            declared: bool) -> Outcome:
    """POST `size` bytes streamed from a generator (the test never holds them)."""
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        while sent < size:
            chunk = CHUNK[:size - sent]
            sent += len(chunk)
            yield chunk

    headers = dict(headers, **({"Content-Length": str(size)} if declared else {}))
    try:
        r = httpx.post(srv.url + path, content=body(), headers=headers, timeout=60)
        return Outcome(r.status_code, sent)
    except httpx.TransportError:
        return Outcome(None, sent)


def _normal_traffic(srv: Server) -> None:
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/v1/whoami", headers=auth(READER)).json() == {"role": "reader"}
        # a JSON body within the cap reaches the route (409: plaintext is off here)
        r = c.post("/v1/canaries", json={"token": "CANARY-0123456789"}, headers=auth(ADMIN))
        assert r.status_code == 409, r.text
        # and is validated by it
        assert c.post("/v1/canaries", json={"token": 1}, headers=auth(ADMIN)).status_code == 422


def test_unauthenticated_uploads_are_refused_unread(server: Server) -> None:
    idle = server.idle_rss_kb()
    jobs = [(path, declared)
            for path in ("/v1/canaries", "/v1/alerts/1/ack", "/v1/session", "/v1/whoami",
                         "/healthz")
            for declared in (True, False)] * 2
    assert len(jobs) == 20
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda j: _upload(server, j[0], {}, BIG, j[1]), jobs))
    grown = server.peak_growth_kb(idle)
    for (path, _), out in zip(jobs, outcomes, strict=True):
        # a public path refuses by size, the others by credentials
        expected = 413 if path in ("/v1/session", "/healthz") else 401
        assert out.status in (expected, None), (path, out)
        # the server closed the connection: most of the upload never left the client
        assert out.sent < 64 * 1024 * 1024, (path, out)
    assert sum(o.status is not None for o in outcomes) >= len(outcomes) // 2, outcomes
    assert grown < RSS_SLACK_KB, f"server RSS grew {grown} kB (idle {idle} kB)"
    _normal_traffic(server)


def test_authenticated_oversized_body_is_413_without_growth(server: Server) -> None:
    idle = server.idle_rss_kb()
    outcomes = [_upload(server, path, auth(ADMIN), BIG, declared)
                for path in ("/v1/canaries", "/v1/alerts/1/ack") for declared in (True, False)]
    grown = server.peak_growth_kb(idle)
    assert all(o.status in (413, None) and o.sent < 64 * 1024 * 1024 for o in outcomes), outcomes
    assert any(o.status == 413 for o in outcomes), outcomes
    assert grown < RSS_SLACK_KB, f"server RSS grew {grown} kB (idle {idle} kB)"


@pytest.mark.parametrize("declared", [True, False])
def test_body_one_byte_over_the_cap(server: Server, declared: bool) -> None:
    ok = _upload(server, "/v1/canaries", auth(ADMIN), BODY_MAX, declared)
    over = _upload(server, "/v1/canaries", auth(ADMIN), BODY_MAX + 1, declared)
    assert ok.status == 422  # read whole and parsed (zero bytes are not JSON)
    assert over.status == 413


def test_sign_in_works_and_its_form_is_capped(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        r = c.post("/v1/session", data={"token": READER},
                   headers={"Origin": server.url})
        assert r.status_code == 303
        assert c.get("/v1/whoami").json() == {"role": "reader"}  # by the session cookie
        form = {"token": READER, "pad": "x" * SESSION_FORM_MAX}
        assert c.post("/v1/session", data=form).status_code == 413
        login = httpx.get(server.url + "/", timeout=10)
        assert login.status_code == 401 and "<form" in login.text


def test_connections_beyond_the_cap_get_503(server: Server) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in
            range(API_MAX_CONNECTIONS)]
    try:
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 503
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/healthz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "connections were not released"
        time.sleep(0.05)


def test_oversized_request_head_is_refused(server: Server) -> None:
    idle = server.idle_rss_kb()
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
            try:
                for _ in range(64):  # 16 MiB of header unless the server hangs up
                    s.sendall(b"a" * (256 * 1024))
            except OSError:
                pass
            answer = s.recv(4096)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:80]
    assert server.peak_growth_kb(idle) < RSS_SLACK_KB
    assert API_MAX_HEAD_BYTES <= 64 * 1024


@pytest.mark.parametrize(("method", "path", "limit"), [
    ("POST", "/v1/session", SESSION_FORM_MAX), ("POST", "/v1/canaries", BODY_MAX),
    ("GET", "/v1/alerts", 0), ("DELETE", "/v1/session", 0), ("POST", "/healthz", 0),
])
def test_body_limits(method: str, path: str, limit: int) -> None:
    assert body_limit(method, path) == limit


def test_malformed_content_length_is_400() -> None:
    app = create_app(object(), readers=[READER], admins=[ADMIN], manage=False)
    with TestClient(app) as c:
        r = c.post("/v1/canaries", content=b"{}",
                   headers={**auth(ADMIN), "Content-Length": "two"})
        assert r.status_code == 400
        r = c.post("/v1/canaries", content=b"{}")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_server_runs_under_the_agents_limits() -> None:
    app = create_app(object(), readers=[READER], admins=[ADMIN], manage=False)
    config = api_server(app, "127.0.0.1", 0, None).config
    assert config.limit_concurrency == API_MAX_CONNECTIONS
    assert config.h11_max_incomplete_event_size == API_MAX_HEAD_BYTES
    assert config.http is HeadTimeoutH11Protocol
    assert config.timeout_keep_alive == API_HEAD_TIMEOUT_S


@pytest.fixture
def quick_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, int]]:
    """The agent's server in a thread, its head and body deadlines cut to 0.5 s."""
    monkeypatch.setattr(guard, "BODY_TIMEOUT_S", 0.5)
    app = create_app(object(), readers=[READER], admins=[ADMIN], manage=False)
    server = api_server(app, "127.0.0.1", _free_port(), None)
    server.config.timeout_keep_alive = 0.5
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield "127.0.0.1", server.config.port
    server.should_exit = True
    thread.join(10)


def _closed_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
        return True
    except TimeoutError:
        return False


def test_silent_and_slow_heads_are_cut_off(quick_server: tuple[str, int]) -> None:
    silent = socket.create_connection(quick_server)
    slow = socket.create_connection(quick_server)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    try:
        assert _closed_within(silent, 5) and _closed_within(slow, 5)
    finally:
        silent.close()
        slow.close()


def test_a_trickled_body_is_408(quick_server: tuple[str, int]) -> None:
    with socket.create_connection(quick_server) as s:
        s.sendall(b"POST /v1/canaries HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                  b"Authorization: Bearer " + ADMIN.encode() + b"\r\n\r\n{")
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 408 ")
