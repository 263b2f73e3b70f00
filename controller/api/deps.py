"""Request dependencies: the agent and the caller's role (bearer token or session).

They are `async` although they never await: FastAPI runs a plain `def`
dependency in the thread pool, a hop per dependency per request.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Response, status
from pydantic import BaseModel, TypeAdapter
from starlette.requests import HTTPConnection

from leaktap.controller.api import sessions


async def get_agent(request: Request) -> Any:
    return request.app.state.agent


def token_role(request: HTTPConnection, token: str) -> str | None:
    """The role of a bearer token, or None."""
    # compare with every token in constant time; never log them
    role = None
    for candidate in request.app.state.admin_tokens:
        if hmac.compare_digest(candidate.encode(), token.encode()):
            role = "admin"
    if role is None:
        for candidate in request.app.state.reader_tokens:
            if hmac.compare_digest(candidate.encode(), token.encode()):
                role = "reader"
    return role


def credential_role(conn: HTTPConnection) -> str | None:
    """The role of the request head's credentials (bearer token, else the dashboard's
    session cookie, see sessions.py for why a cookie), or None. Reads no body: the
    API's guard (guard.py) calls it before any body is read."""
    header = conn.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        return token_role(conn, token)
    sid = conn.cookies.get(sessions.COOKIE)
    role: str | None = conn.app.state.sessions.role(sid) if sid else None
    return role


def request_role(request: Request) -> str | None:
    """The caller's role from its bearer token, else from its dashboard session."""
    role = credential_role(request)
    from_cookie = request.headers.get("authorization") is None
    if role is not None and from_cookie and request.method not in sessions.SAFE_METHODS:
        if not sessions.same_origin(request):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-origin request refused")
    return role


async def require_reader(request: Request) -> str:
    role = request_role(request)
    if role is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return role


async def require_admin(role: Annotated[str, Depends(require_reader)]) -> str:
    if role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin token required")
    return role


AgentDep = Annotated[Any, Depends(get_agent)]
ReaderDep = Annotated[str, Depends(require_reader)]
AdminDep = Annotated[str, Depends(require_admin)]


_ANY = TypeAdapter(Any)


def json_response(content: Any) -> Response:
    """Serialize in pydantic-core: several times faster than FastAPI's default
    path (validate, convert to Python, json.dumps) on pages of rows."""
    body = content.model_dump_json() if isinstance(content, BaseModel) else _ANY.dump_json(content)
    return Response(body, media_type="application/json")
