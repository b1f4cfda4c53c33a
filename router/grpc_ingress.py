"""The gRPC face of the ingress: the RPCs of ``router/proto/visionroute.proto`` and grpc.health.v1.

Ray Serve's gRPC proxy (``grpc_options`` in serve_config.yaml) calls the ingress deployment's
method named like the RPC with the decoded request message. ``Ingress`` inherits these
methods, and each one calls the same code the HTTP route runs (``analyze_image``, the review
handlers, ``readyz``), so both faces share semantics, limits, tenant rules and errors; only
the envelope differs. A ``RouterError`` becomes a gRPC status whose details are the HTTP
error body as JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from pydantic import ValidationError

from router.grpc_build import ensure_generated
from router.security import (
    GRPC_ROLES,
    PermissionDenied,
    Unauthenticated,
    key_from_headers,
    reset_principal,
    set_principal,
)
from visionroute.errors import (
    BackendUnavailable,
    BudgetExceeded,
    ConfigError,
    Conflict,
    InputError,
    NotFound,
    RouterError,
)

ensure_generated()
from router.proto import visionroute_pb2 as pb  # noqa: E402  (generated just above)
from router.proto import visionroute_pb2_grpc  # noqa: E402

log = logging.getLogger("visionroute.grpc")

# For grpc_options.grpc_servicer_functions: importing this module generates the code first.
add_VisionRouteServicer_to_server = visionroute_pb2_grpc.add_VisionRouteServicer_to_server
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VisionRoute"].full_name

# Most specific first, like router.ingress.STATUS_BY_ERROR (HTTP 401/403/400/404/409/429/503/422).
GRPC_STATUS_BY_ERROR: tuple[tuple[type[RouterError], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Conflict, grpc.StatusCode.ABORTED),
    (BudgetExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BackendUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
)


def grpc_code_for(error: RouterError) -> grpc.StatusCode:
    return next(
        (code for kind, code in GRPC_STATUS_BY_ERROR if isinstance(error, kind)), grpc.StatusCode.INTERNAL
    )


def input_error(exc: ValidationError, prefix: str = "") -> InputError:
    first = exc.errors()[0]
    field = ".".join(map(str, first["loc"])) or "body"
    return InputError(first["msg"], field=prefix + field if prefix else field)


def analyze_to_proto(body: dict[str, Any]) -> pb.AnalyzeResponse:
    return pb.AnalyzeResponse(
        request_id=body["request_id"],
        task=body["task"],
        decision=body["decision"],
        answer=[
            pb.Detection(
                label=d["label"] or "", class_id=d["class_id"], confidence=d["confidence"], xyxy=d["xyxy"]
            )
            for d in body["answer"]
        ],
        image=pb.ImageInfo(**body["image"]),
        review_item_id=body["review_item_id"] or "",
        cost_units=body["cost_units"],
        trace_json=json.dumps(body["trace"]),
    )


def _request_id(grpc_context) -> str:
    from ray.serve.context import _get_serve_request_context

    from router.ingress import REQUEST_ID_PATTERN  # lazy: router.ingress imports this module

    request_id = grpc_context.request_id() or _get_serve_request_context().request_id or uuid.uuid4().hex
    if not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise InputError("request_id must be 1-128 characters from [A-Za-z0-9_.:-]", field="request_id")
    return request_id


class GrpcEndpoints:
    """Mixed into ``router.ingress.Ingress``; uses its ``security``, ``analyze_image``, review
    handlers and ``readyz``."""

    async def _grpc(
        self, method: str, grpc_context, empty: Any, work: Callable[[str], Awaitable[Any]]
    ) -> Any:
        request_id = None
        try:
            request_id = _request_id(grpc_context)
            principal = self.security.authenticate(
                key_from_headers(grpc_context.invocation_metadata()), GRPC_ROLES[method]
            )
            token = set_principal(principal)
            try:
                return await work(request_id)
            finally:
                reset_principal(token)
        except RouterError as error:
            grpc_context.set_code(grpc_code_for(error))
            grpc_context.set_details(json.dumps({**error.to_dict(), "request_id": request_id}))
            if isinstance(error, BudgetExceeded):
                grpc_context.set_trailing_metadata([("retry-after", str(max(1, round(error.retry_after_s))))])
            return empty

    # -- analyse and search ----------------------------------------------------------------

    async def Analyze(self, request: pb.AnalyzeRequest, grpc_context) -> pb.AnalyzeResponse:
        async def work(request_id: str) -> pb.AnalyzeResponse:
            image = request.image
            if request.image_url:
                if image:
                    raise InputError("send either image or image_url, not both", field="image_url")
                from router.url_fetch import fetch_image_url

                image = await fetch_image_url(
                    request.image_url, self.config.limits.url_fetch, self.config.limits.max_body_bytes
                )
            body = await self.analyze_image(image, request.task or None, request.tenant or None, request_id)
            return analyze_to_proto(body)

        return await self._grpc("Analyze", grpc_context, pb.AnalyzeResponse(), work)

    async def Search(self, request: pb.SearchRequest, grpc_context) -> pb.SearchResponse:
        async def work(request_id: str) -> pb.SearchResponse:
            search = getattr(self, "search_json", None)
            if search is None:
                grpc_context.set_code(grpc.StatusCode.UNIMPLEMENTED)
                grpc_context.set_details("search is not configured on this service")
                return pb.SearchResponse()
            try:
                filters = json.loads(request.filters_json) if request.filters_json else None
            except json.JSONDecodeError as exc:
                raise InputError(f"filters_json is not JSON: {exc}", field="filters_json") from None
            payload = {
                "query": request.query_text or None,
                "image": request.image or None,
                "item_id": request.item_id or None,
                "k": request.k or 10,
                "filters": filters,
                "tenant": request.tenant or None,
            }
            return pb.SearchResponse(result_json=json.dumps(await search(payload)))

        return await self._grpc("Search", grpc_context, pb.SearchResponse(), work)

    # -- review ----------------------------------------------------------------------------

    async def ListReviewItems(
        self, request: pb.ListReviewItemsRequest, grpc_context
    ) -> pb.ListReviewItemsResponse:
        async def work(request_id: str) -> pb.ListReviewItemsResponse:
            body = await asyncio.to_thread(
                self.list_review_items, request.status or "pending", request.limit or 50, request.offset
            )
            items = [pb.ReviewItem(item_json=json.dumps(item)) for item in body.pop("items")]
            return pb.ListReviewItemsResponse(items=items, stats_json=json.dumps(body))

        return await self._grpc("ListReviewItems", grpc_context, pb.ListReviewItemsResponse(), work)

    async def GetReviewItem(self, request: pb.GetReviewItemRequest, grpc_context) -> pb.ReviewItem:
        async def work(request_id: str) -> pb.ReviewItem:
            return pb.ReviewItem(
                item_json=json.dumps(await asyncio.to_thread(self.get_review_item, request.item_id))
            )

        return await self._grpc("GetReviewItem", grpc_context, pb.ReviewItem(), work)

    async def ClaimReviewItem(
        self, request: pb.ClaimReviewItemRequest, grpc_context
    ) -> pb.ClaimReviewItemResponse:
        from router.schemas import ClaimRequest

        async def work(request_id: str) -> pb.ClaimReviewItemResponse:
            try:
                body = ClaimRequest(
                    reviewer=request.reviewer,
                    item_id=request.item_id or None,
                    lease_s=request.lease_s or None,
                )
            except ValidationError as exc:
                raise input_error(exc) from None
            claimed = await asyncio.to_thread(self.claim, body)
            if claimed["item"] is None:
                return pb.ClaimReviewItemResponse()
            return pb.ClaimReviewItemResponse(
                item=pb.ReviewItem(item_json=json.dumps(claimed["item"])), lease_token=claimed["lease_token"]
            )

        return await self._grpc("ClaimReviewItem", grpc_context, pb.ClaimReviewItemResponse(), work)

    async def LabelReviewItem(self, request: pb.LabelReviewItemRequest, grpc_context) -> pb.ReviewItem:
        from router.schemas import LabelRequest

        async def work(request_id: str) -> pb.ReviewItem:
            try:
                body = LabelRequest.model_validate_json(request.label_json or "{}")
            except ValidationError as exc:
                raise input_error(exc) from None
            return pb.ReviewItem(
                item_json=json.dumps(await asyncio.to_thread(self.label, request.item_id, body))
            )

        return await self._grpc("LabelReviewItem", grpc_context, pb.ReviewItem(), work)

    # -- grpc.health.v1 ----------------------------------------------------------------------

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context
    ) -> health_pb2.HealthCheckResponse:
        """Standard health checking: "" (the server) and the VisionRoute service are SERVING
        when /readyz is ready (models loaded, queue writable), NOT_SERVING otherwise."""
        if request.service not in ("", SERVICE_NAME):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}; known: '' and {SERVICE_NAME!r}")
            return health_pb2.HealthCheckResponse()
        ready = (await self.readyz()).status_code == 200
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        return health_pb2.HealthCheckResponse(status=status)
