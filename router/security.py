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
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from visionroute.errors import ConfigError, PermissionDenied, RouterError, Unauthenticated

log = logging.getLogger("visionroute.security")

Role = Literal["client", "reviewer", "admin"]
ROLE_RANK: dict[str, int] = {"client": 1, "reviewer": 2, "admin": 3}
API_KEY_HEADER = "x-api-key"
TENANT_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# (path prefix, least role), first match wins; anything else needs admin.
ROUTE_ROLES: tuple[tuple[str, Role], ...] = (
    ("/v1/analyze", "client"),
    ("/v1/search", "client"),
    ("/v1/review", "reviewer"),
    ("/review", "reviewer"),
)
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


class SecurityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_keys: list[ApiKey] = Field(default_factory=list)
    allow_insecure_bind: bool = Field(
        False,
        description="serve on a non-loopback address (or gRPC, which listens on all interfaces) without keys",
    )

    @model_validator(mode="after")
    def _unique_keys(self) -> SecurityConfig:
        digests = [k.sha256 for k in self.api_keys]
        if len(digests) != len(set(digests)):
            raise ValueError("security.api_keys lists the same key twice")
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

    def allows(self, role: str | None) -> bool:
        return role is None or ROLE_RANK[self.role] >= ROLE_RANK[role]


# The caller of the current request; None while auth is off. Set by the HTTP middleware or
# the gRPC endpoint wrapper; handlers read it through resolve_tenant / tenant_scope.
_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "visionroute_principal", default=None
)


class Authenticator:
    def __init__(self, config: SecurityConfig) -> None:
        self.enabled = config.enabled
        self._by_digest = {k.sha256: Principal(k.tenant, k.role, k.name) for k in config.api_keys}

    def authenticate(self, presented: str | None, required: str | None) -> Principal | None:
        """The caller for ``presented`` (a key), or raise; None when auth is off."""
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
        principal = self._by_digest.get(hash_key(presented))
        if principal is None:
            raise Unauthenticated("the API key matches no configured key", field=API_KEY_HEADER)
        if not principal.allows(required):
            raise PermissionDenied(
                f"this needs the {required!r} role; the key has {principal.role!r}", field=API_KEY_HEADER
            )
        return principal


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


class ApiKeyMiddleware:
    """Pure ASGI middleware (same task as the endpoint, so the contextvar reaches it).

    ``authenticator`` is a function that returns the process's current authenticator: Ray
    Serve serves a frozen copy of the FastAPI app, so the keys cannot live on the app object."""

    def __init__(self, app: Any, authenticator: Any) -> None:
        self.app = app
        self.current_authenticator = authenticator

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        try:
            principal = self.current_authenticator().authenticate(
                key_from_headers(headers), required_role(scope["path"])
            )
        except RouterError as error:
            from router.errors import error_body, http_status

            status = http_status(error)
            request_id = next((v for k, v in headers if k.lower() == "x-request-id"), None)
            body = json.dumps(error_body(error, request_id)).encode()
            extra = [(b"www-authenticate", b"ApiKey")] if status == 401 else []
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json"), *extra],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        token = _principal.set(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            _principal.reset(token)


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
