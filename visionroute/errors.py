"""One base exception for the project and the few kinds callers must tell apart.

Only the ingress (router/) maps these to HTTP or gRPC status codes; everything else raises
them with a message that says what failed, what was expected and what arrived.
"""

from __future__ import annotations


class RouterError(Exception):
    """Base of every error VisionRoute raises on purpose."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.reason = message

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "field": self.field, "reason": self.reason}


class Unauthenticated(RouterError):
    """No API key, or one that matches no configured key (HTTP 401, gRPC UNAUTHENTICATED)."""


class PermissionDenied(RouterError):
    """A valid key whose role or tenant does not allow this (HTTP 403, gRPC PERMISSION_DENIED)."""


class ConfigError(RouterError):
    """A config file, a serve_config arg or a reconfigure payload is invalid."""


class InputError(RouterError):
    """The caller sent something we cannot use (HTTP 400/422)."""


class PayloadTooLarge(InputError):
    """Body bytes or image pixels above the configured limit (HTTP 413)."""


class UnsupportedMediaType(InputError):
    """A content type or image format we do not accept (HTTP 415)."""


class NotFound(RouterError):
    """An id that does not exist (HTTP 404)."""


class Conflict(RouterError):
    """A state clash: item leased by someone else, lease expired, label already differs (409)."""


class BackendUnavailable(RouterError):
    """A dependency (model, VLM, queue) cannot answer now (HTTP 503)."""


class BudgetExceeded(RouterError):
    """A hard budget cap would be crossed (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, *, retry_after_s: float, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s
