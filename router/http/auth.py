"""The HTTP side of authentication: which route needs which role, the API-key / session-cookie
middleware, cookies, CSRF and same-origin checks, and the caller's address behind proxies.

A browser (the review page) logs in: it POSTs a reviewer or admin key to ``/v1/session/login``
(router/http/session.py) and gets a signed session cookie (router/auth/sessions.py) that the
middleware accepts on the review routes only; a POST made with the cookie needs the
``x-csrf-token`` header and a same-origin ``Origin``. Every key check goes through the
transport-free ``Authenticator`` (router/auth/keys.py). Routes not listed in ``ROUTE_ROLES``
need ``admin``: deny by default, so a route someone adds later is never public by accident.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from router.auth.keys import Authenticator, key_from_headers
from router.auth.principal import Principal, Role, reset_principal, reset_session, set_principal, set_session
from router.auth.sessions import CSRF_HEADER, SESSION_COOKIE, Session
from router.errors import error_body, http_status, retry_after_s
from router.serve_context import host_of, serve_client_address
from visionroute.errors import PermissionDenied, RouterError, Unauthenticated

PUBLIC_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
        "/v1/session/login",  # the key is in the body; checked by the route
        "/v1/session/logout",
    }
)
# (path prefix, least role), first match wins; anything else needs admin.
ROUTE_ROLES: tuple[tuple[str, Role], ...] = (
    ("/v1/analyze", "client"),
    ("/v1/search", "client"),
    ("/v1/models", "client"),  # model cards: what answers a client's requests, and its limits
    ("/v1/review/reviewers", "admin"),  # reviewers' error rates judge people: admins only
    ("/v1/review", "reviewer"),
    ("/v1/session", "reviewer"),
    ("/review", "reviewer"),
)
# The review page's static files: served without credentials (they hold no data, and the
# page shows its login form); a key or session that *is* presented must still be a reviewer's.
LOGIN_PAGE_PATHS = frozenset({"/review", "/review/review.html", "/review/review.js"})
# Where a session cookie is accepted; anywhere else a caller needs its key.
SESSION_PREFIXES = ("/v1/review", "/v1/session", "/review")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def required_role(path: str) -> Role | None:
    if path in PUBLIC_PATHS:
        return None
    return next(
        (role for prefix, role in ROUTE_ROLES if path == prefix or path.startswith(prefix + "/")), "admin"
    )


def header_value(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of header ``name`` (lower-case), or None."""
    return next((value for key, value in headers if key.lower() == name), None)


def _is_trusted(address: str, trusted: list) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def client_address(scope: dict, headers: list[tuple[str, str]], trusted_proxies: list) -> str:
    """The address a request came from: the peer, or, when the peer is a trusted proxy, the
    last address in X-Forwarded-For that is not one of the trusted proxies."""
    peer = scope.get("client")
    address = host_of(str(peer[0])) if peer else serve_client_address()
    if trusted_proxies and _is_trusted(address, trusted_proxies):
        hops = [
            hop.strip()
            for key, value in headers
            if key.lower() == "x-forwarded-for"
            for hop in value.split(",")
        ]
        hops = [hop for hop in hops if hop]
        untrusted = [hop for hop in hops if not _is_trusted(hop, trusted_proxies)]
        if untrusted or hops:
            return (untrusted or hops)[-1]
    return address or "unknown"


def _forwarded(scope: dict, headers: list[tuple[str, str]], trusted_proxies: list, name: str) -> str | None:
    peer = scope.get("client")
    if not (peer and trusted_proxies and _is_trusted(host_of(str(peer[0])), trusted_proxies)):
        return None
    value = header_value(headers, name)
    return value.split(",")[0].strip() if value else None


def is_https(scope: dict, headers: list[tuple[str, str]], trusted_proxies: list) -> bool:
    forwarded = _forwarded(scope, headers, trusted_proxies, "x-forwarded-proto")
    return scope.get("scheme") in ("https", "wss") or (forwarded or "").lower() == "https"


def check_same_origin(scope: dict, headers: list[tuple[str, str]], trusted_proxies: list) -> None:
    """Refuse a browser request sent from another site (the CSRF check besides the token)."""
    if (header_value(headers, "sec-fetch-site") or "").lower() == "cross-site":
        raise PermissionDenied("cross-site request refused (Sec-Fetch-Site: cross-site)", field="origin")
    origin = header_value(headers, "origin")
    if origin is None:
        return
    host = _forwarded(scope, headers, trusted_proxies, "x-forwarded-host") or header_value(headers, "host")
    if origin == "null" or not host or urlsplit(origin).netloc.lower() != host.lower():
        raise PermissionDenied(
            f"cross-origin request refused: Origin {origin!r} is not this service ({host!r})", field="origin"
        )


def session_from_cookies(headers: Iterable[tuple[str, str]]) -> str | None:
    """The session cookie's value from the Cookie header(s), or None."""
    for key, value in headers:
        if key.lower() != "cookie":
            continue
        for part in value.split(";"):
            name, _, cookie = part.strip().partition("=")
            if name == SESSION_COOKIE and cookie:
                return cookie.strip().strip('"')
    return None


def session_cookie(token: str, *, max_age_s: float, secure: bool) -> str:
    """A Set-Cookie value: HttpOnly, SameSite=Strict, expiring; Secure over https."""
    parts = [f"{SESSION_COOKIE}={token}", "Path=/", f"Max-Age={max(0, int(max_age_s))}", "HttpOnly"]
    parts.append("SameSite=Strict")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def cleared_session_cookie(secure: bool = False) -> str:
    return session_cookie("", max_age_s=0, secure=secure)


class ApiKeyMiddleware:
    """Pure ASGI middleware (same task as the endpoint, so the contextvars reach it).

    ``authenticator`` is a function that returns the process's current authenticator: Ray
    Serve serves a frozen copy of the FastAPI app, so the keys cannot live on the app object.

    A request is the caller of its API key when it sends one; else, on the review routes
    (``SESSION_PREFIXES``), of its session cookie, and then a POST needs the CSRF token and a
    same-origin Origin; else anonymous (public paths and the login page only)."""

    def __init__(self, app: Any, authenticator: Any) -> None:
        self.app = app
        self.current_authenticator = authenticator

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        try:
            principal, session = self._caller(scope, headers)
        except RouterError as error:
            dead_cookie = isinstance(error, Unauthenticated) and error.field == "session"
            await self._refuse(send, error, headers, clear_cookie=dead_cookie)  # the answer deletes it
            return
        token = set_principal(principal)
        session_token = set_session(session)
        try:
            await self.app(scope, receive, send)
        finally:
            reset_session(session_token)
            reset_principal(token)

    def _caller(self, scope: dict, headers: list[tuple[str, str]]) -> tuple[Principal | None, Session | None]:
        auth: Authenticator = self.current_authenticator()
        path, method = scope["path"], scope.get("method", "GET").upper()
        required = required_role(path)
        key = key_from_headers(headers)
        trusted = auth.config.trusted_proxies
        client = client_address(scope, headers, trusted) if auth.enabled else "unknown"
        if key is not None or required is None or not auth.enabled:
            return auth.authenticate(key, required, client=client), None
        if path in LOGIN_PAGE_PATHS and method in SAFE_METHODS:
            return None, None  # the page itself, even with a dead cookie: it asks for a login
        cookie = session_from_cookies(headers) if path.startswith(SESSION_PREFIXES) else None
        if cookie is None:
            return auth.authenticate(None, required, client=client), None
        principal, session = auth.authenticate_session(cookie, required, client=client)
        if method not in SAFE_METHODS:
            check_same_origin(scope, headers, trusted)
            if not auth.sessions.check_csrf(session, header_value(headers, CSRF_HEADER)):
                raise PermissionDenied(
                    f"a request made with the session cookie needs the {CSRF_HEADER!r} header: the "
                    "csrf_token from POST /v1/session/login or GET /v1/session",
                    field=CSRF_HEADER,
                )
        return principal, session

    @staticmethod
    async def _refuse(
        send: Any, error: RouterError, headers: list[tuple[str, str]], clear_cookie: bool
    ) -> None:
        status = http_status(error)
        body = json.dumps(error_body(error, header_value(headers, "x-request-id"))).encode()
        extra = [(b"www-authenticate", b"ApiKey")] if status == 401 else []
        wait = retry_after_s(error)
        if wait is not None:
            extra.append((b"retry-after", str(wait).encode()))
        if clear_cookie:
            extra.append((b"set-cookie", cleared_session_cookie().encode()))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), *extra],
            }
        )
        await send({"type": "http.response.body", "body": body})
