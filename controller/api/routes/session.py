"""Who the caller is, and the dashboard's browser sessions (see sessions.py)."""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import RedirectResponse

from leaktap.controller.api import sessions
from leaktap.controller.api.deps import ReaderDep, token_role
from leaktap.controller.api.routes.ui import login_response

router = APIRouter(prefix="/v1", tags=["session"])

MAX_FORM_BYTES = 4096
FORM = "application/x-www-form-urlencoded"


@router.get("/whoami")
def read_whoami(role: ReaderDep) -> dict[str, str]:
    """The caller's role: reader or admin (the dashboard shows admin actions by it)."""
    return {"role": role}


@router.post("/session", include_in_schema=False)
async def create_session(request: Request) -> Response:
    """Sign a browser in: the token from the sign-in form (or a bearer header) buys a
    session cookie. The form gets a redirect to / or the form again with an error."""
    origin = request.headers.get("origin")
    if origin is not None and not sessions.same_origin(request):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-origin request refused")
    from_form = request.headers.get("content-type", "").split(";")[0].strip() == FORM
    token = ""
    if from_form:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, "form too large")
        token = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0].strip()
    else:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token if scheme.lower() == "bearer" else ""
    role = token_role(request, token) if token else None
    if role is None:
        if from_form:
            page: Response = login_response("invalid")
            return page
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    response: Response = (
        RedirectResponse("/", status.HTTP_303_SEE_OTHER) if from_form
        else Response(status_code=status.HTTP_204_NO_CONTENT)
    )
    response.set_cookie(
        sessions.COOKIE, request.app.state.sessions.create(role), max_age=sessions.TTL_S,
        path="/", secure=request.url.scheme == "https", httponly=True, samesite="strict",
    )
    return response


@router.delete("/session", include_in_schema=False, status_code=status.HTTP_204_NO_CONTENT)
def delete_session(request: Request, _: ReaderDep) -> Response:
    """Sign out: the session ends here, whatever the browser keeps."""
    sid = request.cookies.get(sessions.COOKIE)
    if sid:
        request.app.state.sessions.drop(sid)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.delete_cookie(sessions.COOKIE, path="/", httponly=True, samesite="strict")
    return response
