"""The one table from project errors to HTTP status and gRPC status code.

Both faces (router/http/api.py, router/grpc/ingress.py) map errors through it, so the same
failure is the same answer on either protocol. Most specific first: the first match wins.
gRPC codes are named, not imported, so this module needs neither grpc nor FastAPI.

It also decides what of an error a client sees (``error_body``): the project's own error name
(never a Ray wrapper's), the field, a reason with every echoed value bounded and nothing of a
dependency's internals (paths, pids, node addresses, actor ids, tracebacks), and the request
id. An exception that is not a project error becomes ``unexpected_error``: a generic reason
(its text goes to the server log only), 503 with Retry-After when a dependency failed.
"""

from __future__ import annotations

import asyncio
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
from visionroute.redaction import bounded_echoes, failure_kind, scrubbed

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
DEFAULT_RETRY_AFTER_S = 1  # a 503 that names no wait of its own
FIELD_CHARS = 128
REASON_CHARS = 1000
# Errors whose reason may carry a dependency's text: scrubbed of paths and addresses too.
SERVER_SIDE = (BackendUnavailable, ConfigError)


class InternalError(RouterError):
    """An exception that is no project error (a bug): HTTP 500 / INTERNAL, generic reason."""


def unexpected_error(exc: BaseException) -> RouterError:
    """The project error a client gets for an exception that is not one; ``exc``'s text is
    for the server log only. A failed dependency (a Ray actor or task, a timeout, a socket)
    is 503 BackendUnavailable (with Retry-After); anything else is a bug: 500 InternalError."""
    if isinstance(exc, RouterError):
        return exc
    if _is_dependency_failure(exc):
        return BackendUnavailable(
            f"a backend failed ({public_kind(exc)}); try again shortly. The details are logged "
            "with this request id",
            field="service",
        )
    return InternalError(
        "internal error; it is logged with this request id, which the operators can look up",
        field=None,
    )


def _is_dependency_failure(exc: BaseException) -> bool:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    try:
        from ray.exceptions import RayError
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return isinstance(exc, RayError)


def public_kind(exc: BaseException) -> str:
    """The name a client may see for ``exc``: a project error's own class, never a Ray
    wrapper's (``RayTaskError(InputError)`` is an ``InputError``)."""
    inner = failure_kind(exc)
    for kind in type(inner).__mro__:
        if issubclass(kind, RouterError) and not kind.__module__.startswith("ray"):
            return kind.__name__
    return type(inner).__name__.split("(")[0]


def _row(error: RouterError) -> tuple[int, str]:
    return next(((status, code) for kind, status, code in ERROR_TABLE if isinstance(error, kind)), UNMAPPED)


def http_status(error: RouterError) -> int:
    return _row(error)[0]


def grpc_code_name(error: RouterError) -> str:
    return _row(error)[1]


def retry_after_s(error: RouterError) -> int | None:
    """Seconds a caller should wait before retrying: every 429 and every 503 says."""
    if isinstance(error, BudgetExceeded):
        return max(1, round(error.retry_after_s))
    if http_status(error) == 503:
        wait = getattr(error, "retry_after_s", None)
        return max(1, round(wait)) if wait is not None else DEFAULT_RETRY_AFTER_S
    return None


def client_reason(error: RouterError) -> str:
    """The reason as a client may read it: no traceback, pid, actor id or memory address; no
    path or network address from a server-side error; every echoed value bounded."""
    server_side = isinstance(error, SERVER_SIDE) or http_status(error) == 500
    return bounded_echoes(scrubbed(str(error.reason), addresses=server_side), total_chars=REASON_CHARS)


def error_body(error: RouterError, request_id: str | None) -> dict[str, Any]:
    """The JSON body of an error on both faces (gRPC puts it in the status details)."""
    cause = failure_kind(error)
    error = cause if isinstance(cause, RouterError) else error  # Ray's wrapper: its cause speaks
    field = error.field
    return {
        **error.to_dict(),
        "error": public_kind(error),
        "field": _encodable(bounded_echoes(str(field), total_chars=FIELD_CHARS))
        if field is not None
        else None,
        "reason": _encodable(client_reason(error)),
        "request_id": request_id,
    }


def _encodable(text: str) -> str:
    """``text`` as valid UTF-8 whatever it echoes: a lone surrogate becomes ``\\udXXX``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
