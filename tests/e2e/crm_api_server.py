"""A TLS server answering each CRM vendor's REST grammar (issue 14.6), HTTP/1.1 and
HTTP/2 (ALPN), for the data-flow e2e test.

Every call of tests/analytics/crm_fixtures.FIXTURES is answered with its
documented JSON body and status; EXTRA adds a refused (403) call and one the
server never answers. Bodies go out in several shapes so the read side meets
them all: gzip when the client accepts it (every other answer), chunked
(every third), else Content-Length. Unknown routes get 404. Runs inside the
lab namespace: `python -m tests.e2e.crm_api_server CERT KEY HOST PORT`.
"""

from __future__ import annotations

import gzip
import ssl
import threading

from tests.analytics.crm_fixtures import ALL_CALLS
from tests.e2e.crm_server import serve_forever

REFUSED_TARGET = "/services/data/v59.0/sobjects/Opportunity/006XX0000001AAAAA1"
REFUSED_BODY = b'[{"message":"insufficient access rights","errorCode":"INSUFFICIENT_ACCESS"}]'
SILENT_TARGET = "/services/data/v59.0/sobjects/Lead/00QXX0000001AAAAA1"
NO_ANSWER = -1
# (method, target) -> (status, body)
ROUTES: dict[tuple[str, str], tuple[int, bytes]] = {
    **{(c.method, c.target): (c.status, c.response) for c in ALL_CALLS},
    ("GET", REFUSED_TARGET): (403, REFUSED_BODY),
    ("GET", SILENT_TARGET): (NO_ANSWER, b""),
}
REASONS = {200: "OK", 201: "Created", 204: "No Content", 403: "Forbidden", 404: "Not Found"}
_served = [0]  # answers sent (picks each answer's shape)
_lock = threading.Lock()


def answer(method: str, target: str, accept: str) -> tuple[int, list[tuple[str, str]], bytes,
                                                             bool]:
    """(status, headers, body as sent, chunked) for a request; status NO_ANSWER: none."""
    status, body = ROUTES.get((method, target), (404, b'{"error":"no route"}'))
    with _lock:
        n = _served[0]
        _served[0] += 1
    headers = [("content-type", "application/json")]
    if status in (204, NO_ANSWER):
        return status, [], b"", False
    if n % 2 == 0 and "gzip" in accept and body:
        body = gzip.compress(body)
        headers.append(("content-encoding", "gzip"))
    return status, headers, body, n % 3 == 0


def _h1(tls: ssl.SSLSocket) -> None:
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = tls.recv(65536)
            if not chunk:
                return
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        fields = {k.strip().lower(): v.strip() for k, _, v in (
            line.partition(":") for line in lines[1:])}
        length = int(fields.get("content-length", "0"))
        while len(buf) < length:
            chunk = tls.recv(65536)
            if not chunk:
                return
            buf += chunk
        buf = buf[length:]
        status, headers, body, chunked = answer(method, target, fields.get("accept-encoding", ""))
        if status == NO_ANSWER:
            continue
        out = f"HTTP/1.1 {status} {REASONS.get(status, 'X')}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers)
        if status == 204:
            tls.sendall(out.encode() + b"\r\n")
        elif chunked:
            parts = [body[i:i + 100] for i in range(0, len(body), 100)]
            tls.sendall(out.encode() + b"transfer-encoding: chunked\r\n\r\n" + b"".join(
                f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n")
        else:
            tls.sendall(out.encode() + f"content-length: {len(body)}\r\n\r\n".encode() + body)


def _h2(tls: ssl.SSLSocket) -> None:
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                header_encoding="latin-1"))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    heads: dict[int, dict[str, str]] = {}
    while True:
        data = tls.recv(65536)
        if not data:
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                heads[event.stream_id] = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                h = heads.pop(event.stream_id, {})
                status, headers, body, _ = answer(h.get(":method", ""), h.get(":path", ""),
                                                  h.get("accept-encoding", ""))
                if status == NO_ANSWER:
                    continue
                conn.send_headers(event.stream_id, [(":status", str(status)), *headers],
                                  end_stream=not body)
                if body:
                    conn.send_data(event.stream_id, body, end_stream=True)
        tls.sendall(conn.data_to_send())


def main() -> None:
    serve_forever(_h1, _h2)


if __name__ == "__main__":
    main()
