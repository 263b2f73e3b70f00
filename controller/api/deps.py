"""Request dependencies: the agent and bearer-token roles."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status


def get_agent(request: Request) -> Any:
    return request.app.state.agent


def _role(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
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


def require_reader(request: Request) -> str:
    role = _role(request)
    if role is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return role


def require_admin(role: Annotated[str, Depends(require_reader)]) -> str:
    if role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin token required")
    return role


AgentDep = Annotated[Any, Depends(get_agent)]
ReaderDep = Annotated[str, Depends(require_reader)]
AdminDep = Annotated[str, Depends(require_admin)]
