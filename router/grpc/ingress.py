"""The gRPC face: the RPCs of ``router/grpc/proto/visionroute.proto`` and grpc.health.v1.

``serve_config.yaml`` names ``router.grpc.ingress.add_VisionRouteServicer_to_server`` in
``grpc_options.grpc_servicer_functions`` (``router.grpc_ingress`` still works for one release).

Ray Serve's gRPC proxy (``grpc_options`` in serve_config.yaml) calls the ingress deployment's
method named like the RPC with the decoded request message. Each method here only
translates: proto in, one call to the service core (``self.service``, router/services/),
its typed result to proto out (router/grpc/messages.py: the typed fields, and for one release
the deprecated JSON fields too). A request's typed fields and its deprecated JSON field give the
core the same dict, validated as HTTP's body is; both at once is an InputError. A ``RouterError`` becomes the gRPC status of router/errors.py's table, with the
HTTP error body as JSON in the details, so both faces answer a failure the same way. Any
other exception is logged with the request id and answered generically (never its text, and
never Ray's traceback); UNAVAILABLE carries a ``retry-after`` trailer. The details stay far
below gRPC's 8 KiB metadata limit: echoed values are bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from pydantic import BaseModel, ValidationError

from router.auth.keys import key_from_headers
from router.auth.principal import Role, reset_principal, set_principal
from router.errors import error_body, grpc_code_name, retry_after_s, unexpected_error
from router.grpc import messages
from router.grpc.batch import batch_image, batch_response
from router.grpc.build import ensure_generated
from router.serve_context import serve_request_id
from router.services import ImageRequest, response_body
from router.services.common import checked_page, checked_request_id, parsed_json
from router.services.review_requests import ClaimRequest, LabelRequest, ReleaseRequest
from visionroute.errors import InputError, NotFound, RouterError
from visionroute.redaction import cut, shown

ensure_generated()
from router.grpc.proto import visionroute_pb2 as pb  # noqa: E402  (generated just above)
from router.grpc.proto import visionroute_pb2_grpc  # noqa: E402

log = logging.getLogger("visionroute.grpc")

# gRPC methods of router/grpc/proto/visionroute.proto and grpc.health.v1.
GRPC_ROLES: dict[str, Role | None] = {
    "Analyze": "client",
    "AnalyzeBatch": "client",
    "Search": "client",
    "ListReviewItems": "reviewer",
    "GetReviewItem": "reviewer",
    "ClaimReviewItem": "reviewer",
    "LabelReviewItem": "reviewer",
    "ReleaseReviewItem": "reviewer",
    "GetReviewImage": "reviewer",
    "GetReviewAudit": "reviewer",
    "GetReviewLabels": "reviewer",
    "GetReviewStats": "reviewer",
    "IndexSearchItem": "client",
    "GetSearchItem": "client",
    "DeleteSearchItem": "client",
    "GetSearchStats": "client",
    "GetPolicy": "admin",
    "Check": None,
    "Watch": None,
}

# For grpc_options.grpc_servicer_functions: importing this module generates the code first.
add_VisionRouteServicer_to_server = visionroute_pb2_grpc.add_VisionRouteServicer_to_server
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VisionRoute"].full_name
MAX_DETAILS_CHARS = 2048  # the status details (a JSON error body); gRPC's metadata limit is 8 KiB
WATCH_POLL_S = 5.0  # Health/Watch: how often readiness is re-checked while a watch is open
WATCH_MAX_S = 60.0  # ... and for how long one stream stays open (it holds an ingress slot)


def validated(model: type[BaseModel], /, **values: Any) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InputError(first["msg"], field=".".join(map(str, first["loc"])) or "body") from None


analyze_to_proto = messages.analyze_response  # its old name


def _request_id(grpc_context) -> str:
    return checked_request_id(grpc_context.request_id() or serve_request_id(), field="request_id")


def json_field(text: str, field: str) -> Any:
    """A ``*_json`` request field: None when empty, else bounded, checked JSON (common.parsed_json)."""
    return parsed_json(text, field) if text else None


def error_details(error: RouterError, request_id: str | None) -> str:
    """The status details: the HTTP error body as JSON, within MAX_DETAILS_CHARS however long
    the values the reason echoes."""
    body = error_body(error, request_id)
    details = json.dumps(body)
    if len(details) > MAX_DETAILS_CHARS:  # non-ASCII echoes grow six-fold as \uXXXX escapes
        body["reason"] = cut(body["reason"].encode("ascii", "backslashreplace").decode(), 512)
        body["field"] = cut(str(body["field"]).encode("ascii", "backslashreplace").decode(), 64)
        details = json.dumps(body)
    return details


def set_error(grpc_context, error: RouterError, request_id: str | None) -> None:
    grpc_context.set_code(getattr(grpc.StatusCode, grpc_code_name(error)))
    grpc_context.set_details(error_details(error, request_id))
    wait = retry_after_s(error)
    if wait is not None:
        grpc_context.set_trailing_metadata([("retry-after", str(wait))])


class GrpcEndpoints:
    """Mixed into ``router.ingress.Ingress``, which sets ``service`` and ``authenticator``."""

    async def _grpc(self, method: str, grpc_context, empty: Any, work: Callable[..., Awaitable[Any]]) -> Any:
        """Run ``work(caller, request_id)``; every failure becomes a status (never an exception)."""
        request_id = None
        try:
            try:
                request_id = _request_id(grpc_context)
            except RouterError:
                request_id = checked_request_id(None)  # the error below still names the bad one
                raise
            principal = (
                self.authenticator.authenticate(
                    key_from_headers(grpc_context.invocation_metadata()), GRPC_ROLES[method]
                )
                if GRPC_ROLES[method] is not None  # health checks: open to all, a key or not
                else None
            )
            token = set_principal(principal)
            try:
                return await work(principal, request_id)
            finally:
                reset_principal(token)
        except RouterError as error:
            set_error(grpc_context, error, request_id)
            return empty
        except Exception as exc:  # no exception text, no traceback reaches the client
            log.exception("request %s: gRPC %s failed", request_id, method)
            set_error(grpc_context, unexpected_error(exc), request_id)
            return empty

    # -- analyse and search ----------------------------------------------------------------

    async def Analyze(self, request: pb.AnalyzeRequest, grpc_context) -> pb.AnalyzeResponse:
        async def work(caller, request_id: str) -> pb.AnalyzeResponse:
            image = request.image
            if request.image_url:
                if image:
                    raise InputError("send either image or image_url, not both", field="image_url")
                from router.url_fetch import fetch_image_url

                limits = self.service.config.limits
                image = await fetch_image_url(request.image_url, limits.url_fetch, limits.max_body_bytes)
            analysis = await self.service.analyze.analyze(
                ImageRequest(image, request_id, task=request.task or None, tenant=request.tenant or None),
                caller,
            )
            return messages.analyze_response(response_body(analysis))

        return await self._grpc("Analyze", grpc_context, pb.AnalyzeResponse(), work)

    async def AnalyzeBatch(self, request: pb.AnalyzeBatchRequest, grpc_context) -> pb.AnalyzeBatchResponse:
        async def work(caller, request_id: str) -> pb.AnalyzeBatchResponse:
            batch, limits = self.service.batch, self.service.config.limits
            batch.check_count(len(request.images), "images")
            images = await asyncio.gather(
                *(batch_image(image, limits.max_body_bytes, limits.url_fetch) for image in request.images)
            )
            result = await batch.analyze_batch(
                images,
                request_id,
                caller,
                task=request.task or None,
                tenant=request.tenant or None,
                request_id_field="request_id",
            )
            return batch_response(result)

        return await self._grpc("AnalyzeBatch", grpc_context, pb.AnalyzeBatchResponse(), work)

    async def Search(self, request: pb.SearchRequest, grpc_context) -> pb.SearchResponse:
        async def work(caller, request_id: str) -> pb.SearchResponse:
            filters = json_field(request.filters_json, "filters_json")
            if filters is not None and not isinstance(filters, dict):
                raise InputError(
                    f"filters_json must be a JSON object, got {type(filters).__name__}", field="filters_json"
                )
            typed = messages.search_filters(request.filters) if request.HasField("filters") else None
            result = await self.service.search.search(
                caller,
                text=request.query_text or None,
                image=request.image or None,
                item_id=request.item_id or None,
                k=request.k or 10,
                filters=messages.one_of("filters_json", filters, "filters", typed),
                params=messages.search_params(request.params) if request.HasField("params") else None,
                tenant=request.tenant or None,
            )
            return messages.search_response(result)

        return await self._grpc("Search", grpc_context, pb.SearchResponse(), work)

    # -- review ----------------------------------------------------------------------------

    async def ListReviewItems(
        self, request: pb.ListReviewItemsRequest, grpc_context
    ) -> pb.ListReviewItemsResponse:
        async def work(caller, request_id: str) -> pb.ListReviewItemsResponse:
            limit, offset = checked_page(request.limit or 50, request.offset)
            page = await self.service.review.list_items(caller, request.status or "pending", limit, offset)
            return messages.review_page(page)

        return await self._grpc("ListReviewItems", grpc_context, pb.ListReviewItemsResponse(), work)

    async def GetReviewItem(self, request: pb.GetReviewItemRequest, grpc_context) -> pb.ReviewItem:
        async def work(caller, request_id: str) -> pb.ReviewItem:
            return messages.review_item(await self.service.review.get(caller, request.item_id))

        return await self._grpc("GetReviewItem", grpc_context, pb.ReviewItem(), work)

    async def ClaimReviewItem(
        self, request: pb.ClaimReviewItemRequest, grpc_context
    ) -> pb.ClaimReviewItemResponse:
        async def work(caller, request_id: str) -> pb.ClaimReviewItemResponse:
            body = validated(
                ClaimRequest,
                reviewer=request.reviewer,
                item_id=request.item_id or None,
                lease_s=request.lease_s or None,
            )
            return messages.claim(await self.service.review.claim(caller, body))

        return await self._grpc("ClaimReviewItem", grpc_context, pb.ClaimReviewItemResponse(), work)

    async def LabelReviewItem(self, request: pb.LabelReviewItemRequest, grpc_context) -> pb.ReviewItem:
        async def work(caller, request_id: str) -> pb.ReviewItem:
            label = json_field(request.label_json, "label_json")
            if not isinstance(label, (dict, type(None))):
                raise InputError(
                    f"label_json must be a JSON object, got {type(label).__name__}", field="label_json"
                )
            typed = messages.label_fields(request) or None
            body = validated(LabelRequest, **(messages.one_of("label_json", label, "label", typed) or {}))
            return messages.review_item(await self.service.review.label(caller, request.item_id, body))

        return await self._grpc("LabelReviewItem", grpc_context, pb.ReviewItem(), work)

    async def ReleaseReviewItem(self, request: pb.ReleaseReviewItemRequest, grpc_context) -> pb.ReviewItem:
        async def work(caller, request_id: str) -> pb.ReviewItem:
            body = validated(ReleaseRequest, reviewer=request.reviewer, lease_token=request.lease_token)
            return messages.review_item(await self.service.review.release(caller, request.item_id, body))

        return await self._grpc("ReleaseReviewItem", grpc_context, pb.ReviewItem(), work)

    async def GetReviewImage(self, request: pb.GetReviewItemRequest, grpc_context) -> pb.ReviewImage:
        async def work(caller, request_id: str) -> pb.ReviewImage:
            data, media_type = await self.service.review.image(caller, request.item_id)
            return pb.ReviewImage(image=data, media_type=media_type)

        return await self._grpc("GetReviewImage", grpc_context, pb.ReviewImage(), work)

    async def GetReviewAudit(self, request: pb.GetReviewItemRequest, grpc_context) -> pb.ReviewAudit:
        async def work(caller, request_id: str) -> pb.ReviewAudit:
            return messages.review_audit(await self.service.review.audit_log(caller, request.item_id))

        return await self._grpc("GetReviewAudit", grpc_context, pb.ReviewAudit(), work)

    async def GetReviewLabels(self, request: pb.GetReviewLabelsRequest, grpc_context) -> pb.ReviewLabels:
        async def work(caller, request_id: str) -> pb.ReviewLabels:
            return messages.review_labels(await self.service.review.label_set(request.task))

        return await self._grpc("GetReviewLabels", grpc_context, pb.ReviewLabels(), work)

    async def GetReviewStats(self, request: pb.Empty, grpc_context) -> pb.ReviewStats:
        async def work(caller, request_id: str) -> pb.ReviewStats:
            return messages.review_stats(await self.service.review.stats(caller))

        return await self._grpc("GetReviewStats", grpc_context, pb.ReviewStats(), work)

    # -- the search index --------------------------------------------------------------------

    async def IndexSearchItem(
        self, request: pb.IndexSearchItemRequest, grpc_context
    ) -> pb.IndexSearchItemResponse:
        async def work(caller, request_id: str) -> pb.IndexSearchItemResponse:
            metadata = json_field(request.metadata_json, "metadata_json")
            if metadata is not None and not isinstance(metadata, dict):
                raise InputError(
                    f"metadata_json must be a JSON object, got {type(metadata).__name__}",
                    field="metadata_json",
                )
            typed = messages.metadata_fields(request.metadata) if request.HasField("metadata") else None
            metadata = messages.one_of("metadata_json", metadata, "metadata", typed)
            return messages.indexed(await self.service.search.index(caller, request.image, metadata))

        return await self._grpc("IndexSearchItem", grpc_context, pb.IndexSearchItemResponse(), work)

    async def GetSearchItem(self, request: pb.SearchItemRequest, grpc_context) -> pb.SearchItem:
        async def work(caller, request_id: str) -> pb.SearchItem:
            return messages.search_item(await self.service.search.get(caller, request.item_id))

        return await self._grpc("GetSearchItem", grpc_context, pb.SearchItem(), work)

    async def DeleteSearchItem(
        self, request: pb.SearchItemRequest, grpc_context
    ) -> pb.DeleteSearchItemResponse:
        async def work(caller, request_id: str) -> pb.DeleteSearchItemResponse:
            return messages.deleted(await self.service.search.delete(caller, request.item_id))

        return await self._grpc("DeleteSearchItem", grpc_context, pb.DeleteSearchItemResponse(), work)

    async def GetSearchStats(self, request: pb.Empty, grpc_context) -> pb.SearchStats:
        async def work(caller, request_id: str) -> pb.SearchStats:
            return messages.search_stats(await self.service.search.stats(caller))

        return await self._grpc("GetSearchStats", grpc_context, pb.SearchStats(), work)

    async def GetPolicy(self, request: pb.Empty, grpc_context) -> pb.PolicyView:
        async def work(caller, request_id: str) -> pb.PolicyView:
            return messages.policy_view(await self.service.operations.policy())

        return await self._grpc("GetPolicy", grpc_context, pb.PolicyView(), work)

    # -- grpc.health.v1 ----------------------------------------------------------------------

    async def _health(self, request: health_pb2.HealthCheckRequest) -> int:
        if request.service not in ("", SERVICE_NAME):
            raise NotFound(
                f"unknown service {shown(request.service)}; known: '' and {SERVICE_NAME!r}", field="service"
            )
        readiness = await self.service.operations.readiness()
        serving = health_pb2.HealthCheckResponse.SERVING
        return serving if readiness.ready else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context
    ) -> health_pb2.HealthCheckResponse:
        """Standard health checking: "" (the server) and the VisionRoute service are SERVING
        when /readyz is ready (models loaded, queue writable), NOT_SERVING otherwise."""

        async def work(caller, request_id: str) -> health_pb2.HealthCheckResponse:
            return health_pb2.HealthCheckResponse(status=await self._health(request))

        return await self._grpc("Check", grpc_context, health_pb2.HealthCheckResponse(), work)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """grpc.health.v1 Watch, server streaming through Ray Serve's gRPC proxy: the current
        status at once, then each change (checked every WATCH_POLL_S). The stream ends after
        WATCH_MAX_S (a watch holds one of the ingress's few request slots); clients watch again,
        as the health-checking protocol expects of an ended stream.

        Ray Serve's proxy takes a streaming call's status from the context that travels with
        each yielded message, so a stream that yields nothing cannot fail with a status; as the
        protocol asks, an unknown service is answered SERVICE_UNKNOWN (not NOT_FOUND), and a
        readiness check that fails is NOT_SERVING (logged with the request id)."""
        request_id = grpc_context.request_id() or None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WATCH_MAX_S
        status = None
        while True:
            try:
                current = await self._health(request)
            except NotFound:
                current = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            except Exception:
                log.exception("request %s: gRPC Watch readiness check failed", request_id)
                current = health_pb2.HealthCheckResponse.NOT_SERVING
            if current != status:
                status = current
                yield health_pb2.HealthCheckResponse(status=status)
            if loop.time() + WATCH_POLL_S >= deadline:
                return
            await asyncio.sleep(WATCH_POLL_S)
