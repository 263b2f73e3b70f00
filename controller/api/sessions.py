"""Browser sessions for the dashboard.

A browser cannot put `Authorization: Bearer` on a page navigation or on the
<script> and <link> loads of the page's assets, so the dashboard signs in once
(POST /v1/session with the token) and gets a cookie. Why this shape:

- The cookie holds a random session id, never the token: cookies are not
  isolated by port, so every other service on the same host name receives it.
  An id is worthless once the agent restarts or the session is dropped.
- HttpOnly: the page's scripts never see the id or the token (unlike a token
  kept in sessionStorage), so an injected script cannot carry it away.
- SameSite=Strict: no other site's page, link or form makes the browser send it.
  Same-site is not same-origin (other ports of the host are same-site), so a
  state-changing request authenticated by the cookie must also carry an Origin
  header naming this very origin (deps.require_reader).
- Never in a URL: query strings end up in logs, history and Referer headers.
"""

from __future__ import annotations

import secrets
import threading
import time
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

COOKIE = "lt_session"
TTL_S = 12 * 3600
MAX_SESSIONS = 1024  # per role: a flood of reader sign-ins never evicts an admin's session
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class SessionStore:
    """Session id -> (role, expiry), in memory: a restart signs every browser out.

    Each role has its own `max_sessions`; beyond it the oldest session of that role
    goes, so whoever holds a reader token can only push out readers."""

    def __init__(self, ttl_s: float = TTL_S, max_sessions: int = MAX_SESSIONS) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._sessions: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def create(self, role: str) -> str:
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            for old in [s for s, (_, exp) in self._sessions.items() if exp <= now]:
                del self._sessions[old]
            same_role = [s for s, (r, _) in self._sessions.items() if r == role]  # oldest first
            for old in same_role[: max(0, len(same_role) - self.max_sessions + 1)]:
                del self._sessions[old]
            self._sessions[sid] = (role, now + self.ttl_s)
        return sid

    def role(self, sid: str) -> str | None:
        with self._lock:
            entry = self._sessions.get(sid)
            if entry is None or entry[1] <= time.monotonic():
                self._sessions.pop(sid, None)
                return None
            return entry[0]

    def drop(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)


def same_origin(conn: HTTPConnection) -> bool:
    """The request's Origin header names the origin it was sent to."""
    origin = conn.headers.get("origin")
    if not origin:
        return False
    parts = urlsplit(origin)
    return parts.scheme == conn.url.scheme and parts.netloc == conn.headers.get("host")
