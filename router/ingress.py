"""The HTTP ingress: ``/v1/analyze``, the review endpoints, health and readiness.

Only this module maps ``RouterError`` subclasses to status codes. Everything a request
needs goes into its ``Analysis``; the cascade itself lives in ``cascades.pipeline``.
"""

import asyncio
import base64
import binascii
import io
import logging
import os
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile

from cascades.images import decode_image
from cascades.pipeline import run_cascade
from policies.budgets import BudgetLedger
from policies.costs import costs_by_tier, review_value
from policies.policy_set import PolicySet
from policies.review_queue import ReviewQueue
from policies.runtime import PolicyRuntime, Refusal
from router.config import AppConfig
from router.grpc_ingress import GrpcEndpoints
from router.limits import read_limited
from router.metrics import IngressMetrics
from router.review_page import REVIEW_ASSETS, review_asset
from router.schemas import AnalyzeJson, AnalyzeResponse, ClaimRequest, LabelRequest, ReleaseRequest
from router.search_api import router as search_router
from router.search_api import search_by
from router.security import PermissionDenied, Unauthenticated, install_security, resolve_tenant, tenant_scope
from router.tiers import BatchedOnnxTier, InProcessTier, RemoteTier
from router.url_fetch import UrlFetchConfig, fetch_image_url
from visionroute import __version__
from visionroute.errors import (
    BackendUnavailable,
    BudgetExceeded,
    ConfigError,
    Conflict,
    InputError,
    NotFound,
    PayloadTooLarge,
    RouterError,
    UnsupportedMediaType,
)
from visionroute.records import Analysis, Decision, Step, Trace

log = logging.getLogger("visionroute.ingress")

# Most specific first: the first isinstance match wins.
STATUS_BY_ERROR: tuple[tuple[type[RouterError], int], ...] = (
    (Unauthenticated, 401),
    (PermissionDenied, 403),
    (PayloadTooLarge, 413),
    (UnsupportedMediaType, 415),
    (InputError, 400),
    (NotFound, 404),
    (Conflict, 409),
    (BudgetExceeded, 429),
    (BackendUnavailable, 503),
    (ConfigError, 422),
)
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

app = FastAPI(
    title="VisionRoute",
    version=__version__,
    description="Computer-vision answers from a cascade: ONNX tier, VLM, human review.",
)
app.include_router(search_router)


def status_for(error: RouterError) -> int:
    return next((status for kind, status in STATUS_BY_ERROR if isinstance(error, kind)), 500)


@app.exception_handler(RouterError)
async def _router_error(request: Request, error: RouterError) -> JSONResponse:
    headers = {}
    if isinstance(error, BudgetExceeded):
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    request_id = getattr(request.state, "request_id", None)
    return JSONResponse(
        {**error.to_dict(), "request_id": request_id}, status_code=status_for(error), headers=headers
    )


async def read_body_limited(request: Request, max_bytes: int) -> bytes:
    """The whole body, refusing early when it is (or declares to be) over the limit."""
    body = await read_limited(
        request.stream(),
        declared=request.headers.get("content-length"),
        max_bytes=max_bytes,
        field="body",
        what="body",
    )
    request._body = body  # lets request.form() parse what was already read
    return body


async def image_and_fields(
    request: Request, max_bytes: int, url_fetch: UrlFetchConfig | None = None
) -> tuple[bytes, str | None, str | None]:
    """(image bytes, task, tenant) from a multipart upload or a JSON body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("multipart/form-data", "application/json"):
        raise UnsupportedMediaType(
            f"content type {content_type or 'none'!r} is not accepted; send multipart/form-data "
            "with an 'image' file or application/json with 'image_base64'",
            field="content-type",
        )
    body = await read_body_limited(request, max_bytes)
    if not body:
        raise InputError("request body is empty", field="body")
    if content_type == "application/json":
        try:
            payload = AnalyzeJson.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InputError(first["msg"], field=".".join(map(str, first["loc"])) or "body") from None
        if payload.image_url is not None:
            image = await fetch_image_url(payload.image_url, url_fetch or UrlFetchConfig(), max_bytes)
            return image, payload.task, payload.tenant
        try:
            image = base64.b64decode(payload.image_base64, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("not valid base64", field="image_base64") from None
        return image, payload.task, payload.tenant
    try:
        form = await request.form()
    except Exception as exc:  # starlette raises its own multipart errors
        raise InputError(f"malformed multipart body: {exc}", field="body") from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise InputError("multipart body has no 'image' file field", field="image")
    image = await upload.read()
    tenant = str(form.get("tenant")) if form.get("tenant") else None  # None: the API key's tenant
    if tenant is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", tenant):
        raise InputError("tenant must be 1-128 characters from [A-Za-z0-9_.-]", field="tenant")
    task = form.get("task")
    return image, (str(task) if task else None), tenant


@serve.deployment(max_ongoing_requests=100)
@serve.ingress(app)
class Ingress(GrpcEndpoints):  # + the gRPC methods (router/grpc_ingress.py)
    def __init__(
        self,
        config: dict[str, Any],
        tiers: dict[str, DeploymentHandle],
        vlm_tiers: dict[str, DeploymentHandle],
        search: DeploymentHandle | None = None,
    ) -> None:
        self.config = AppConfig.model_validate(config)
        self.search = search
        app.state.search = search  # router/search_api.py reaches the SearchTier through this
        self.security = install_security(app, self.config.security)  # API keys; refuses an unsafe bind
        self.tiers = {
            task: RemoteTier(tiers[task])
            if cascade.placement == "deployment"
            else InProcessTier(
                BatchedOnnxTier(
                    cascade.tier.model_dump(),
                    str(self.config.models_dir),
                    cascade.max_batch_size,
                    cascade.batch_wait_timeout_ms,
                )
            )
            for task, cascade in self.config.cascades.items()
        }
        self.vlm_tiers = vlm_tiers
        self.queue = ReviewQueue(self.config.review.path, default_lease_s=self.config.review.lease_s)
        self.policies = PolicyRuntime(
            self.config.policies,
            BudgetLedger(self.config.review.path / "budgets.sqlite3"),
            tasks=self.config.cascades,
            base_thresholds={task: cascade.policy for task, cascade in self.config.cascades.items()},
        )
        self.metrics = IngressMetrics(self.policies, self.queue)
        self._label_sets_stored: set[str] = set()
        log.info("ingress ready: tasks %s, review queue %s", sorted(tiers), self.queue.db_path)

    # -- analyse ---------------------------------------------------------------------------

    @app.post("/v1/analyze", response_model=AnalyzeResponse, summary="Analyse one image")
    async def analyze(self, request: Request) -> JSONResponse:
        """Send ``multipart/form-data`` (``image`` file, optional ``task``, ``tenant``) or JSON
        (``image_base64``, ``task``, ``tenant``). Returns the decision, answer and trace."""
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        if not REQUEST_ID_PATTERN.fullmatch(request_id):
            raise InputError(
                "X-Request-Id must be 1-128 characters from [A-Za-z0-9_.:-]", field="X-Request-Id"
            )
        request.state.request_id = request_id
        limits = self.config.limits
        image_bytes, task, tenant = await image_and_fields(request, limits.max_body_bytes, limits.url_fetch)
        return JSONResponse(await self.analyze_image(image_bytes, task, tenant, request_id))

    async def analyze_image(
        self, image_bytes: bytes, task: str | None, tenant: str | None, request_id: str
    ) -> dict[str, Any]:
        """The cascade for one image; HTTP and gRPC (router/grpc_ingress.py) both call this."""
        limits = self.config.limits
        tenant = resolve_tenant(tenant)  # the key's tenant; another one only for admins
        task = task or self.config.default_task
        if task not in self.tiers:
            raise InputError(f"unknown task {task!r}; expected one of {sorted(self.tiers)}", field="task")
        decoded = decode_image(
            image_bytes,
            max_bytes=limits.max_body_bytes,
            max_pixels=limits.max_pixels,
            allowed_formats=tuple(limits.allowed_formats),
        )
        analysis = Analysis(
            image_rgb=decoded.rgb,
            image_sha256=decoded.sha256,
            task=task,
            tenant=tenant,
            trace=Trace(request_id),
        )
        analysis.trace.append(
            Step(
                stage="input",
                details={
                    "format": decoded.format,
                    "bytes": len(image_bytes),
                    "width": analysis.width,
                    "height": analysis.height,
                },
            )
        )
        cascade = self.config.cascades[task]
        vlm = None
        if task in self.vlm_tiers:
            vlm_tier = self.vlm_tiers[task]

            async def vlm(escalated: Analysis) -> Analysis:
                return await vlm_tier.run.remote(escalated)

        policy = self.policies.current  # one policy version decides the whole request
        analysis = await self._run_budgeted(
            analysis, policy, cascade.tier.cost_units, self.tiers[task].predict, vlm
        )
        if analysis.decision in (Decision.REVIEW, Decision.ESCALATE):
            await self._enqueue(analysis, image_bytes, policy)
        elif self.policies.audit_sampled(policy, analysis):
            await self._enqueue(analysis, image_bytes, policy, kind="audit")
        self.metrics.decisions.labels(task, getattr(analysis.decision, "value", "none"), policy.version).inc()
        await self._index_for_search(analysis)
        self.metrics.observe_trace(task, analysis.trace)
        degraded = any(step.details.get("degraded") for step in analysis.trace)
        # Ray Serve's proxy assigns X-Request-Id (or keeps the caller's) and echoes it back.
        return {**self._response(analysis), "policy_version": policy.version, "degraded": degraded}

    async def search_json(self, payload: dict[str, Any]) -> dict[str, Any]:
        """gRPC Search (router/grpc_ingress.py): the same search, scoping and errors as HTTP."""
        return await search_by(
            self.search,
            text=payload.get("query"),
            image=payload.get("image"),
            item_id=payload.get("item_id"),
            k=payload.get("k", 10),
            filters=payload.get("filters"),
            tenant=payload.get("tenant"),
        )

    async def _index_for_search(self, analysis: Analysis) -> None:
        """retrieval.index_analysed: make the analysed image searchable; a failure is recorded
        in the trace and never changes the decision."""
        if self.search is None or not self.config.retrieval.index_analysed:
            return
        started = time.perf_counter()
        try:
            item_id = await self.search.call.remote("index_analysis", analysis)
            analysis.trace.append(
                Step(
                    stage="retrieval:index",
                    reason="indexed for visual search",
                    details={"search_id": item_id},
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                )
            )
        except Exception as exc:
            log.warning("indexing %s for search failed: %s", analysis.trace.request_id, exc)
            analysis.trace.append(
                Step(
                    stage="retrieval:index",
                    reason="not indexed",
                    error=f"{type(exc).__name__}: {exc}",
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                )
            )

    async def _run_budgeted(
        self, analysis: Analysis, policy: PolicySet, units: float, cheap_tier, vlm
    ) -> Analysis:
        """The cascade with each paid call reserved first (policies.budgets) and settled after."""
        reservation = await asyncio.to_thread(self.policies.reserve, policy, analysis, "onnx", units)
        if isinstance(reservation, Refusal):
            return self._degrade(analysis, policy, reservation, answered=False)
        if vlm is not None:
            vlm = self._budgeted_vlm(vlm, policy)
        try:
            thresholds = self.policies.thresholds(policy, analysis.task)
            analysis = await run_cascade(analysis, cheap_tier=cheap_tier, policy=thresholds, vlm=vlm)
        finally:
            await asyncio.to_thread(
                self.policies.ledger.settle, reservation, costs_by_tier(analysis.trace)["onnx"]
            )
        return analysis

    def _budgeted_vlm(self, vlm, policy: PolicySet):
        async def budgeted(escalated: Analysis) -> Analysis:
            reservation = await asyncio.to_thread(
                self.policies.reserve, policy, escalated, "vlm", policy.costs.vlm_reserve_units
            )
            if isinstance(reservation, Refusal):
                return self._degrade(escalated, policy, reservation, answered=True)
            spent_before = costs_by_tier(escalated.trace)["vlm"]
            try:
                result = await vlm(escalated)
            except BaseException:
                await asyncio.to_thread(
                    self.policies.ledger.settle, reservation
                )  # it may have run: charge the reservation
                raise
            await asyncio.to_thread(
                self.policies.ledger.settle, reservation, costs_by_tier(result.trace)["vlm"] - spent_before
            )
            return result

        return budgeted

    def _degrade(
        self, analysis: Analysis, policy: PolicySet, refusal: Refusal, *, answered: bool
    ) -> Analysis:
        """Apply the exhausted budget's degrade mode; raise BudgetExceeded (429) when it is reject."""
        name = refusal.error.rule.name
        self.metrics.budget_refusals.labels(name, refusal.mode).inc()
        if refusal.mode == "review":
            analysis.trace.append(
                refusal.step(
                    policy.version,
                    Decision.REVIEW,
                    f"budget {name!r} is exhausted; degrade mode review: a human decides",
                )
            )
            return analysis
        if refusal.mode == "accept_degraded" and answered and analysis.detections is not None:
            analysis.trace.append(
                refusal.step(
                    policy.version,
                    Decision.ACCEPT,
                    f"budget {name!r} is exhausted; degrade mode accept_degraded: the cheap answer stands, flagged degraded",
                )
            )
            return analysis
        if refusal.mode == "accept_degraded":
            refusal.error.reason += "; degrade mode accept_degraded has no cheap answer to give yet"
        raise refusal.error

    async def _enqueue(
        self, analysis: Analysis, image_bytes: bytes, policy: PolicySet, kind: str = "review"
    ) -> None:
        """Durably queue for review (or audit); if that fails the request fails (503), never silently.

        A review is paid work: its cost is reserved on review budgets first, and an exhausted
        budget applies its degrade mode. Audit samples are the safety net and are never skipped.
        """
        if kind == "review" and any(step.stage == "policy:budget" for step in analysis.trace):
            kind = "budget"
        units = policy.costs.review_units
        if kind == "audit":  # no budget gates an audit; its cost is still recorded
            reservation = self.policies.ledger.reserve(
                [], tenant=analysis.tenant, feature=analysis.task, tier="review", units=units
            )
        else:
            reservation = await asyncio.to_thread(self.policies.reserve, policy, analysis, "review", units)
        if isinstance(reservation, Refusal):
            self._degrade(analysis, policy, reservation, answered=True)
            return
        reasons = [s.reason for s in analysis.trace if s.decision in (Decision.REVIEW, Decision.ESCALATE)]
        started = time.perf_counter()
        score = next((s.score for s in reversed(analysis.trace.steps) if s.score is not None), None)
        detections = analysis.detections
        label_set = (
            detections.class_names
            if detections is not None and analysis.task not in self._label_sets_stored
            else None
        )
        reason = (
            f"audit sample ({policy.audit.fraction:.1%} of auto-accepts)"
            if kind == "audit"
            else (reasons[-1] if reasons else "review")
        )
        try:
            item = await asyncio.to_thread(
                self.queue.enqueue,
                request_id=analysis.trace.request_id,
                image_bytes=image_bytes,
                image_sha256=analysis.image_sha256,
                tenant=analysis.tenant,
                task=analysis.task,
                reason=reason,
                proposed=detections.to_dicts() if detections is not None else [],
                trace=analysis.trace.to_dict(),
                priority=review_value(score, policy.review.error_cost(analysis.task)),
                kind=kind,
                sla_s=policy.review.sla_s,
                label_set=label_set,
            )
        except Exception as exc:
            await asyncio.to_thread(self.policies.ledger.release, reservation)
            log.exception("review queue write failed for %s", analysis.trace.request_id)
            raise BackendUnavailable(
                f"the review queue could not store the item: {exc}", field="review_queue"
            ) from None
        await asyncio.to_thread(self.policies.ledger.settle, reservation)
        if label_set:
            self._label_sets_stored.add(analysis.task)
        if kind != "audit":
            analysis.review_item_id = item.id
        analysis.trace.append(
            Step(
                stage="review_queue" if kind != "audit" else "review_queue:audit",
                decision=Decision.REVIEW if kind != "audit" else None,  # an audit never changes the answer
                reason=f"queued for human review as item {item.id}"
                if kind != "audit"
                else f"{reason}: item {item.id}",
                policy_version=policy.version,
                cost_units=units,
                latency_ms=(time.perf_counter() - started) * 1000.0,
                details={"item_id": item.id, "kind": kind, "priority": item.priority},
            )
        )

    @staticmethod
    def _response(analysis: Analysis) -> dict[str, Any]:
        trace = analysis.trace.to_dict()
        return {
            "request_id": analysis.trace.request_id,
            "task": analysis.task,
            "decision": trace["decision"],
            "answer": analysis.detections.to_dicts() if analysis.detections is not None else [],
            "image": {"sha256": analysis.image_sha256, "width": analysis.width, "height": analysis.height},
            "review_item_id": analysis.review_item_id,
            "cost_units": trace["cost_units"],
            "trace": trace,
        }

    # -- review ----------------------------------------------------------------------------

    @app.get("/v1/review/items", summary="List review items")
    def list_review_items(
        self, status: str | None = "pending", limit: int = 50, offset: int = 0
    ) -> dict[str, Any]:
        if status == "all":
            status = None
        items = self.queue.list_items(status=status, tenant=tenant_scope(), limit=limit, offset=offset)
        return {"items": [item.public_dict() for item in items], **self.queue.stats()}

    @app.get("/v1/review/items/{item_id}", summary="One review item")
    def get_review_item(self, item_id: str) -> dict[str, Any]:
        return self.queue.get(item_id, tenant=tenant_scope()).public_dict()

    @app.get("/v1/review/items/{item_id}/image", summary="The stored image of a review item")
    def get_review_image(self, item_id: str) -> Response:
        self.queue.get(item_id, tenant=tenant_scope())  # other tenants' items do not exist
        data = self.queue.image(item_id)  # 404 naming the retention policy once the image is purged
        image_format = Image.open(io.BytesIO(data)).format or "octet-stream"
        return Response(data, media_type=Image.MIME.get(image_format, "application/octet-stream"))

    @app.get("/v1/review/items/{item_id}/audit", summary="Who did what to an item")
    def get_review_audit(self, item_id: str) -> dict[str, Any]:
        self.queue.get(item_id, tenant=tenant_scope())
        return {"item_id": item_id, "events": self.queue.audit_log(item_id)}

    @app.post("/v1/review/claim", summary="Lease the next (or a given) item to a reviewer")
    def claim(self, body: ClaimRequest) -> dict[str, Any]:
        item = self.queue.claim(
            body.reviewer, item_id=body.item_id, tenant=tenant_scope(), lease_s=body.lease_s
        )
        if item is None:
            return {"item": None, "lease_token": None}
        return {"item": item.public_dict(), "lease_token": item.lease_token}

    @app.post("/v1/review/items/{item_id}/release", summary="Give a claimed item back unlabelled (skip it)")
    def release(self, item_id: str, body: ReleaseRequest) -> dict[str, Any]:
        self.queue.get(item_id, tenant=tenant_scope())  # another tenant's item does not exist here
        return self.queue.release(item_id, reviewer=body.reviewer, lease_token=body.lease_token).public_dict()

    @app.post("/v1/review/items/{item_id}/label", summary="Submit a reviewer's label (idempotent)")
    def label(self, item_id: str, body: LabelRequest) -> dict[str, Any]:
        item = self.queue.get(item_id, tenant=tenant_scope())
        if body.verdict == "confirm":
            label = {
                "verdict": "confirm",
                "label": item.proposed[0]["label"] if item.proposed else None,
                "boxes": item.proposed,
            }
        elif body.verdict == "correct":
            if body.label is None and body.boxes is None:
                raise InputError("a 'correct' verdict needs 'label' or 'boxes'", field="label")
            label = {
                "verdict": "correct",
                "label": body.label,
                "boxes": [b.model_dump() for b in body.boxes] if body.boxes is not None else None,
            }
        else:
            label = {"verdict": "reject", "label": None, "boxes": None}
        if body.note:
            label["note"] = body.note
        item = self.queue.submit_label(
            item_id, reviewer=body.reviewer, lease_token=body.lease_token, label=label
        )
        if item.kind == "audit":  # a new audited outcome: refresh the accepted-error estimate (logs an alert)
            self.policies.audit_estimate(self.queue, item.task)
        if self.search is not None and self.config.retrieval.index_analysed:
            try:  # the label is stored either way; the search tags follow when they can
                self.search.call.remote("apply_review_label", item.id, item.label).result(timeout_s=30)
            except Exception as exc:
                log.warning("review label of %s not copied to the search index: %s", item.id, exc)
        return item.public_dict()

    @app.get("/v1/review/labels/{task}", summary="The label set a task's reviewers may use")
    def review_labels(self, task: str) -> dict[str, Any]:
        if task not in self.config.cascades:
            raise NotFound(
                f"unknown task {task!r}; expected one of {sorted(self.config.cascades)}", field="task"
            )
        return {"task": task, "labels": self.queue.label_set(task)}

    @app.get("/v1/review/stats", summary="Queue depth, SLA and the audit estimates")
    def review_stats(self) -> dict[str, Any]:
        audits = {
            task: self.policies.audit_estimate(self.queue, task).to_dict() for task in self.config.cascades
        }
        return {**self.queue.stats(), "sla_s": self.policies.current.review.sla_s, "audit": audits}

    @app.get("/review", summary="The reviewers' web page", include_in_schema=False)
    def review_page(self) -> Response:
        return review_asset("review.html")

    @app.get("/review/{asset}", include_in_schema=False)
    def review_page_asset(self, asset: str) -> Response:
        if asset not in REVIEW_ASSETS:
            raise NotFound(
                f"no review page asset {asset!r}; expected one of {sorted(REVIEW_ASSETS)}", field="asset"
            )
        return review_asset(asset)

    # -- policies ---------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Ray Serve calls this with the Ingress ``user_config`` (a PolicySet) on every change,
        without restarting the replica. An invalid set is refused and the running set stays.

        It does not raise: Ray Serve 2.60 answers a raising ``reconfigure`` by marking the
        deployment DEPLOY_FAILED and routing nothing to it. The refusal is logged at ERROR,
        counted in ``visionroute_policy_reconfigurations_total{result="rejected"}`` and listed
        in ``GET /v1/policy``; ``visionroute policies check`` validates a set before deploying.
        """
        try:
            self.policies.reconfigure(user_config)
        except ConfigError:
            self.metrics.reconfigurations.labels("rejected").inc()
            return
        self.metrics.reconfigurations.labels("applied").inc()

    @app.get("/v1/policy", summary="The running policy set, budgets and change history")
    def get_policy(self) -> dict[str, Any]:
        policy = self.policies.current
        return {
            "version": policy.version,
            "policy": policy.model_dump(mode="json"),
            "budgets": self.policies.ledger.status(policy.budgets),
            "history": self.policies.history[-20:],
            "replica_pid": os.getpid(),  # lets a test or operator see that a change needed no restart
        }

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def prometheus_metrics(self) -> Response:
        if self.search is not None:
            try:
                stats = await asyncio.wait_for(self.search.call.remote("stats"), timeout=5.0)
                self.metrics.index_items.set(float(stats["items"]))
            except Exception as exc:  # a scrape must not fail because search is down
                log.warning("search stats unavailable for /metrics: %s", exc)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- health ----------------------------------------------------------------------------

    @app.get("/healthz", summary="Liveness")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness of every backend")
    async def readyz(self) -> JSONResponse:
        checks: dict[str, Any] = {}
        for task, tier in self.tiers.items():
            try:
                checks[f"tier:{task}"] = await asyncio.wait_for(tier.describe(), timeout=5.0)
            except Exception as exc:
                checks[f"tier:{task}"] = {"error": f"{type(exc).__name__}: {exc}"}
        for task, vlm_tier in self.vlm_tiers.items():
            try:  # informative only: a VLM that is down degrades to review, the service stays ready
                checks[f"vlm:{task}"] = await asyncio.wait_for(vlm_tier.describe.remote(), timeout=5.0)
            except Exception as exc:
                checks[f"vlm:{task}"] = {"error": f"{type(exc).__name__}: {exc}"}
        if self.search is not None:  # enabled search is a required backend: its index must be loaded
            try:
                checks["search_index"] = await asyncio.wait_for(self.search.call.remote("stats"), timeout=5.0)
            except Exception as exc:
                checks["search_index"] = {"error": f"{type(exc).__name__}: {exc}"}
        checks["review_queue"] = {"writable": await asyncio.to_thread(self.queue.is_writable)}
        required = [v for k, v in checks.items() if k.startswith("tier:") or k == "search_index"]
        ready = all("error" not in v for v in required) and checks["review_queue"]["writable"]
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
