"""The review page's login: a reviewer (or admin) key in, a signed session cookie out.

    POST /v1/session/login   {"key": "vr_..."} -> the session, and Set-Cookie: vr_session=...
    GET  /v1/session         the current caller (and the CSRF token when it came by cookie)
    POST /v1/session/logout  deletes the cookie

The cookie is HttpOnly, SameSite=Strict, Secure over https, and expires after
``security.session.ttl_s``; the middleware (router/http/auth.py) accepts it on the review
routes only, and a POST made with it needs the ``x-csrf-token`` header. API clients keep
sending ``x-api-key`` and never need any of this.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from router.auth.keys import Authenticator
from router.auth.principal import Principal, current_principal, current_session
from router.auth.sessions import CSRF_HEADER, Session
from router.http.auth import (
    check_same_origin,
    cleared_session_cookie,
    client_address,
    is_https,
    session_cookie,
)
from router.http.deps import current_authenticator
from router.http.inputs import parsed, read_body_limited

router = APIRouter(prefix="/v1/session", tags=["session"])
MAX_LOGIN_BODY_BYTES = 4096


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(..., min_length=1, max_length=512, description="a reviewer's or admin's API key")


def _authenticator() -> Authenticator:
    return current_authenticator()


def _headers(request: Request) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope.get("headers", [])]


def session_body(principal: Principal | None, session: Session | None) -> dict[str, Any]:
    """What the page needs: who it acts as, and the CSRF token for its POSTs."""
    if principal is None:
        return {"auth": False, "reviewer": None, "csrf_token": None}
    from router.services.review import reviewer_identity

    return {
        "auth": True,
        "reviewer": reviewer_identity(principal),
        "name": principal.name,
        "key_id": principal.key_id,
        "tenant": principal.tenant,
        "role": principal.role,
        "via": "session" if session is not None else "api_key",
        "csrf_token": session.csrf_token if session is not None else None,
        "csrf_header": CSRF_HEADER,
        "expires_at": session.expires_at if session is not None else None,
    }


@router.post(
    "/login",
    summary="Log the review page in with a reviewer's or admin's key",
    openapi_extra={
        "requestBody": {"content": {"application/json": {"schema": LoginRequest.model_json_schema()}}}
    },
)
async def login(request: Request) -> JSONResponse:
    """JSON ``{"key": "..."}``. Answers the session (who, tenant, role, ``csrf_token``) and sets
    the cookie; a client's key is 403, a wrong key 401 (and counts towards the lockout)."""
    authenticator = _authenticator()
    headers, trusted = _headers(request), authenticator.config.trusted_proxies
    check_same_origin(request.scope, headers, trusted)
    body = parsed(LoginRequest, await read_body_limited(request, MAX_LOGIN_BODY_BYTES))
    principal, token, session = authenticator.login(
        body.key, client=client_address(request.scope, headers, trusted)
    )
    secure = authenticator.config.session.cookie_secure == "always" or is_https(
        request.scope, headers, trusted
    )
    response = JSONResponse(session_body(principal, session), headers={"Cache-Control": "no-store"})
    response.headers["set-cookie"] = session_cookie(
        token, max_age_s=authenticator.config.session.ttl_s, secure=secure
    )
    return response


@router.get("", summary="Who the page (or key) is logged in as, and its CSRF token")
async def whoami() -> JSONResponse:
    return JSONResponse(
        session_body(current_principal(), current_session()), headers={"Cache-Control": "no-store"}
    )


@router.post("/logout", summary="Delete the session cookie")
async def logout(request: Request) -> JSONResponse:
    authenticator = _authenticator()
    headers, trusted = _headers(request), authenticator.config.trusted_proxies
    check_same_origin(request.scope, headers, trusted)
    response = JSONResponse({"logged_out": True})
    response.headers["set-cookie"] = cleared_session_cookie(is_https(request.scope, headers, trusted))
    return response
