"""The Python client of a running VisionRoute service: blocking and asyncio, over HTTP or gRPC.

    from visionroute.client import VisionRouteClient

    with VisionRouteClient("http://127.0.0.1:8000", api_key="vr_...") as client:
        result = client.analyze("coffee.png")        # AnalyzeResponse: decision, answer, trace
        print(result.decision, result.answer[0].label)

``grpc://127.0.0.1:9000`` gives the same interface over gRPC; ``AsyncVisionRouteClient`` the
same operations, awaited. Answers are the service's own typed results; a refusal raises
``ServiceError`` (status, error, field, reason, request_id); 429 and 503 are retried after
their Retry-After, every attempt with the call's one request id (docs/client.md).
``analyze_batch`` sends a list of any length through the batch API in chunks, with progress.

Modules: ``operations`` (every operation once, for both faces and both clients), ``clients``
(the two clients: how a call runs), ``calls`` (a call on the wire), ``batch`` (a list in
chunks), ``results`` (answers typed), ``http_transport`` / ``grpc_transport`` /
``grpc_replies`` (the wire), ``retry`` (when and how long), ``errors``, ``commands`` (the
command line's flags and ``ServiceClient``). Heavy modules (httpx, grpc, the service's models)
load on first use.
"""

from visionroute.client.batch import BatchProgress
from visionroute.client.clients import DEFAULT_URL, AsyncVisionRouteClient, VisionRouteClient
from visionroute.client.commands import (
    KEY_ENV,
    URL_ENV,
    ServiceClient,
    add_service_arguments,
    client_of,
    service_answers,
)
from visionroute.client.errors import ServiceError, ServiceUnreachable
from visionroute.client.results import AnalyzeBatchResult, BatchItemResult
from visionroute.client.retry import NO_RETRY, RetryPolicy

__all__ = [
    "DEFAULT_URL",
    "KEY_ENV",
    "NO_RETRY",
    "URL_ENV",
    "AnalyzeBatchResult",
    "AsyncVisionRouteClient",
    "BatchItemResult",
    "BatchProgress",
    "RetryPolicy",
    "ServiceClient",
    "ServiceError",
    "ServiceUnreachable",
    "VisionRouteClient",
    "add_service_arguments",
    "client_of",
    "service_answers",
]
