"""The API's outermost gate: who may send a body, and how much of one.

FastAPI reads and parses a request body before it runs the route's auth
dependency, and `request.body()` keeps the whole body in memory, so before
this gate four unauthenticated 256 MB uploads took the agent from 273 MB to
2.2 GB. This pure ASGI middleware runs before any of that:

- a request without a valid bearer token or session cookie is answered 401
  before a byte of its body is read, unless its path is public (PUBLIC_PATHS);
- every body has a cap (`body_limit`): a declared Content-Length above it is
  answered 413 up front, a streamed body is counted while it is read and
  answered 413 as soon as it passes the cap;
- the accepted body (at most the cap) is handed to the app from memory.

Refusals carry `Connection: close`, so the server drops the connection instead
of draining the rest of an upload it will never use; a body that takes longer
than BODY_TIMEOUT_S is refused 408. Connection count, head size and head time
are bounded by the server (agent.api_server, connections.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Bodies of authenticated requests: the largest route body (a canary record or an
# alert note) is well under 1 KiB.
BODY_MAX = 8192
# The sign-in form: a token and nothing else (the same limit the route checks).
SESSION_FORM_MAX = 4096
# A fingerprint set's export uploaded by an admin (POST /v1/fingerprints): ~500,000
# contact rows; larger exports are built on the host with `leaktap fingerprint add`.
FINGERPRINT_UPLOAD_MAX = 64 << 20
# Methods whose requests carry no body in this API.
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
# Reachable without credentials: liveness, the sign-in page, the sign-in itself.
PUBLIC_PATHS = frozenset({"/healthz", "/", "/v1/session"})
# A body of a few KiB trickled slower than this holds a connection slot: 408.
BODY_TIMEOUT_S = 10.0

RoleOf = Callable[[HTTPConnection], "str | None"]


def body_limit(method: str, path: str, role: str | None = None) -> int:
    """Most body bytes a request to `method path` by `role` may carry."""
    if method == "POST" and path == "/v1/session":
        return SESSION_FORM_MAX
    if method == "POST" and path == "/v1/fingerprints" and role == "admin":
        return FINGERPRINT_UPLOAD_MAX
    if method in BODYLESS_METHODS or path in PUBLIC_PATHS:
        return 0
    return BODY_MAX


class _TooLarge(Exception):
    pass


class RequestGuard:
    """ASGI middleware: authenticate before reading, cap every body.

    `role_of` returns the caller's role from the request head (bearer token or
    session cookie), or None; it must not read the body.
    """

    def __init__(self, app: ASGIApp, role_of: RoleOf) -> None:
        self.app = app
        self.role_of = role_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        role = None if path in PUBLIC_PATHS else self.role_of(HTTPConnection(scope))
        if path not in PUBLIC_PATHS and role is None:
            await _refuse(send, 401, "missing or invalid bearer token",
                          [(b"www-authenticate", b"Bearer")])
            return
        limit = body_limit(method, path, role)
        declared = _content_length(scope)
        if declared == -1:
            await _refuse(send, 400, "invalid Content-Length")
            return
        if declared is not None and declared > limit:
            await _refuse(send, 413, f"request body over {limit} bytes")
            return
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                body = await _read_body(receive, limit)
        except _TooLarge:
            await _refuse(send, 413, f"request body over {limit} bytes")
            return
        except TimeoutError:
            await _refuse(send, 408, f"request body not received within {BODY_TIMEOUT_S:g} s")
            return
        if body is None:  # the client went away
            return
        await self.app(scope, _replay(body, receive), send)


def _content_length(scope: Scope) -> int | None:
    """The declared body length, None without one, -1 when it is not a number."""
    values = [v for k, v in scope["headers"] if k == b"content-length"]
    if not values:
        return None
    if len(set(values)) != 1 or not values[0].isdigit() or len(values[0]) > 18:
        return -1
    return int(values[0])


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, reading no more than `limit` + one message of it."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the body read ahead once, then the server's own
    (which reports the disconnect the app may wait for)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _refuse(send: Send, status: int, detail: str,
                  extra: list[tuple[bytes, bytes]] | None = None) -> None:
    content = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (b"connection", b"close"),
            *(extra or []),
        ],
    })
    await send({"type": "http.response.body", "body": content, "more_body": False})
