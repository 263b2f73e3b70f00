"""The dashboard: GET / and its assets under /ui/, shipped in the package (no CDN).

Both need a reader: a browser authenticates with its session cookie (see
sessions.py), a script with its bearer token. Without either, / answers 401
with the sign-in form, which holds nothing about the node.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import FileResponse, HTMLResponse

from leaktap.controller.api import sessions
from leaktap.controller.api.deps import ReaderDep, request_role

router = APIRouter(tags=["ui"], include_in_schema=False)

UI_DIR = Path(__file__).resolve().parents[2] / "ui"
_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# every shipped asset by its URL path: nothing else under /ui/ is served
ASSETS = {
    p.relative_to(UI_DIR).as_posix(): p
    for p in sorted(UI_DIR.rglob("*")) if p.is_file() and p.suffix in _TYPES
}

_LOGIN = (UI_DIR / "login.html").read_text()
_LOGIN_STYLE = re.search(r"<style>(.*?)</style>", _LOGIN, re.S)
assert _LOGIN_STYLE is not None, "login.html carries its own <style>"
_STYLE_HASH = base64.b64encode(hashlib.sha256(_LOGIN_STYLE.group(1).encode()).digest()).decode()

# Scripts and styles from this origin only; the sign-in page's one inline <style> by its
# hash (its stylesheet would need a session). No frames, no foreign connections.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'sha256-{style}'; "
        "img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": _CSP.format(style=_STYLE_HASH),
    "X-Content-Type-Options": "nosniff",
    # not no-referrer: with it a form post carries `Origin: null`, which the session refuses
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_ERRORS = {"invalid": "That token is not valid.", "expired": "Your session has ended."}


def login_response(error: str | None = None) -> HTMLResponse:
    """401 with the sign-in form; `error` is a key of _ERRORS (never echoed input)."""
    message = f'<p class="error" role="alert">{_ERRORS[error]}</p>' if error else ""
    return HTMLResponse(
        _LOGIN.replace("<!--error-->", message), status.HTTP_401_UNAUTHORIZED,
        headers={**HEADERS, "WWW-Authenticate": "Bearer"},
    )


@router.get("/")
def read_dashboard(request: Request) -> Response:
    if request_role(request) is None:
        return login_response("expired" if request.cookies.get(sessions.COOKIE) else None)
    return FileResponse(UI_DIR / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/ui/{name:path}")
def read_asset(name: str, _: ReaderDep) -> Response:
    path = ASSETS.get(name)
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such asset")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=HEADERS)
