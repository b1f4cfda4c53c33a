"""What a refused or failed call raises: ``ServiceError``, with the service's own error body.

Both faces answer a refusal with one body, ``{"error", "field", "reason", "request_id"}`` (the
HTTP body, or the gRPC status details: router/errors.py), so a caller reads the same fields from
either transport: ``status`` (the HTTP status; over gRPC the one the same error has over HTTP),
``error`` (the service's error name), ``field``, ``reason``, ``request_id`` and, on 429 and 503,
``retry_after_s``; ``proxy_answer`` when the answer was not the service's own error body (Ray
Serve's plain text, a proxy's page). Each error is also an instance of the project's error of that status
(``NotFound``, ``Conflict``, ``BudgetExceeded``, ...), so ``except NotFound`` works remotely as it
does in-process. ``ServiceUnreachable``: no answer at all (connection refused or reset, a timeout).
"""

from __future__ import annotations

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

# the project error each HTTP status stands for (router/errors.py ERROR_TABLE, read backwards)
KIND_OF_STATUS: dict[int, type[RouterError]] = {
    400: InputError,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ConfigError,
    429: BudgetExceeded,
    503: BackendUnavailable,
}
# gRPC status code name -> the HTTP status of the same refusal (router/errors.py ERROR_TABLE);
# INVALID_ARGUMENT is 400, 413 or 415 by the error's name (ERRORS_WITH_OWN_STATUS)
STATUS_OF_GRPC_CODE: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "FAILED_PRECONDITION": 422,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNKNOWN": 500,
}
ERRORS_WITH_OWN_STATUS = {"PayloadTooLarge": 413, "UnsupportedMediaType": 415}


class ServiceError(RouterError):
    """The service refused the call (or could not answer it): its status, error, field, reason."""

    def __init__(
        self,
        *,
        operation: str,
        status: int | None,
        error: str,
        field: str | None,
        reason: str,
        request_id: str | None = None,
        retry_after_s: float | None = None,
        grpc_code: str | None = None,
        proxy_answer: bool = False,
    ) -> None:
        where = f" {grpc_code}" if grpc_code else ""
        answered = f"answered {status}{where} {error}" if status is not None else f"failed: {error}"
        named = f" (field {field})" if field else ""
        message = f"{operation} {answered}{named}: {reason}"
        if request_id:
            message += f" [request id {request_id}]"
        RouterError.__init__(self, message, field=field)
        self.operation = operation
        self.status = status
        self.error = error
        self.reason = reason  # the service's own reason, without the operation and status
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        self.grpc_code = grpc_code
        # not the service's error body: Ray Serve's own answer (its plain-text 500 when the
        # replica died under the request, its 503 when overloaded) or a proxy's
        self.proxy_answer = proxy_answer


class ServiceUnreachable(ServiceError):
    """No answer: the connection failed, broke, or outlasted the timeout. ``sent`` says whether
    the request may have reached the service (then only an idempotent call is retried)."""

    def __init__(
        self, *, operation: str, reason: str, field: str, sent: bool, request_id: str | None
    ) -> None:
        super().__init__(
            operation=operation,
            status=None,
            error="Unreachable" if not sent else "NoAnswer",
            field=field,
            reason=reason,
            request_id=request_id,
        )
        self.sent = sent


def _kind_class(kind: type[RouterError]) -> type[ServiceError]:
    return type(f"Service{kind.__name__}", (ServiceError, kind), {"__module__": __name__})


# ServiceError subclasses that are also the project's error of their status: ServiceNotFound, ...
KIND_CLASSES: dict[int, type[ServiceError]] = {
    status: _kind_class(kind) for status, kind in KIND_OF_STATUS.items()
}


def service_error(*, status: int | None, **fields) -> ServiceError:
    """The ServiceError for a refusal with ``status``: the class of that status's project error."""
    return KIND_CLASSES.get(status or 0, ServiceError)(status=status, **fields)


def status_of_grpc(code_name: str, error: str | None) -> int:
    if error in ERRORS_WITH_OWN_STATUS:
        return ERRORS_WITH_OWN_STATUS[error]
    return STATUS_OF_GRPC_CODE.get(code_name, 500)
