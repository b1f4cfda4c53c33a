"""API keys per tenant, roles, tenant scoping, and the refusal to serve publicly without keys.

Keys are stored as SHA-256 hex digests only (``security.api_keys[].sha256`` in the config):
API keys are 32 random bytes, so a fast hash is enough, unlike passwords; the plain key is
shown once by ``visionroute keys new`` and never stored, logged or put in a trace.

Roles are ranked: ``client`` (analyse, search) < ``reviewer`` (+ review queue and page) <
``admin`` (+ everything else: metrics, reconfigure, any tenant). Routes not listed below need
``admin``: deny by default, so a route someone adds later is never public by accident.

Without any key configured, auth is off (local development) and every caller may name any
tenant; then ``check_bind`` refuses to serve on a non-loopback address unless
``security.allow_insecure_bind`` says so explicitly.

A browser (the review page) logs in instead: it POSTs a reviewer or admin key to
``/v1/session/login`` (router/http_session.py) and gets a signed session cookie
(router/sessions.py) that the middleware accepts on the review routes only; a POST made with
the cookie needs the ``x-csrf-token`` header and a same-origin ``Origin``. Every key check,
by header, gRPC metadata or cookie, goes through ``Authenticator``, which also applies the
per-key rate limit and the per-address lockout (router/auth_limits.py).
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, model_validator

from router.auth_limits import KeyRateLimiter, Lockout, LockoutConfig, RateLimitConfig
from router.sessions import (
    CSRF_HEADER,
    KID_HEX,
    SESSION_COOKIE,
    InvalidSession,
    Session,
    SessionConfig,
    SessionSigner,
)
from visionroute.errors import ConfigError, InputError, PermissionDenied, RouterError, Unauthenticated

log = logging.getLogger("visionroute.security")

Role = Literal["client", "reviewer", "admin"]
ROLE_RANK: dict[str, int] = {"client": 1, "reviewer": 2, "admin": 3}
API_KEY_HEADER = "x-api-key"
TENANT_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"

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
SESSION_ROLES = ("reviewer", "admin")
# gRPC methods of router/proto/visionroute.proto and grpc.health.v1.
GRPC_ROLES: dict[str, Role | None] = {
    "Analyze": "client",
    "Search": "client",
    "ListReviewItems": "reviewer",
    "GetReviewItem": "reviewer",
    "ClaimReviewItem": "reviewer",
    "LabelReviewItem": "reviewer",
    "ReleaseReviewItem": "reviewer",
    "GetReviewImage": "reviewer",
    "GetReviewAudit": "reviewer",
    "GetReviewLabels": "reviewer",
    "GetReviewStats": "reviewer",
    "IndexSearchItem": "client",
    "GetSearchItem": "client",
    "DeleteSearchItem": "client",
    "GetSearchStats": "client",
    "GetPolicy": "admin",
    "Check": None,
    "Watch": None,
}


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(
        ..., pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key; never the key itself"
    )
    tenant: str = Field(..., pattern=TENANT_PATTERN)
    role: Role = "client"
    name: str = Field("", max_length=128, description="who holds it (for audit logs)")
    rate_limit: RateLimitConfig | None = Field(
        None, description="this key's own limit; default: security.rate_limit"
    )


class SecurityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_keys: list[ApiKey] = Field(default_factory=list)
    allow_insecure_bind: bool = Field(
        False,
        description="serve on a non-loopback address (or gRPC, which listens on all interfaces) without keys",
    )
    session: SessionConfig = Field(
        default_factory=SessionConfig, description="the review page's login sessions (signed cookies)"
    )
    rate_limit: RateLimitConfig | None = Field(
        default_factory=RateLimitConfig,
        description="per-key token bucket, per ingress replica; null: no limit",
    )
    lockout: LockoutConfig | None = Field(
        default_factory=LockoutConfig,
        description="lock out an address after repeated failed authentications, per replica; null: off",
    )
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="reverse proxies whose X-Forwarded-For / X-Forwarded-Proto / X-Forwarded-Host are believed",
    )

    @model_validator(mode="after")
    def _unique_keys(self) -> SecurityConfig:
        digests = [k.sha256 for k in self.api_keys]
        if len(digests) != len(set(digests)):
            raise ValueError("security.api_keys lists the same key twice")
        if len({d[:KID_HEX] for d in digests}) != len(digests):
            raise ValueError(f"two security.api_keys share the first {KID_HEX} hex digits of their sha256")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(plain key to hand out once, its sha256 for the config)."""
    key = "vr_" + secrets.token_urlsafe(32)
    return key, hash_key(key)


@dataclass(frozen=True)
class Principal:
    tenant: str
    role: str
    name: str
    key_id: str = ""  # the first 12 hex of the key's sha256: names a key whose name is empty
    # The key's whole digest (rate limits, sessions); "" when built by hand, as in tests.
    key_sha256: str = field(default="", repr=False, compare=False)

    def allows(self, role: str | None) -> bool:
        return role is None or ROLE_RANK[self.role] >= ROLE_RANK[role]


# The caller of the current request; None while auth is off. Set by the HTTP middleware or
# the gRPC endpoint wrapper; handlers read it through resolve_tenant / tenant_scope.
_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "visionroute_principal", default=None
)


_session: contextvars.ContextVar[Session | None] = contextvars.ContextVar("visionroute_session", default=None)


class Authenticator:
    """Every credential check: API keys (header or gRPC metadata), session cookies, the
    per-key rate limit and the per-address lockout; one per ingress replica."""

    def __init__(
        self,
        config: SecurityConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        session_secret: bytes | None = None,
    ) -> None:
        self.config = config
        self.enabled = config.enabled
        self._by_digest = {
            k.sha256: Principal(k.tenant, k.role, k.name, k.sha256[:12], k.sha256) for k in config.api_keys
        }
        self._limits = {
            k.sha256: k.rate_limit if k.rate_limit is not None else config.rate_limit for k in config.api_keys
        }
        self._by_kid = {k.sha256[:KID_HEX]: k.sha256 for k in config.api_keys}
        self.sessions = SessionSigner(config.session, session_secret)
        self.rate_limiter = KeyRateLimiter(clock)
        self.lockout = Lockout(config.lockout, clock)

    def authenticate(
        self, presented: str | None, required: str | None, *, client: str | None = None
    ) -> Principal | None:
        """The caller for ``presented`` (a key), or raise; None when auth is off.

        ``client``: the caller's address for the lockout; by default the one Ray Serve
        recorded for the current request (so the gRPC face needs to pass nothing)."""
        if not self.enabled:
            return None
        if not presented:
            if required is None:
                return None
            raise Unauthenticated(
                f"an API key is required: send it in the {API_KEY_HEADER!r} header (gRPC metadata) "
                "or as 'Authorization: Bearer <key>'",
                field=API_KEY_HEADER,
            )
        address = client if client is not None else serve_client_address()
        self.lockout.check(address)
        principal = self._by_digest.get(hash_key(presented))
        if principal is None:
            self.lockout.failed(address)
            raise Unauthenticated("the API key matches no configured key", field=API_KEY_HEADER)
        return self._admit(principal, required)

    def _admit(self, principal: Principal, required: str | None) -> Principal:
        self.rate_limiter.take(
            principal.key_sha256,
            self._limits[principal.key_sha256],
            who=repr(principal.name) if principal.name else f"key:{principal.key_id}",
        )
        if not principal.allows(required):
            raise PermissionDenied(
                f"this needs the {required!r} role; the key has {principal.role!r}", field=API_KEY_HEADER
            )
        return principal

    def login(self, presented: str, *, client: str) -> tuple[Principal, str, Session]:
        """(the caller, a session cookie value, its session) for a reviewer's or admin's key."""
        if not self.enabled:
            raise InputError(
                "authentication is off on this service (no API keys configured): the review page "
                "needs no login",
                field="key",
            )
        try:
            principal = self.authenticate(presented, None, client=client)
        except RouterError as error:  # the key came in the body's "key" field
            error.field = "key"
            raise
        if principal.role not in SESSION_ROLES:
            raise PermissionDenied(
                f"the review page needs a key with one of the roles {list(SESSION_ROLES)}; "
                f"this key has {principal.role!r}",
                field="key",
            )
        token, session = self.sessions.issue(principal.key_sha256)
        return principal, token, session

    def authenticate_session(
        self, token: str, required: str | None, *, client: str
    ) -> tuple[Principal, Session]:
        """The caller and session a session cookie holds, or raise (Unauthenticated: log in again)."""
        self.lockout.check(client)
        try:
            session = self.sessions.verify(token)
        except InvalidSession:
            self.lockout.failed(client)  # a forged cookie is a guess like a wrong key
            raise
        digest = self._by_kid.get(session.kid)
        if digest is None:
            raise Unauthenticated(
                "the API key this session was made with is no longer configured (revoked); "
                "log in with a current key",
                field="session",
            )
        return self._admit(self._by_digest[digest], required), session


def key_from_headers(headers: Iterable[tuple[str, str]]) -> str | None:
    """The key from ``x-api-key`` or ``authorization: Bearer``; header names lower-case."""
    found = None
    for name, value in headers:
        name = name.lower()
        if name == API_KEY_HEADER:
            return value.strip()
        if name == "authorization" and value.lower().startswith("bearer "):
            found = value[7:].strip()
    return found


def required_role(path: str) -> Role | None:
    if path in PUBLIC_PATHS:
        return None
    return next(
        (role for prefix, role in ROUTE_ROLES if path == prefix or path.startswith(prefix + "/")), "admin"
    )


def current_session() -> Session | None:
    """The session of the current request when it came with the session cookie."""
    return _session.get()


def set_principal(principal: Principal | None) -> contextvars.Token:
    return _principal.set(principal)


def reset_principal(token: contextvars.Token) -> None:
    _principal.reset(token)


def current_principal() -> Principal | None:
    return _principal.get()


def resolve_tenant(principal: Principal | None, requested: str | None) -> str:
    """The tenant a request acts for: the key's own; an admin may name any; auth off: as asked."""
    if principal is None:
        return requested or "default"
    if principal.role == "admin":
        return requested or principal.tenant
    if requested and requested != principal.tenant:
        raise PermissionDenied(
            f"this key belongs to tenant {principal.tenant!r}; it cannot act for tenant {requested!r}",
            field="tenant",
        )
    return principal.tenant


def tenant_scope(principal: Principal | None) -> str | None:
    """The tenant whose review items and index entries the caller may see; None: all of them."""
    return None if principal is None or principal.role == "admin" else principal.tenant


# -- HTTP --------------------------------------------------------------------------------------


def header_value(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of header ``name`` (lower-case), or None."""
    return next((value for key, value in headers if key.lower() == name), None)


def host_of(address: str) -> str:
    """The host of ``host:port``, ``[v6]:port``, gRPC's ``ipv4:host:port`` or a bare address."""
    for prefix in ("ipv4:", "ipv6:"):
        if address.startswith(prefix):
            address = address[len(prefix) :].replace("%5B", "[").replace("%5D", "]")
    if address.startswith("["):
        return address[1 : address.find("]")] if "]" in address else address[1:]
    if address.count(":") == 1:
        return address.split(":")[0]
    return address


def serve_client_address() -> str:
    """The caller's address Ray Serve recorded for the current request, HTTP or gRPC;
    "unknown" outside Serve (then every such caller shares one lockout)."""
    try:
        from ray.serve.context import _get_serve_request_context

        context = _get_serve_request_context()  # no public API gives the client address
        address = context._client or (context.grpc_context.peer() if context.grpc_context else "")
    except Exception:  # not inside Serve
        address = ""
    return host_of(address) or "unknown"


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
        token = _principal.set(principal)
        session_token = _session.set(session)
        try:
            await self.app(scope, receive, send)
        finally:
            _session.reset(session_token)
            _principal.reset(token)

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
        from router.errors import error_body, http_status, retry_after_s

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


def make_authenticator(security: SecurityConfig) -> Authenticator:
    """The key check for ``security``, after refusing an unsafe bind."""
    check_serve_bind(security)
    if not security.enabled:
        log.warning("no API keys configured: authentication is off (local development only)")
    return Authenticator(security)


# -- bind check --------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: may resolve to anything


def check_bind(security: SecurityConfig, http_host: str | None, grpc_enabled: bool) -> None:
    """Raise ConfigError when the service would listen beyond loopback without keys."""
    if security.enabled or security.allow_insecure_bind:
        return
    exposed = []
    if http_host is not None and not is_loopback(http_host):
        exposed.append(f"HTTP on {http_host}")
    if grpc_enabled:
        exposed.append("gRPC (Ray Serve's gRPC proxy listens on all interfaces)")
    if exposed:
        raise ConfigError(
            f"refusing to serve {' and '.join(exposed)} without API keys: add security.api_keys "
            "(`visionroute keys new`), bind HTTP to 127.0.0.1 and drop grpc_options, or set "
            "security.allow_insecure_bind: true to accept the risk",
            field="security.api_keys",
        )


def check_serve_bind(security: SecurityConfig) -> None:
    """check_bind against the proxies the running Serve instance was started with."""
    if security.enabled or security.allow_insecure_bind:
        return
    try:
        import ray
        from ray.serve.context import _get_global_client

        controller = _get_global_client()._controller  # no public API exposes the proxy options
        http = ray.get(controller.get_http_config.remote(), timeout=30)
        grpc = ray.get(controller.get_grpc_config.remote(), timeout=30)
    except Exception as exc:  # not inside Serve (unit tests, local testing mode)
        log.debug("no Serve controller to check the bind address against: %s", exc)
        return
    check_bind(security, http.host, grpc.port > 0 and bool(grpc.grpc_servicer_functions))
