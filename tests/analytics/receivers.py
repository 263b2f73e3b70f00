"""Local receivers speaking the sinks' real protocols, on 127.0.0.1 only.

- `PagerDutyReceiver`: the Events API v2 contract (validates the event, 202 with
  `{"status": "success", "dedup_key": ...}`, 400 with errors for an invalid one or a
  routing key it does not know, 429/5xx on command) and PagerDuty's dedup: a
  trigger for an open incident joins it, so `pages` counts real pages.
- `WebhookReceiver`: verifies `X-Leaktap-Signature` with the shared secret.
- `SyslogUdpReceiver` / `SyslogTcpReceiver`: RFC 5424 (TCP: RFC 6587 octet
  counting) with a CEF body, parsed back into fields with CEF's unescaping.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PD_SEVERITIES = {"critical", "error", "warning", "info"}
PD_ACTIONS = {"trigger", "acknowledge", "resolve"}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("content-length", 0))
        body = self.rfile.read(length)
        status, reply, headers = self.server.receiver.handle(  # type: ignore[attr-defined]
            self.path, dict(self.headers), body)
        data = json.dumps(reply).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class HttpReceiver:
    """A threaded HTTP server; `script` holds statuses to answer before the normal one."""

    def __init__(self, port: int = 0) -> None:
        self.lock = threading.Lock()
        self.script: list[int] = []
        self.requests: list[tuple[float, dict[str, str], bytes]] = []
        self.retry_after: str | None = None
        self.port = port
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2/enqueue"

    def start(self) -> HttpReceiver:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        self.server.daemon_threads = True
        self.server.receiver = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Down: the port refuses connections until start() again."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def handle(
        self, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            self.requests.append((time.monotonic(), headers, body))
            if self.script:
                status = self.script.pop(0)
                extra = {}
                if status == 429 and self.retry_after:
                    extra["Retry-After"] = self.retry_after
                return status, {"status": "error", "message": f"scripted {status}"}, extra
            return self.accept(headers, body)

    def accept(self, headers: dict[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        return 200, {}, {}


@dataclass
class Incident:
    status: str  # triggered | acknowledged | resolved
    trigger: dict[str, Any]
    events: list[str] = field(default_factory=list)


class PagerDutyReceiver(HttpReceiver):
    def __init__(self, routing_keys: set[str], port: int = 0) -> None:
        super().__init__(port)
        self.routing_keys = routing_keys
        self.accepted: list[dict[str, Any]] = []
        self.incidents: dict[str, Incident] = {}
        self.pages = 0  # triggers that opened an incident

    def accept(self, headers: dict[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        try:
            event = json.loads(body)
        except ValueError:
            return 400, {"status": "invalid event", "message": "Event object is invalid",
                         "errors": ["body is not JSON"]}, {}
        errors = self.validate(event)
        if errors:
            return 400, {"status": "invalid event", "message": "Event object is invalid",
                         "errors": errors}, {}
        self.accepted.append(event)
        key, action = event["dedup_key"], event["event_action"]
        incident = self.incidents.get(key)
        if action == "trigger":
            if incident is None or incident.status == "resolved":
                self.incidents[key] = Incident("triggered", event, ["trigger"])
                self.pages += 1
            else:
                incident.events.append("trigger")  # joins the open incident
        elif incident is not None and incident.status != "resolved":
            incident.status = "acknowledged" if action == "acknowledge" else "resolved"
            incident.events.append(action)
        return 202, {"status": "success", "message": "Event processed", "dedup_key": key}, {}

    def validate(self, event: dict[str, Any]) -> list[str]:
        errors = []
        if event.get("routing_key") not in self.routing_keys:
            errors.append("Invalid routing key")
        if event.get("event_action") not in PD_ACTIONS:
            errors.append("'event_action' is invalid")
        if not event.get("dedup_key") or len(event["dedup_key"]) > 255:
            errors.append("'dedup_key' is invalid")
        if event.get("event_action") == "trigger":
            payload = event.get("payload") or {}
            if not payload.get("summary") or len(payload["summary"]) > 1024:
                errors.append("'payload.summary' is missing or too long")
            if not payload.get("source"):
                errors.append("'payload.source' is missing")
            if payload.get("severity") not in PD_SEVERITIES:
                errors.append("'payload.severity' is invalid")
            try:
                datetime.fromisoformat(payload.get("timestamp", "").replace("Z", "+00:00"))
            except ValueError:
                errors.append("'payload.timestamp' is not ISO 8601")
        return errors


class WebhookReceiver(HttpReceiver):
    def __init__(self, secret: bytes, port: int = 0) -> None:
        super().__init__(port)
        self.secret = secret
        self.documents: list[dict[str, Any]] = []
        self.delivery_ids: list[str] = []
        self.bad_signatures = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def accept(self, headers: dict[str, str], body: bytes) -> tuple[int, Any, dict[str, str]]:
        expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(headers.get("X-Leaktap-Signature", ""), expected):
            self.bad_signatures += 1
            return 401, {"error": "bad signature"}, {}
        document = json.loads(body)
        self.documents.append(document)
        self.delivery_ids.append(headers["X-Leaktap-Delivery"])
        return 200, {"ok": True}, {}


# -- syslog + CEF -------------------------------------------------------------------

RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) "
    r"(?P<msgid>\S+) (?P<sd>-|(?:\[.*?\])+) (?P<msg>.*)$", re.S,
)


def parse_cef(message: str) -> dict[str, Any]:
    """CEF:Version|Vendor|Product|Version|SignatureID|Name|Severity|Extension, unescaped."""
    fields, current, i = [], "", 0
    while len(fields) < 7:
        ch = message[i]
        if ch == "\\" and message[i + 1] in "\\|":
            current += message[i + 1]
            i += 2
            continue
        if ch == "|":
            fields.append(current)
            current = ""
        else:
            current += ch
        i += 1
    extension = message[i:]
    # a key starts after a space and runs to an unescaped '='
    starts = [m for m in re.finditer(r"(?:^| )([A-Za-z0-9_.]+)=", extension)
              if not _escaped(extension, m.end() - 1)]
    ext = {}
    for n, m in enumerate(starts):
        end = starts[n + 1].start() if n + 1 < len(starts) else len(extension)
        ext[m.group(1)] = _unescape_value(extension[m.end():end])
    version, vendor, product, dev_version, signature, name, severity = fields
    return {"version": version, "vendor": vendor, "product": product,
            "device_version": dev_version, "signature": signature, "name": name,
            "severity": int(severity), "ext": ext}


def _escaped(text: str, pos: int) -> bool:
    backslashes = 0
    while pos - 1 - backslashes >= 0 and text[pos - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def _unescape_value(value: str) -> str:
    out, i = "", 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            out += {"n": "\n", "r": "\r"}.get(value[i + 1], value[i + 1])
            i += 2
        else:
            out += value[i]
            i += 1
    return out


def parse_syslog(line: bytes) -> dict[str, Any]:
    m = RFC5424.match(line.decode())
    assert m is not None, f"not RFC 5424: {line[:120]!r}"
    record = m.groupdict()
    record["pri"] = int(record["pri"])
    record["cef"] = parse_cef(record["msg"])
    return record


class SyslogUdpReceiver:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.address = f"udp://127.0.0.1:{self.sock.getsockname()[1]}"

    def receive(self) -> dict[str, Any]:
        data, _ = self.sock.recvfrom(65535)
        return parse_syslog(data)

    def close(self) -> None:
        self.sock.close()


class SyslogTcpReceiver:
    """Accepts connections and splits each stream by octet counting."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.messages: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.cond = threading.Condition()
        self.connections = 0
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            self.open.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while chunk := _recv(conn):
                buf += chunk
                while True:
                    m = re.match(rb"(\d{1,6}) ", buf)
                    if not m or len(buf) < m.end() + int(m.group(1)):
                        break
                    frame = buf[m.end():m.end() + int(m.group(1))]
                    buf = buf[m.end() + int(m.group(1)):]
                    with self.cond:
                        self.raw.append(frame)
                        self.messages.append(parse_syslog(frame))
                        self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 5) -> list[dict[str, Any]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.messages) >= n, timeout), self.messages
            return list(self.messages)

    def drop_connections(self) -> None:
        """Close the accepted connections (a receiver restart, an idle timeout)."""
        for conn in self.open:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.open.clear()

    def close(self) -> None:
        self.drop_connections()
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.server.close()


def _recv(conn: socket.socket) -> bytes:
    try:
        return conn.recv(65536)
    except OSError:
        return b""


@contextmanager
def running(receiver: HttpReceiver) -> Iterator[HttpReceiver]:
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
