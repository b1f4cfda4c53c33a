"""API keys of the session's shared keyed service (``keyed_service`` in tests/integration/conftest.py).

One key set for every module that uses that service, so the service starts once: each module
names the keys it acts with (tenant, role and plain key; the service sees only the hashes). The
plain keys are made per process and exist only in the tests.
"""

from __future__ import annotations

import uuid

from router.auth.keys import hash_key


def _key(prefix: str) -> str:
    return f"vr_{prefix}_" + uuid.uuid4().hex


# name -> (tenant, role, plain key); the key's name in the config is the name here
KEYS: dict[str, tuple[str, str, str]] = {
    # tests/integration/test_grpc.py
    "acme_client": ("acme", "client", _key("acme_client")),
    "acme_reviewer": ("acme", "reviewer", _key("acme_reviewer")),
    "globex_reviewer": ("globex", "reviewer", _key("globex_reviewer")),
    "admin": ("ops", "admin", _key("admin")),
    # tests/integration/test_security_tenancy.py
    "acme_app": ("acme", "client", _key("acme_app")),
    "ann": ("acme", "reviewer", _key("ann")),
    "bob": ("acme", "reviewer", _key("bob")),
    "globex_app": ("globex", "client", _key("globex_app")),
    "gus": ("globex", "reviewer", _key("gus")),
    "root": ("ops", "admin", _key("root")),
    # tests/integration/test_router_service.py (a tenant of its own)
    "router_client": ("routing", "client", _key("router_client")),
}


def key(name: str) -> str:
    """The plain key of ``name``."""
    return KEYS[name][2]


def security_args(keys: dict[str, tuple[str, str, str]] = KEYS) -> dict:
    """The ``security`` args of a service that knows ``keys`` (by their hashes only)."""
    return {
        "api_keys": [
            {"sha256": hash_key(plain), "tenant": tenant, "role": role, "name": name}
            for name, (tenant, role, plain) in keys.items()
        ]
    }
