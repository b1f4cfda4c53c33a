"""The HTTP face: FastAPI routes that only translate to and from the service core.

Each route reads its input, calls one operation of ``router.services.VisionRouteService``
(reached through ``app.state.service``) with the caller the API-key middleware found, and
returns its result. Errors go through the one table in router/errors.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from router.errors import error_body, http_status, retry_after_s
from router.http_inputs import image_and_fields
from router.http_search import router as search_router
from router.review_page import REVIEW_ASSETS, review_asset
from router.schemas import AnalyzeResponse, ClaimRequest, LabelRequest, ReleaseRequest
from router.security import (
    ApiKeyMiddleware,
    Authenticator,
    SecurityConfig,
    current_principal,
    make_authenticator,
)
from router.services import ImageRequest, VisionRouteService, response_body
from router.services.common import checked_request_id
from visionroute import __version__
from visionroute.errors import BackendUnavailable, InputError, NotFound, RouterError

app = FastAPI(
    title="VisionRoute",
    version=__version__,
    description="Computer-vision answers from a cascade: ONNX tier, VLM, human review.",
)
app.include_router(search_router)


class _Attached:
    """The service this process serves. Ray Serve serves a frozen copy of ``app``, so the
    routes and the key check reach the service through this module, not through the app."""

    service: VisionRouteService | None = None
    authenticator: Authenticator | None = None


def attach(service: VisionRouteService, security: SecurityConfig) -> Authenticator:
    """Serve ``service`` behind the API-key check (refuses an unsafe bind); one per process."""
    _Attached.authenticator = make_authenticator(security)
    _Attached.service = service
    return _Attached.authenticator


def current_authenticator() -> Authenticator:
    if _Attached.authenticator is None:
        raise BackendUnavailable("the service is starting", field="service")
    return _Attached.authenticator


def service_of(request: Request | None = None) -> VisionRouteService:
    if _Attached.service is None:
        raise BackendUnavailable("the service is starting", field="service")
    return _Attached.service


app.add_middleware(ApiKeyMiddleware, authenticator=current_authenticator)


@app.exception_handler(RouterError)
async def _router_error(request: Request, error: RouterError) -> JSONResponse:
    wait = retry_after_s(error)
    return JSONResponse(
        error_body(error, getattr(request.state, "request_id", None)),
        status_code=http_status(error),
        headers={"Retry-After": str(wait)} if wait is not None else None,
    )


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path")) or "body"
    return await _router_error(request, InputError(str(first["msg"]), field=field))


# -- analyse -----------------------------------------------------------------------------------


@app.post("/v1/analyze", response_model=AnalyzeResponse, summary="Analyse one image")
async def analyze(request: Request) -> JSONResponse:
    """Send ``multipart/form-data`` (``image`` file, optional ``task``, ``tenant``) or JSON
    (``image_base64`` or ``image_url``, ``task``, ``tenant``). Returns the decision, answer and trace."""
    request_id = checked_request_id(request.headers.get("x-request-id"))
    request.state.request_id = request_id
    service = service_of(request)
    limits = service.config.limits
    image, task, tenant = await image_and_fields(request, limits.max_body_bytes, limits.url_fetch)
    analysis = await service.analyze.analyze(
        ImageRequest(image, request_id, task=task, tenant=tenant), current_principal()
    )
    return JSONResponse(response_body(analysis))


# -- review ------------------------------------------------------------------------------------


@app.get("/v1/review/items", summary="List review items")
async def list_review_items(
    request: Request, status: str | None = "pending", limit: int = 50, offset: int = 0
) -> dict[str, Any]:
    return await service_of(request).review.list_items(current_principal(), status, limit, offset)


@app.get("/v1/review/items/{item_id}", summary="One review item")
async def get_review_item(request: Request, item_id: str) -> dict[str, Any]:
    return await service_of(request).review.get(current_principal(), item_id)


@app.get("/v1/review/items/{item_id}/image", summary="The stored image of a review item")
async def get_review_image(request: Request, item_id: str) -> Response:
    data, media_type = await service_of(request).review.image(current_principal(), item_id)
    return Response(data, media_type=media_type)


@app.get("/v1/review/items/{item_id}/audit", summary="Who did what to an item")
async def get_review_audit(request: Request, item_id: str) -> dict[str, Any]:
    return await service_of(request).review.audit_log(current_principal(), item_id)


@app.post("/v1/review/claim", summary="Lease the next (or a given) item to a reviewer")
async def claim(request: Request, body: ClaimRequest) -> dict[str, Any]:
    return await service_of(request).review.claim(current_principal(), body)


@app.post("/v1/review/items/{item_id}/release", summary="Give a claimed item back unlabelled (skip it)")
async def release(request: Request, item_id: str, body: ReleaseRequest) -> dict[str, Any]:
    return await service_of(request).review.release(current_principal(), item_id, body)


@app.post("/v1/review/items/{item_id}/label", summary="Submit a reviewer's label (idempotent)")
async def label(request: Request, item_id: str, body: LabelRequest) -> dict[str, Any]:
    return await service_of(request).review.label(current_principal(), item_id, body)


@app.get("/v1/review/labels/{task}", summary="The label set a task's reviewers may use")
async def review_labels(request: Request, task: str) -> dict[str, Any]:
    return await service_of(request).review.label_set(task)


@app.get("/v1/review/stats", summary="Queue depth, SLA and the audit estimates")
async def review_stats(request: Request) -> dict[str, Any]:
    return await service_of(request).review.stats()


@app.get("/review", summary="The reviewers' web page", include_in_schema=False)
def review_page() -> Response:
    return review_asset("review.html")


@app.get("/review/{asset}", include_in_schema=False)
def review_page_asset(asset: str) -> Response:
    if asset not in REVIEW_ASSETS:
        raise NotFound(
            f"no review page asset {asset!r}; expected one of {sorted(REVIEW_ASSETS)}", field="asset"
        )
    return review_asset(asset)


# -- policies, metrics, health -----------------------------------------------------------------


@app.get("/v1/policy", summary="The running policy set, budgets and change history")
async def get_policy(request: Request) -> dict[str, Any]:
    return await service_of(request).operations.policy()


@app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    text = await service_of(request).operations.metrics_text()
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@app.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/readyz", summary="Readiness of every backend")
async def readyz(request: Request) -> JSONResponse:
    ready, checks = await service_of(request).operations.readiness()
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
