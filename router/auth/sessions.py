"""Signed, expiring browser sessions for the review page, with no server-side store.

A session cookie is ``v1.<payload>.<signature>``:

- ``payload``: base64url JSON ``{"kid": the first 32 hex of the key's sha256, "iat": issued,
  "exp": expires (unix seconds), "nonce": 16 random bytes}``;
- ``signature``: base64url HMAC-SHA256 of ``"vr-session-v1." + payload`` under the server
  secret (the standard library's ``hmac``; the same scheme as itsdangerous' signers).

So any ingress replica, in any process, verifies a session with the shared secret alone;
nothing in a session can be changed without the secret; and a session is only as good as its
key: the caller is looked up by ``kid`` among the keys configured *now*, so removing a key
from ``security.api_keys`` (and redeploying) ends every session made with it, and a changed
role applies at once. The CSRF token is ``HMAC(secret, "vr-csrf-v1." + nonce)``: the page
reads it from the login answer (or ``GET /v1/session``) and sends it as ``x-csrf-token``.

The secret comes from the environment variable ``security.session.secret_env`` (default
``VISIONROUTE_SESSION_SECRET``, at least 32 characters) or, when that is unset, from
``security.session.secret_file``: 32 random bytes written once (mode 0600) by whichever
replica needs it first; every replica on the machine then reads the same file. On several
machines set the environment variable on each (the same value).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from visionroute import paths
from visionroute.errors import ConfigError, Unauthenticated

SESSION_COOKIE = "vr_session"
CSRF_HEADER = "x-csrf-token"
KID_HEX = 32
MIN_SECRET_CHARS = 32
_SESSION_CONTEXT = b"vr-session-v1."
_CSRF_CONTEXT = b"vr-csrf-v1."


class SessionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_s: float = Field(8 * 3600.0, gt=0, le=7 * 86400, description="how long a login lasts")
    secret_env: str = Field(
        "VISIONROUTE_SESSION_SECRET",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the signing secret (>= 32 characters)",
    )
    secret_file: Path = Field(
        default_factory=lambda: paths.data_dir() / "session_secret",
        description="used when the environment variable is unset: created (0600) on first use",
    )
    cookie_secure: Literal["auto", "always"] = Field(
        "auto",
        description="auto: Secure when the request came over https (or a trusted proxy says so)",
    )

    @field_validator("secret_file")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Resolved where the config is parsed, so every replica reads the same file.
        return value.expanduser().resolve()


class InvalidSession(Unauthenticated):
    """A session cookie that is malformed or not signed with this server's secret."""


@dataclass(frozen=True)
class Session:
    kid: str
    issued_at: float
    expires_at: float
    csrf_token: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_secret(config: SessionConfig) -> bytes:
    """The signing secret: the environment variable, else the secret file (made once)."""
    from_env = os.environ.get(config.secret_env)
    if from_env is not None:
        if len(from_env) < MIN_SECRET_CHARS:
            raise ConfigError(
                f"the session secret in ${config.secret_env} has {len(from_env)} characters; "
                f"it needs at least {MIN_SECRET_CHARS} (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)",
                field="security.session.secret_env",
            )
        return from_env.encode()
    path = config.secret_file
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(descriptor, secrets.token_hex(32).encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        try:
            os.link(temporary, path)  # atomic; the first replica's secret wins
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    secret = path.read_bytes().strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"the session secret file {str(path)!r} holds {len(secret)} characters; it needs at least "
            f"{MIN_SECRET_CHARS} (delete it to make a new one)",
            field="security.session.secret_file",
        )
    return secret


class SessionSigner:
    """Issue and verify session cookies; the secret is read on first use, not at start."""

    def __init__(self, config: SessionConfig, secret: bytes | None = None) -> None:
        self.config = config
        self._secret = secret
        self._lock = threading.Lock()

    def _key(self) -> bytes:
        if self._secret is None:
            with self._lock:
                if self._secret is None:
                    self._secret = load_secret(self.config)
        return self._secret

    def _mac(self, context: bytes, message: bytes) -> bytes:
        return hmac.new(self._key(), context + message, hashlib.sha256).digest()

    def csrf_token(self, nonce: str) -> str:
        return _b64(self._mac(_CSRF_CONTEXT, nonce.encode("ascii")))

    def issue(self, key_sha256: str, *, now: float | None = None) -> tuple[str, Session]:
        """(the cookie value, the session it holds) for the key with this digest."""
        now = time.time() if now is None else now
        nonce = secrets.token_urlsafe(16)
        claims = {
            "kid": key_sha256[:KID_HEX],
            "iat": int(now),
            "exp": int(now + self.config.ttl_s),
            "nonce": nonce,
        }
        payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        token = f"v1.{payload}.{_b64(self._mac(_SESSION_CONTEXT, payload.encode('ascii')))}"
        return token, Session(claims["kid"], claims["iat"], claims["exp"], self.csrf_token(nonce))

    def verify(self, token: str, *, now: float | None = None) -> Session:
        """The session in ``token``; InvalidSession if forged or malformed, Unauthenticated if expired."""
        now = time.time() if now is None else now
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != "v1":
            raise InvalidSession("the session cookie is malformed; log in again", field="session")
        _, payload, signature = parts
        try:
            presented = _unb64(signature)
            claims = json.loads(_unb64(payload))
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise InvalidSession("the session cookie is malformed; log in again", field="session") from None
        if not hmac.compare_digest(presented, self._mac(_SESSION_CONTEXT, payload.encode("ascii"))):
            raise InvalidSession(
                "the session cookie's signature does not match this service's secret "
                "(altered, or signed before the secret changed); log in again",
                field="session",
            )
        try:
            kid, issued_at, expires_at, nonce = claims["kid"], claims["iat"], claims["exp"], claims["nonce"]
        except (KeyError, TypeError):
            raise InvalidSession("the session cookie is malformed; log in again", field="session") from None
        if expires_at <= now:
            raise Unauthenticated(
                f"the session expired {now - expires_at:.0f} s ago; log in again", field="session"
            )
        return Session(kid, issued_at, expires_at, self.csrf_token(nonce))

    def check_csrf(self, session: Session, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(presented.encode(), session.csrf_token.encode())
