"""RFC 5424 syslog over UDP (RFC 5426) or TCP (RFC 6587 octet counting), CEF body.

CEF escaping: in the header `\\` and `|` are escaped; in extension values `\\`, `=`
and line breaks (as `\\n`, `\\r`). Extension keys are fixed here, never user data.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import threading
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from leaktap.analytics.sinks.base import (
    AlertEvent,
    RetryableDelivery,
    SinkSettings,
    destination_of,
    iso8601,
)

FACILITIES = {
    "kern": 0, "user": 1, "daemon": 3, "auth": 4, "syslog": 5, "authpriv": 10, "audit": 13,
    **{f"local{i}": 16 + i for i in range(8)},
}
# leaktap severity -> (syslog severity, CEF severity 0-10)
SEVERITY = {"critical": (2, 10), "high": (3, 8), "medium": (4, 5), "low": (5, 3), "info": (6, 1)}
VENDOR, PRODUCT, VERSION = "leaktap", "leaktap", "0.1.0"
NAME_MAX = 512  # CEF Name is meant to be short; ArcSight truncates at 512


def _parse_address(value: str) -> tuple[str, str, int]:
    m = re.fullmatch(r"(udp|tcp)://(\[[0-9A-Fa-f:.]+\]|[^:/\[\]]+):(\d{1,5})", value)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise ValueError(f"expected udp://HOST:PORT or tcp://HOST:PORT, got {value!r}")
    return m.group(1), m.group(2).strip("[]"), int(m.group(3))


def _check_address(value: str) -> str:
    _parse_address(value)
    return value


class SyslogSettings(SinkSettings):
    type: Literal["syslog"]
    address: Annotated[str, AfterValidator(_check_address)]
    format: Literal["cef"] = "cef"
    facility: Literal[tuple(FACILITIES)] = "authpriv"  # type: ignore[valid-type]
    app_name: Annotated[str, Field(pattern=r"^[!-~]{1,48}$")] = "leaktap"
    hostname: Annotated[str, Field(pattern=r"^[!-~]{1,255}$")] | None = None
    # beyond this the evidence is left out of the message (UDP receivers cut long datagrams)
    max_message_bytes: Annotated[int, Field(ge=480, le=65000)] = 8192


def cef_header(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return re.sub(r"[\r\n]+", " ", text)


def cef_value(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace("=", "\\=")
    return text.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\r")


def cef_message(event: AlertEvent, host: str, with_evidence: bool = True) -> str:
    alert = event.alert
    _, cef_severity = SEVERITY.get(alert["severity"], (3, 8))
    vendor, instance = alert.get("crm_vendor"), alert.get("crm_instance")
    ext: list[tuple[str, Any]] = [
        ("rt", int(event.ts * 1000)),
        ("act", event.action),
        ("cat", alert["kind"]),
        ("externalId", alert["id"]),
        ("dvchost", host),
        ("suser", event.actor),
        ("start", int(alert["first_seen"] * 1000)),
        ("end", int(alert["last_seen"] * 1000)),
        ("cnt", alert.get("count", 1)),
        ("dhost", destination_of(alert)),
        ("msg", alert["summary"]),
        ("cs1Label", "tenant"), ("cs1", alert["tenant"]),
        ("cs2Label", "dedupKey"), ("cs2", alert["dedup_key"]),
        ("cs3Label", "crmInstance"), ("cs3", f"{vendor}:{instance}" if vendor else ""),
        ("cs4Label", "status"), ("cs4", alert.get("status", "")),
        ("cs5Label", "environment"), ("cs5", alert.get("environment") or ""),
    ]
    if with_evidence:
        evidence = json.dumps(alert.get("evidence", {}), separators=(",", ":"), sort_keys=True)
        ext += [("cs6Label", "evidence"), ("cs6", evidence)]
    header = "|".join(
        cef_header(v) for v in (
            "CEF:0", VENDOR, PRODUCT, VERSION, alert["kind"],
            str(alert["summary"])[:NAME_MAX], cef_severity,
        )
    )
    return header + "|" + " ".join(f"{k}={cef_value(v)}" for k, v in ext)


def _peer_closed(sock: socket.socket) -> bool:
    """True when the receiver closed or reset the connection (it never sends data)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class SyslogSink:
    def __init__(self, settings: SyslogSettings) -> None:
        self.name = settings.sink_name
        self.transport, self.host, self.port = _parse_address(settings.address)
        self.facility = FACILITIES[settings.facility]
        self.app_name = settings.app_name
        self.hostname = settings.hostname or (socket.gethostname() or "-")[:255]
        self.max_bytes = settings.max_message_bytes
        self.timeout_s = settings.timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def format(self, event: AlertEvent) -> bytes:
        syslog_severity, _ = SEVERITY.get(event.alert["severity"], (3, 8))
        head = (
            f"<{self.facility * 8 + syslog_severity}>1 {iso8601(event.ts)} {self.hostname} "
            f"{self.app_name} {os.getpid()} {event.action} - "
        ).encode()
        line = head + cef_message(event, self.hostname).encode()
        if len(line) > self.max_bytes:
            line = head + cef_message(event, self.hostname, with_evidence=False).encode()
        return line[: self.max_bytes]

    def _connect(self) -> socket.socket:
        family = socket.getaddrinfo(self.host, self.port)[0][0]
        if self.transport == "udp":
            return socket.socket(family, socket.SOCK_DGRAM)
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def send(self, event: AlertEvent) -> None:
        message = self.format(event)
        with self._lock:
            try:
                if self._sock is not None and self.transport == "tcp" and _peer_closed(self._sock):
                    # a write into a connection the receiver closed would "succeed" and be lost
                    self._close()
                if self._sock is None:
                    self._sock = self._connect()
                if self.transport == "udp":
                    self._sock.sendto(message, (self.host, self.port))
                else:
                    self._sock.sendall(b"%d " % len(message) + message)
            except OSError as e:
                self._close()
                raise RetryableDelivery(f"{self.transport}://{self.host}:{self.port}: {e}") from e

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()
