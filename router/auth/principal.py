"""Who is calling: the ``Principal`` (tenant, role, key) the service core acts for, and the roles.

Transport-free: the HTTP middleware (router/http/auth.py) and the gRPC wrapper
(router/grpc/ingress.py) find the caller from a key or a session and set it here, for the
request's task; the core (router/services/) only receives a ``Principal`` and asks
``resolve_tenant`` / ``tenant_scope`` what it may touch.

Roles are ranked: ``client`` (analyse, search) < ``reviewer`` (+ review queue and page) <
``admin`` (+ everything else: metrics, reconfigure, any tenant).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from visionroute.errors import PermissionDenied

if TYPE_CHECKING:
    from router.auth.sessions import Session

Role = Literal["client", "reviewer", "admin"]

ROLE_RANK: dict[str, int] = {"client": 1, "reviewer": 2, "admin": 3}

TENANT_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"


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


def current_session() -> Session | None:
    """The session of the current request when it came with the session cookie."""
    return _session.get()


def set_session(session: Session | None) -> contextvars.Token:
    return _session.set(session)


def reset_session(token: contextvars.Token) -> None:
    _session.reset(token)


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
