"""API keys per tenant, the key check, and the refusal to serve publicly without keys.

Keys are stored as SHA-256 hex digests only (``security.api_keys[].sha256`` in the config):
API keys are 32 random bytes, so a fast hash is enough, unlike passwords; the plain key is
shown once by ``visionroute keys new`` and never stored, logged or put in a trace.

Without any key configured, auth is off (local development) and every caller may name any
tenant; then ``check_bind`` refuses to serve on a non-loopback address unless
``security.allow_insecure_bind`` says so explicitly.

Every key check, by header, gRPC metadata or session cookie, goes through ``Authenticator``,
which also applies the per-key rate limit and the per-address lockout (router/auth/limits.py)
and issues the review page's sessions (router/auth/sessions.py). Transport-free: which routes
need which role, cookies and the ASGI middleware are the HTTP face's (router/http/auth.py), the
RPCs' roles the gRPC face's; Ray's view of the caller comes in through ``client_address``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import time
from collections.abc import Callable, Iterable

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, model_validator

from router.auth.limits import KeyRateLimiter, Lockout, LockoutConfig, RateLimitConfig
from router.auth.principal import TENANT_PATTERN, Principal, Role
from router.auth.sessions import KID_HEX, InvalidSession, Session, SessionConfig, SessionSigner
from visionroute.errors import ConfigError, InputError, PermissionDenied, RouterError, Unauthenticated

API_KEY_HEADER = "x-api-key"
SESSION_ROLES = ("reviewer", "admin")


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


class Authenticator:
    """Every credential check: API keys (header or gRPC metadata), session cookies, the
    per-key rate limit and the per-address lockout; one per ingress replica."""

    def __init__(
        self,
        config: SecurityConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        session_secret: bytes | None = None,
        client_address: Callable[[], str] = lambda: "unknown",
    ) -> None:
        """``client_address``: the current caller's address when a check is given none (the
        lockout's key); router/serve_context.py passes Ray Serve's, outside Serve it is "unknown"."""
        self.config = config
        self.client_address = client_address
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

        ``client``: the caller's address for the lockout; by default ``client_address()`` (Ray
        Serve's record of the current request, so the gRPC face needs to pass nothing)."""
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
        address = client if client is not None else self.client_address()
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
