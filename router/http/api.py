"""The HTTP face: FastAPI routes that only translate to and from the service core.

Each route reads its input, calls one operation of ``router.services.VisionRouteService``
(reached through ``app.state.service``) with the caller the API-key middleware found, and
returns its typed result's JSON form (``to_json()``, router/services/results.py). Errors go through the one table in router/errors.py; the service and the key check come from
router/http/deps.py, so the sub-routers never import this module.

Every response to every route, errors included, belongs to one request id (the caller's
``X-Request-Id`` when well-formed, Ray Serve's or a new one otherwise): ``RequestContext``
settles it before anything else runs, and every error body carries it. An exception that is
no project error never reaches the client as text: it is logged with the request id and the
client gets a generic reason (router/errors.py ``unexpected_error``). Every 503 carries
Retry-After.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pydantic_core
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.auth.principal import current_principal
from router.errors import DEFAULT_RETRY_AFTER_S, error_body, http_status, retry_after_s, unexpected_error
from router.http.auth import ApiKeyMiddleware
from router.http.batch import AnalyzeBatchResponse, batch_images, batch_json
from router.http.deps import current_authenticator, service_of
from router.http.docs import install_docs
from router.http.drift import router as drift_router
from router.http.inputs import image_and_fields, read_body_limited
from router.http.models import router as models_router
from router.http.recalibrations import router as recalibrations_router
from router.http.review_page import REVIEW_ASSETS, review_asset
from router.http.reviewers import router as reviewers_router
from router.http.rollouts import router as rollouts_router
from router.http.search import router as search_router
from router.http.session import router as session_router
from router.schemas import AnalyzeResponse
from router.serve_context import serving_node
from router.services import ImageRequest, response_body
from router.services.common import checked_page, checked_request_id, parsed_json
from router.services.review_requests import ClaimRequest, LabelRequest, ReleaseRequest
from visionroute import __version__
from visionroute.errors import InputError, NotFound, RouterError
from visionroute.redaction import shown

log = logging.getLogger("visionroute.http")


class CheckedJsonRoute(APIRoute):
    """A route whose JSON body FastAPI parses itself (``body: ClaimRequest``). FastAPI's parser
    reads any size, any depth and lone surrogates; the body first passes the checks every other
    body passes (router/services/common.py ``parsed_json``), so it fails as a 4xx naming the field."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request) -> Response:
            content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
            body = await read_body_limited(request, service_of(request).config.limits.max_body_bytes)
            if body and content_type.lower() in ("application/json", ""):
                parsed_json(body, "body")
            return await handler(request)

        return checked


app = FastAPI(
    title="VisionRoute",
    version=__version__,
    description="Computer-vision answers from a cascade: ONNX tier, VLM, human review.",
    docs_url=None,  # router/http/docs.py serves /docs offline (no CDN)
    redoc_url=None,
)
app.router.route_class = CheckedJsonRoute
app.include_router(search_router)
app.include_router(rollouts_router)
app.include_router(reviewers_router)
app.include_router(recalibrations_router)
app.include_router(drift_router)
app.include_router(models_router)
app.include_router(session_router)
install_docs(app)


def error_response(
    error: RouterError, request_id: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    wait = retry_after_s(error)
    return JSONResponse(
        error_body(error, request_id),
        status_code=http_status(error),
        headers={**(headers or {}), **({"Retry-After": str(wait)} if wait is not None else {})},
    )


class RequestContext:
    """Outermost pure ASGI middleware: the request id, the last-resort error answer, Retry-After.

    The id (a well-formed ``X-Request-Id``, else a new one) is written back into the request's
    headers and ``request.state.request_id`` before the API-key check runs, so every error body,
    the key check's included, carries it. An exception no handler answered is logged here with
    the id and becomes ``unexpected_error``'s generic answer; a 503 without Retry-After gets one.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"x-request-id"]
        given = next((v for k, v in scope.get("headers", []) if k.lower() == b"x-request-id"), None)
        refused: RouterError | None = None
        try:
            request_id = checked_request_id(given.decode("latin-1") if given is not None else None)
        except RouterError as error:
            request_id, refused = checked_request_id(None), error
        scope["headers"] = [*headers, (b"x-request-id", request_id.encode("ascii"))]
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_retry_after(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = [(b"x-visionroute-node", serving_node().encode("ascii"))] if serving_node() else []
                names = {k.lower() for k, _ in message.get("headers", [])}
                if message["status"] == 503 and b"retry-after" not in names:
                    extra.append((b"retry-after", str(DEFAULT_RETRY_AFTER_S).encode()))
                if extra:
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if refused is not None:
            await error_response(refused, request_id)(scope, receive, send_with_retry_after)
            return
        try:
            await self.app(scope, receive, send_with_retry_after)
        except Exception as exc:
            log.exception("request %s: %s %s failed", request_id, scope.get("method"), scope.get("path"))
            if started:  # the answer is on its way; nothing sensible can be sent now
                return
            await error_response(unexpected_error(exc), request_id)(scope, receive, send_with_retry_after)


app.add_middleware(ApiKeyMiddleware, authenticator=current_authenticator)
app.add_middleware(RequestContext)  # added last: runs first


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


@app.exception_handler(RouterError)
async def _router_error(request: Request, error: RouterError) -> JSONResponse:
    return error_response(error, _request_id(request))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path")) or "body"
    return error_response(InputError(str(first["msg"]), field=field), _request_id(request))


class MethodNotAllowed(InputError):
    """No such method on this path (HTTP 405 keeps its own status; the body is ours)."""


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, method not allowed) in the project's error shape."""
    if error.status_code == 404:
        wrapped: RouterError = NotFound(f"no route {shown(request.url.path)}; see /docs", field="path")
    elif error.status_code == 405:
        wrapped = MethodNotAllowed(
            f"{request.method} is not allowed on {shown(request.url.path)}", field="method"
        )
    else:
        wrapped = InputError(str(error.detail), field="request")
    response = error_response(wrapped, _request_id(request), dict(error.headers or {}))
    if error.status_code not in (404,):
        response.status_code = error.status_code
    return response


# -- analyse -----------------------------------------------------------------------------------


class AnswerJSON(JSONResponse):
    """The analyse answers' JSON, encoded in one pass by pydantic's Rust encoder
    (``pydantic_core.to_json``): compact UTF-8 like Starlette's ``json.dumps``, about a quarter
    of its CPU on a trace. A NaN or infinity (JSON has neither) is sent as null, never a 500."""

    def render(self, content: Any) -> bytes:
        return pydantic_core.to_json(content, inf_nan_mode="null")


@app.post("/v1/analyze", response_model=AnalyzeResponse, summary="Analyse one image")
async def analyze(request: Request) -> JSONResponse:
    """Send ``multipart/form-data`` (``image`` file, optional ``task``, ``tenant``) or JSON
    (``image_base64`` or ``image_url``, ``task``, ``tenant``). Returns the decision, answer and trace."""
    started = time.perf_counter()
    request_id = _request_id(request) or checked_request_id(request.headers.get("x-request-id"))
    service = service_of(request)
    limits = service.config.limits
    image, task, tenant = await image_and_fields(request, limits.max_body_bytes, limits.url_fetch)
    analysis = await service.analyze.analyze(
        ImageRequest(image, request_id, task=task, tenant=tenant), current_principal()
    )
    response = AnswerJSON(response_body(analysis))
    # time inside this handler (body read to JSON encoded): `bench serve` splits it from transport
    response.headers["server-timing"] = f"app;dur={(time.perf_counter() - started) * 1000.0:.2f}"
    return response


@app.post("/v1/analyze/batch", response_model=AnalyzeBatchResponse, summary="Analyse several images")
async def analyze_batch(request: Request) -> JSONResponse:
    """Up to ``limits.batch_max_images`` images, each as /v1/analyze takes one: ``multipart/form-data``
    with one ``image`` file part per image, or JSON ``{"images": [{"image_base64"|"image_url"}...]}``;
    optional ``task`` and ``tenant`` for all. 200 with one result per image, in order, each with its
    own status, response or error (docs/api.md); 400 naming the field when the batch itself is wrong."""
    started = time.perf_counter()
    request_id = _request_id(request) or checked_request_id(request.headers.get("x-request-id"))
    service = service_of(request)
    limits = service.config.limits
    images, task, tenant = await batch_images(
        request, service.batch, limits.batch_max_body_bytes, limits.max_body_bytes, limits.url_fetch
    )
    result = await service.batch.analyze_batch(
        images, request_id, current_principal(), task=task, tenant=tenant
    )
    response = AnswerJSON(batch_json(result))
    response.headers["server-timing"] = f"app;dur={(time.perf_counter() - started) * 1000.0:.2f}"
    return response


# -- review ------------------------------------------------------------------------------------


@app.get("/v1/review/items", summary="List review items")
async def list_review_items(
    request: Request,
    status: str | None = "pending",
    limit: int = Query(50, description="items per page, 1-1000"),
    offset: int = Query(0, description="items to skip, >= 0"),
) -> dict[str, Any]:
    limit, offset = checked_page(limit, offset)
    page = await service_of(request).review.list_items(current_principal(), status, limit, offset)
    return page.to_json()


@app.get("/v1/review/items/{item_id}", summary="One review item")
async def get_review_item(request: Request, item_id: str) -> dict[str, Any]:
    return (await service_of(request).review.get(current_principal(), item_id)).to_json()


@app.get("/v1/review/items/{item_id}/image", summary="The stored image of a review item")
async def get_review_image(request: Request, item_id: str) -> Response:
    data, media_type = await service_of(request).review.image(current_principal(), item_id)
    return Response(data, media_type=media_type)


@app.get("/v1/review/items/{item_id}/audit", summary="Who did what to an item")
async def get_review_audit(request: Request, item_id: str) -> dict[str, Any]:
    return (await service_of(request).review.audit_log(current_principal(), item_id)).to_json()


@app.post("/v1/review/claim", summary="Lease the next (or a given) item to a reviewer")
async def claim(request: Request, body: ClaimRequest) -> dict[str, Any]:
    return (await service_of(request).review.claim(current_principal(), body)).to_json()


@app.post("/v1/review/items/{item_id}/release", summary="Give a claimed item back unlabelled (skip it)")
async def release(request: Request, item_id: str, body: ReleaseRequest) -> dict[str, Any]:
    return (await service_of(request).review.release(current_principal(), item_id, body)).to_json()


@app.post("/v1/review/items/{item_id}/label", summary="Submit a reviewer's label (idempotent)")
async def label(request: Request, item_id: str, body: LabelRequest) -> dict[str, Any]:
    return (await service_of(request).review.label(current_principal(), item_id, body)).to_json()


@app.get("/v1/review/labels/{task}", summary="The label set a task's reviewers may use")
async def review_labels(request: Request, task: str) -> dict[str, Any]:
    return (await service_of(request).review.label_set(task)).to_json()


@app.get("/v1/review/stats", summary="Queue depth, SLA and the audit estimates")
async def review_stats(request: Request) -> dict[str, Any]:
    return (await service_of(request).review.stats(current_principal())).to_json()


@app.get("/review", summary="The reviewers' web page", include_in_schema=False)
def review_page() -> Response:
    return review_asset("review.html")


@app.get("/review/{asset}", include_in_schema=False)
def review_page_asset(asset: str) -> Response:
    if asset not in REVIEW_ASSETS:
        raise NotFound(
            f"no review page asset {shown(asset)}; expected one of {sorted(REVIEW_ASSETS)}", field="asset"
        )
    return review_asset(asset)


# -- policies, metrics, health -----------------------------------------------------------------


@app.get("/v1/policy", summary="The running policy set, budgets and change history")
async def get_policy(request: Request) -> dict[str, Any]:
    return (await service_of(request).operations.policy()).to_json()


@app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    text = await service_of(request).operations.metrics_text()
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@app.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/readyz", summary="Readiness of every backend")
async def readyz(request: Request) -> JSONResponse:
    readiness = await service_of(request).operations.readiness(current_principal())
    return JSONResponse(readiness.to_json(), status_code=200 if readiness.ready else 503)


# The analyse routes are tried first: Starlette tries routes in order, and the seven included
# routers before them (each its own match pass) cost ~0.5 ms of CPU per analyse request (issue 24).
# No other route's path can match theirs, so the order changes nothing else.
HOT_PATHS = ("/v1/analyze", "/v1/analyze/batch")
app.router.routes.sort(key=lambda route: getattr(route, "path", None) not in HOT_PATHS)
