"""The one table from project errors to HTTP status and gRPC status code.

Both faces (router/http_api.py, router/grpc_ingress.py) map errors through it, so the same
failure is the same answer on either protocol. Most specific first: the first match wins.
gRPC codes are named, not imported, so this module needs neither grpc nor FastAPI.
"""

from __future__ import annotations

from typing import Any

from visionroute.errors import (
    BackendUnavailable,
    BudgetExceeded,
    ConfigError,
    Conflict,
    InputError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RouterError,
    Unauthenticated,
    UnsupportedMediaType,
)

# (error class, HTTP status, grpc.StatusCode name)
ERROR_TABLE: tuple[tuple[type[RouterError], int, str], ...] = (
    (Unauthenticated, 401, "UNAUTHENTICATED"),
    (PermissionDenied, 403, "PERMISSION_DENIED"),
    (PayloadTooLarge, 413, "INVALID_ARGUMENT"),
    (UnsupportedMediaType, 415, "INVALID_ARGUMENT"),
    (InputError, 400, "INVALID_ARGUMENT"),
    (NotFound, 404, "NOT_FOUND"),
    (Conflict, 409, "ABORTED"),
    (BudgetExceeded, 429, "RESOURCE_EXHAUSTED"),
    (BackendUnavailable, 503, "UNAVAILABLE"),
    (ConfigError, 422, "FAILED_PRECONDITION"),
)
UNMAPPED = (500, "INTERNAL")


def _row(error: RouterError) -> tuple[int, str]:
    return next(((status, code) for kind, status, code in ERROR_TABLE if isinstance(error, kind)), UNMAPPED)


def http_status(error: RouterError) -> int:
    return _row(error)[0]


def grpc_code_name(error: RouterError) -> str:
    return _row(error)[1]


def retry_after_s(error: RouterError) -> int | None:
    """Seconds a caller should wait before retrying, for errors that say so."""
    if isinstance(error, BudgetExceeded):
        return max(1, round(error.retry_after_s))
    return None


def error_body(error: RouterError, request_id: str | None) -> dict[str, Any]:
    """The JSON body of an error on both faces (gRPC puts it in the status details)."""
    return {**error.to_dict(), "request_id": request_id}
