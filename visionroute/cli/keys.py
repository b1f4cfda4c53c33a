"""``visionroute keys new``: make an API key; print it once, and the config entry with its hash.
``visionroute keys session-secret``: make a secret that signs the review page's sessions."""

from __future__ import annotations

import secrets

import yaml

from router.auth.keys import ApiKey, new_key
from router.auth.sessions import SessionConfig


def _new(args) -> int:
    key, digest = new_key()
    entry = ApiKey(sha256=digest, tenant=args.tenant, role=args.role, name=args.name)
    print(f"API key (shown once, store it in the caller's secret store): {key}")
    print("add under applications[].args.security.api_keys:")
    print(yaml.safe_dump([entry.model_dump()], sort_keys=False).rstrip())
    if args.role in ("reviewer", "admin"):
        print("reviewers log in to the review page (GET /review) with this key")
    return 0


def _session_secret(args) -> int:
    env = SessionConfig.model_fields["secret_env"].default
    print(f"export {env}={secrets.token_hex(32)}")
    print(
        "# the same value on every machine that runs an ingress replica; changing it logs every "
        "reviewer out (without it, each machine makes its own file under the data directory)"
    )
    return 0


def register(subparsers, bench) -> None:
    keys = subparsers.add_parser("keys", help="API keys (stored hashed in the config)")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    new = sub.add_parser("new", help="make a key for a tenant and role")
    new.add_argument("--tenant", required=True)
    new.add_argument("--role", choices=["client", "reviewer", "admin"], default="client")
    new.add_argument("--name", default="", help="who holds it")
    new.set_defaults(func=_new)
    secret = sub.add_parser(
        "session-secret", help="make a secret for the review page's session cookies (print an export line)"
    )
    secret.set_defaults(func=_session_secret)
