"""Split up: this module is removed in the next release.

Keys, roles and the ``Principal`` the core depends on are in router/auth/ (``router.auth.keys``,
``router.auth.principal``, transport-free); the route roles, the ASGI middleware and cookies in
router/http/auth.py; Ray's view of the caller and ``make_authenticator`` in router/serve_context.py;
``GRPC_ROLES`` in router/grpc/ingress.py. The transport-free names are re-exported here as before;
the others load on first use, so importing this module never imports the HTTP face or Ray.
"""

import importlib
import warnings

from router.auth.keys import (  # noqa: F401
    API_KEY_HEADER,
    SESSION_ROLES,
    ApiKey,
    Authenticator,
    SecurityConfig,
    check_bind,
    hash_key,
    is_loopback,
    key_from_headers,
    new_key,
)
from router.auth.principal import (  # noqa: F401
    ROLE_RANK,
    TENANT_PATTERN,
    Principal,
    Role,
    current_principal,
    current_session,
    reset_principal,
    resolve_tenant,
    set_principal,
    tenant_scope,
)

warnings.warn(
    "router.security is split into router.auth, router.http.auth and router.serve_context; "
    "it is removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
_MOVED = {
    "router.http.auth": "PUBLIC_PATHS ROUTE_ROLES LOGIN_PAGE_PATHS SESSION_PREFIXES SAFE_METHODS required_role "
    "header_value client_address is_https check_same_origin session_from_cookies session_cookie "
    "cleared_session_cookie ApiKeyMiddleware",
    "router.serve_context": "host_of serve_client_address check_serve_bind make_authenticator",
    "router.grpc.ingress": "GRPC_ROLES",
}
_WHERE = {name: module for module, names in _MOVED.items() for name in names.split()}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
