"""A TLS server posing as a CRM for the plaintext tests: HTTP/1.1 and HTTP/2 (ALPN).

It reads each request whole (Content-Length or chunked; HTTP/2 until
END_STREAM) and answers 200 "ok", so a client knows its bytes crossed. Raw
bytes that are not HTTP (openssl s_client, garbage) are read until the peer
closes. Runs inside the lab namespace: `python -m tests.e2e.crm_server CERT KEY HOST PORT`.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from collections.abc import Callable


def _h1(tls: ssl.SSLSocket) -> None:
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = tls.recv(65536)
            if not chunk:
                return
            buf += chunk
            if len(buf) > 1 << 20 and b"\r\n\r\n" not in buf:
                buf = buf[-4:]  # not HTTP (or a huge request line): keep draining
        head, _, buf = buf.partition(b"\r\n\r\n")
        lower = head.lower()
        length = 0
        for line in lower.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if b"transfer-encoding: chunked" in lower:
            while not buf.endswith(b"0\r\n\r\n"):
                chunk = tls.recv(65536)
                if not chunk:
                    return
                buf += chunk
            buf = b""
        else:
            while len(buf) < length:
                chunk = tls.recv(65536)
                if not chunk:
                    return
                buf += chunk
            buf = buf[length:]
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")


def _h2(tls: ssl.SSLSocket) -> None:
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    while True:
        data = tls.recv(65536)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                conn.send_headers(event.stream_id, [(":status", "200"),
                                                    ("content-length", "2")])
                conn.send_data(event.stream_id, b"ok", end_stream=True)
        tls.sendall(conn.data_to_send())


Handler = Callable[[ssl.SSLSocket], None]


def _serve(ctx: ssl.SSLContext, raw: socket.socket, h1: Handler, h2_: Handler) -> None:
    try:
        with ctx.wrap_socket(raw, server_side=True) as tls:
            (h2_ if tls.selected_alpn_protocol() == "h2" else h1)(tls)
    except Exception:  # noqa: BLE001 - a client gone or a protocol error: drop the connection
        pass


def serve_forever(h1: Handler, h2_: Handler) -> None:
    """argv CERT KEY HOST PORT: accept TLS (ALPN h2, http/1.1) and give each connection
    to the handler of its protocol, in a thread; "ready" on stdout once listening."""
    cert, key, host, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    srv = socket.create_server((host, port), backlog=64)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        raw, _ = srv.accept()
        threading.Thread(target=_serve, args=(ctx, raw, h1, h2_), daemon=True).start()


def main() -> None:
    serve_forever(_h1, _h2)


if __name__ == "__main__":
    main()
