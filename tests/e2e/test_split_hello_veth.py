"""A real client evading SNI inspection by splitting its ClientHello (issue 11.3), live.

The client makes a genuine TLS hello (Python's ssl on memory BIOs), spreads its
handshake message over several TLS records, and writes it to a TCP_NODELAY
socket in tiny pieces with pauses, so each piece leaves as its own segment; the
first segment holds one byte. The handshake then completes against a TLS sink
in a namespace and a payload is uploaded. The agent on the veth's host end must
attribute the flow to the hello's server name.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from leaktap.controller.agent import Agent
from leaktap.controller.api.main import create_app
from leaktap.controller.config import parse_config
from leaktap.controller.storage import Store
from tests.netlab import make_cert, tls_sink, veth_lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

SNI = "acme.my.salesforce.com"
HOST_IP, PEER_IP = "198.18.33.1", "198.18.33.2"
TOKEN = "reader-token-0123456789"
CONFIG = f"""
tenants:
  - name: acme
    match: {{cidrs: ["{HOST_IP}/32"]}}
tokens: {{reader: [{TOKEN}]}}
"""
PIECES = [1, 2, 3, 5, 8, 13, 21, 34]  # segment sizes; the rest goes in one more segment
RECORDS = [2, 40]  # handshake message fragments per record; the rest in one more record
UPLOAD = 200_000


def reframe(hello: bytes, sizes: list[int]) -> bytes:
    """The hello's handshake message over TLS records of the given sizes (plus the rest)."""
    msg, out, pos = hello[5 : 5 + int.from_bytes(hello[3:5], "big")], b"", 0
    for n in [*sizes, len(msg)]:
        piece = msg[pos : pos + n]
        if piece:
            out += hello[:3] + len(piece).to_bytes(2, "big") + piece
        pos += n
    return out + hello[5 + len(msg) :]


def split_hello_upload(host: str, port: int) -> int:
    """Handshake with the hello split into records and tiny segments; upload; returns
    the number of segments the hello was written in."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=SNI)
    with socket.create_connection((host, port), timeout=10, source_address=(HOST_IP, 0)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = reframe(outgoing.read(), RECORDS)
        pos, writes = 0, 0
        for n in [*PIECES, len(hello)]:
            if pos < len(hello):
                s.sendall(hello[pos : pos + n])
                writes += 1
                time.sleep(0.02)  # let each piece leave as its own segment
            pos += n
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if pending := outgoing.read():
                    s.sendall(pending)
                data = s.recv(65536)
                assert data, "the sink closed during the handshake"
                incoming.write(data)
        tls.write(UPLOAD.to_bytes(8, "big") + b"x" * UPLOAD)
        s.sendall(outgoing.read())
        answer = b""
        while len(answer) < 2:
            incoming.write(s.recv(65536))
            try:
                answer += tls.read(2)
            except ssl.SSLWantReadError:
                continue
        assert answer == b"ok"
    return writes


def test_live_split_hello_is_attributed_to_its_sni(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "crm.test")
    store = Store(tmp_path / "lt.db")
    try:
        with veth_lab("lt-hs", HOST_IP, PEER_IP, prefix=24) as lab, tls_sink(lab, cert, key):
            agent = Agent(parse_config(CONFIG), [lab.host_if], store, pin=False)
            agent.start()
            try:
                writes = split_hello_upload(PEER_IP, 443)
                time.sleep(0.3)
                agent.poll_once()
                client = TestClient(create_app(agent, [TOKEN], [], manage=False))
                flows = client.get("/v1/flows", headers={"Authorization": f"Bearer {TOKEN}"}
                                   ).json()["flows"]
                stats = dict(agent.stats)
            finally:
                agent.stop()
    finally:
        store.close()

    assert writes == len(PIECES) + 1
    [flow] = [f for f in flows if f["dport"] == 443]
    assert (flow["sni"], flow["crm_vendor"], flow["crm_instance"], flow["tenant"]) == (
        SNI, "salesforce", "acme", "acme"), flow
    assert flow["bytes_out"] > UPLOAD
    assert stats["cnt_ev_hello"] >= len(PIECES) + 1  # one event per captured segment
    assert {k: v for k, v in stats.items() if k.startswith("loss_hello") and v} == {}
