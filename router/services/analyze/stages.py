"""The analyse path's own stages (the cascade's are in cascades/pipeline.py, the budget's
wrappers in budget.py, the rollout's evidence in rollout.py); their order is declared in
pipeline.py. Each has one job; the trace step it appends, if any, is named in its docstring.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping, Set
from typing import TYPE_CHECKING, Any

from cascades.decode_budget import InputNeed, in_file_pixels
from cascades.image_redaction import Redactor
from policies.audit_sampling import inclusion_probability, is_sampled, rollout_audit_fraction
from policies.review_queue import ReviewQueue
from policies.runtime import PolicyRuntime
from router.auth.principal import resolve_tenant
from router.config import AppConfig
from router.drift.audit_raise import audit_fraction_now
from router.metrics import IngressMetrics
from router.services.analyze.context import QueueTicket, RequestContext
from router.services.analyze.grouped_writes import review_writes
from router.services.backends import CheapTierClient, SearchBackend, VlmTierClient
from router.services.common import checked_tenant
from router.services.rollouts import Arm, queue_priority
from visionroute.errors import BackendUnavailable, InputError, RouterError
from visionroute.records import Analysis, Decision, Step, Trace
from visionroute.redaction import failure_summary

if TYPE_CHECKING:
    from router.services.analyze.after_response import IndexQueue
    from router.services.rollouts import RolloutService

log = logging.getLogger("visionroute.service.analyze")


def last_score(analysis: Analysis) -> float | None:
    """The score of the last step that had one (the answer's, as the last tier judged it)."""
    return next((s.score for s in reversed(analysis.trace.steps) if s.score is not None), None)


class DecodeStage:
    """Check the request's tenant and task, decode the image under this replica's decode budget
    (at a smaller size when the task's model allows it) and start the ``Analysis``. Step:
    ``input`` (format, bytes, the file's size; the decoded size when smaller)."""

    name = "input"

    def __init__(
        self,
        config: AppConfig,
        tasks: Set[str],
        input_needs: Mapping[str, InputNeed],
        policies: PolicyRuntime | None = None,
        whole_image_tasks: Set[str] = frozenset(),
        rollouts: RolloutService | None = None,
    ) -> None:
        self.config = config
        self.rollouts = rollouts  # a rollout's arm may serve another model, router or calibration
        self.tasks = frozenset(tasks)
        self.input_needs = dict(input_needs)
        self.policies = policies
        # tasks whose learned router or drift input reference was measured on whole decodes
        self.whole_image_tasks = frozenset(whole_image_tasks)
        self._small: tuple[Any, dict[tuple[str, str], bool]] = (None, {})  # (policy set, answers)

    def _may_decode_small(self, tenant: str, task: str) -> bool:
        """Whether a JPEG below ``reduce_above_pixels`` may be decoded at the model's size
        (``limits.decode.jpeg_at_model_size``). Not when something else needs the file's own
        pixels: the tenant's privacy rule redacts (a review item's redaction would decode the
        file again), the task's shift guard, learned router or drift input reference compares
        statistics measured on whole decodes (pixel count, JPEG blockiness, sharpness) with this
        image's, or a rollout (or an adopted artefact) may serve the task otherwise."""
        if self.rollouts is not None and self.rollouts.may_change_arm(task):
            return False
        if self.policies is None:
            return task not in self.whole_image_tasks
        policy = self.policies.current
        # a new policy set (or many tenants: the callers name them): looked up once per tenant
        if self._small[0] is not policy or len(self._small[1]) >= 1024:
            self._small = (policy, {})
        known = self._small[1]
        if (tenant, task) not in known:
            known[(tenant, task)] = not (
                policy.privacy.for_tenant(tenant).redacts
                or PolicyRuntime.shift_guard(policy, task) is not None
                or task in self.whole_image_tasks
            )
        return known[(tenant, task)]

    async def run(self, ctx: RequestContext) -> None:
        request, limits = ctx.request, self.config.limits
        ctx.tenant = resolve_tenant(ctx.caller, checked_tenant(request.tenant))
        ctx.task = task = request.task or self.config.default_task
        if task not in self.tasks:
            raise InputError(f"unknown task {task!r}; expected one of {sorted(self.tasks)}", field="task")
        started = time.perf_counter()
        ctx.decoded = decoded = await ctx.decode_session.decode(
            request.image_bytes,
            need=self.input_needs.get(task),
            max_bytes=limits.max_body_bytes,
            max_pixels=limits.max_pixels,
            allowed_formats=tuple(limits.allowed_formats),
            jpeg_at_model_size=self._may_decode_small(ctx.tenant, task),
        )
        ctx.analysis = analysis = Analysis(
            image_rgb=decoded.rgb,
            image_sha256=decoded.sha256,
            task=task,
            tenant=ctx.tenant,
            trace=Trace(request.request_id),
        )
        analysis.trace.append(
            Step(
                stage="input",
                details={
                    "format": decoded.format,
                    "bytes": len(request.image_bytes),
                    "width": decoded.width,
                    "height": decoded.height,
                    **(
                        {"decoded_width": analysis.width, "decoded_height": analysis.height}
                        if decoded.is_reduced
                        else {}
                    ),
                },
                latency_ms=(time.perf_counter() - started) * 1000.0,  # decode (and its budget wait)
            )
        )


class ArmStage:
    """What serves this request, chosen once: the policy set in force (one version decides the
    whole request), and the task's rollout arm if a rollout is in effect (its policy, cheap tier,
    thresholds and price); the task's VLM. Step: ``rollout`` (the rollout and the arm), only
    inside a rollout."""

    name = "arm"

    def __init__(
        self,
        config: AppConfig,
        policies: PolicyRuntime,
        tiers: Mapping[str, CheapTierClient],
        vlm_tiers: Mapping[str, VlmTierClient],
        rollouts: RolloutService | None,
    ) -> None:
        self.config = config
        self.policies = policies
        self.tiers = dict(tiers)
        self.vlm_tiers = dict(vlm_tiers)
        self.rollouts = rollouts

    async def run(self, ctx: RequestContext) -> None:
        task, policy = ctx.task, self.policies.current
        cascade = self.config.cascades[task]
        # a learned router's configured price is part of the cheap tier's reservation
        router_units = (cascade.router.cost_units or 0.0) if cascade.router is not None else 0.0
        arm = Arm(
            policy,
            self.tiers[task],
            self.policies.thresholds(policy, task),
            cascade.tier.cost_units + router_units,
        )
        if self.rollouts is not None:
            arm = await self.rollouts.arm(task, arm, ctx.request.request_id, ctx.tenant)
        ctx.arm = arm
        ctx.analysis.policy_version = arm.policy.version
        vlm_tier = self.vlm_tiers.get(task)
        ctx.vlm = vlm_tier.run if vlm_tier is not None else None
        step = arm.step()
        if step is not None:
            ctx.analysis.trace.append(step)


class FilePixelsStage:
    """An image decoded smaller than its file: the answer's boxes in the file's own pixels, as
    if decoded whole, and the file's size for the response. No step (``input`` has both sizes)."""

    name = "file_pixels"

    async def run(self, ctx: RequestContext) -> None:
        decoded, analysis = ctx.decoded, ctx.analysis
        if decoded.is_reduced:
            analysis.detections = in_file_pixels(analysis.detections, decoded)
            analysis.metadata["image_size"] = (decoded.width, decoded.height)


class QueueSelectStage:
    """What this request sends to the review queue, if anything: the cascade's review or
    escalation (``budget`` when a budget's degrade mode sent it), else a sampled accept for
    audit labels (the policy's sampling, then the rollout arm's). No step: the queue write's."""

    name = "review_select"

    def __init__(self, policies: PolicyRuntime, drift: Any = None) -> None:
        self.policies = policies
        self.drift = drift  # a drift alarm raises the task's audit fraction (router/drift/audit_raise.py)

    async def run(self, ctx: RequestContext) -> None:
        analysis = ctx.analysis
        if analysis.decision in (Decision.REVIEW, Decision.ESCALATE):
            degraded = any(step.stage == "policy:budget" for step in analysis.trace)
            ctx.ticket = QueueTicket("budget" if degraded else "review")
        else:  # either source may sample an accept: its chance is the union's
            audit = audit_fraction_now(ctx.policy.audit, self.drift, analysis.task)
            chance = inclusion_probability(audit.fraction, rollout_audit_fraction(ctx.arm.choice))
            if analysis.decision is Decision.ACCEPT and is_sampled(analysis.trace.request_id, audit.fraction):
                ctx.ticket = QueueTicket("audit", audit.reason, "policy", chance)
            elif (reason := ctx.arm.audit_sample_reason(analysis)) is not None:
                ctx.ticket = QueueTicket("audit", reason, "rollout", chance)


class PrivacyStage:
    """Privacy before storage: the image the queue may keep, redacted under the tenant's rule
    (or none: a failing detector withholds it). Step: ``privacy:redact``."""

    name = "privacy"

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor

    async def run(self, ctx: RequestContext) -> None:
        if ctx.ticket is None:
            return
        analysis, policy = ctx.analysis, ctx.policy
        prepare = functools.partial(
            self.redactor.prepare,
            ctx.request.image_bytes,
            None if "image_size" in analysis.metadata else analysis.image_rgb,  # reduced: the file's pixels
            policy.privacy,
            analysis.tenant,
            policy_version=policy.version,
        )
        # detectors and encoding on a worker thread; a rule that redacts nothing only names the file
        redacts = policy.privacy.for_tenant(analysis.tenant).redacts
        ctx.stored = await asyncio.to_thread(prepare) if redacts else prepare()
        analysis.trace.append(ctx.stored.step)


class StoreStage:
    """Durably queue the request for review (or audit); if that fails the request fails (503),
    never silently. Step: ``review_queue`` (decides review), or ``review_queue:<kind>`` for an
    audit sample, which never changes the answer."""

    name = "store"

    def __init__(self, queue: ReviewQueue) -> None:
        self.queue = queue
        self.writes = review_writes(queue)  # concurrent requests' items share a commit
        self._label_sets_stored: set[str] = set()  # tasks whose label set the queue has

    async def run(self, ctx: RequestContext) -> None:
        ticket, stored = ctx.ticket, ctx.stored
        if ticket is None or stored is None:
            return
        analysis, policy, kind = ctx.analysis, ctx.policy, ticket.kind
        reasons = [s.reason for s in analysis.trace if s.decision in (Decision.REVIEW, Decision.ESCALATE)]
        started = time.perf_counter()
        detections = analysis.detections
        label_set = (
            detections.class_names
            if detections is not None and analysis.task not in self._label_sets_stored
            else None
        )
        reason = ticket.reason or (
            f"audit sample ({policy.audit.fraction:.1%} of auto-accepts)"
            if kind == "audit"
            else (reasons[-1] if reasons else "review")
        )
        if stored.withheld:
            reason += f"; image not stored: {stored.withheld}"
        try:
            item = await self.writes.write(
                dict(
                    request_id=analysis.trace.request_id,
                    image_bytes=stored.data,
                    original_bytes=stored.original,
                    image_withheld=stored.withheld,
                    image_sha256=analysis.image_sha256,
                    tenant=analysis.tenant,
                    task=analysis.task,
                    reason=reason,
                    proposed=detections.to_dicts() if detections is not None else [],
                    trace=analysis.trace.to_dict(),
                    # a rollout's evidence is claimed in a random order (rollouts.py queue_priority)
                    priority=queue_priority(
                        ctx.arm.choice,
                        kind,
                        last_score(analysis),
                        policy.review.error_cost(analysis.task),
                    ),
                    kind=kind,
                    sla_s=policy.review.sla_s,
                    label_set=label_set,
                    audit_source=ticket.audit_source,
                    inclusion_probability=ticket.inclusion_probability,
                    double_label_fraction=policy.review.double_label_fraction,
                )
            )
        except RouterError:  # the caller's own mistake (a request id reused for another image): 409
            raise
        except Exception as exc:
            log.exception("review queue write failed for %s", analysis.trace.request_id)
            raise BackendUnavailable(
                f"the review queue could not store the item: {failure_summary(exc)}", field="review_queue"
            ) from None
        if label_set:
            self._label_sets_stored.add(analysis.task)
        audit = ticket.is_audit
        if not audit:
            analysis.review_item_id = item.id
        analysis.trace.append(
            Step(
                stage=f"review_queue:{kind}" if audit else "review_queue",
                decision=None if audit else Decision.REVIEW,  # an audit never changes the answer
                reason=f"{reason}: item {item.id}" if audit else f"queued for human review as item {item.id}",
                policy_version=policy.version,
                cost_units=policy.costs.review_units,
                latency_ms=(time.perf_counter() - started) * 1000.0,
                details={"item_id": item.id, "kind": kind, "priority": item.priority},
            )
        )


class SearchIndexStage:
    """``retrieval.index_analysed``: make the analysed image searchable, through the replica's
    batched ``IndexQueue`` (after_response.py). Step: ``retrieval:index``, whose
    ``details.search_index`` says what was promised: ``{"mode": "durable", "status": "indexed"}``
    (the write is durable before the response; ``search_id`` is set), ``{"mode": "eventual",
    "status": "queued"}`` (searchable once its batch is written; ``search_id`` null), or
    ``status`` ``shed`` (the queue was full) / ``failed``. A failure never changes the decision."""

    name = "search_index"

    def __init__(self, indexer: IndexQueue) -> None:
        self.enabled = indexer.enabled
        self.indexer = indexer

    async def run(self, ctx: RequestContext) -> None:
        if not self.enabled:
            return
        analysis, mode = ctx.analysis, self.indexer.mode
        started = time.perf_counter()
        future = self.indexer.submit(analysis)
        if future is None:
            self._step(
                ctx, started, "shed", "not indexed: the index queue is full (shed)", "index queue full"
            )
            return
        if mode == "eventual":
            ctx.search_indexed = future  # the drift embedding sample reads the id once written
            self._step(ctx, started, "queued", "queued for visual search (eventual: searchable once written)")
            return
        indexed = await future
        if indexed.error is not None:
            log.warning("indexing %s for search failed: %s", analysis.trace.request_id, indexed.error)
            self._step(ctx, started, "failed", "not indexed", indexed.error)
            return
        ctx.search_id = indexed.search_id
        self._step(ctx, started, "indexed", "indexed for visual search")

    def _step(
        self, ctx: RequestContext, started: float, status: str, reason: str, error: str | None = None
    ) -> None:
        ctx.analysis.trace.append(
            Step(
                stage="retrieval:index",
                reason=reason,
                error=error,
                details={
                    "search_id": ctx.search_id,
                    "search_index": {"mode": self.indexer.mode, "status": status},
                },
                latency_ms=(time.perf_counter() - started) * 1000.0,
            )
        )


class MetricsStage:
    """The final decision under its policy version, and each step's latency, decision and
    failure (``/metrics``). No step."""

    name = "metrics"

    def __init__(self, metrics: IngressMetrics) -> None:
        self.metrics = metrics

    async def run(self, ctx: RequestContext) -> None:
        analysis = ctx.analysis
        decision = getattr(analysis.decision, "value", "none")
        self.metrics.decisions.labels(ctx.task, decision, ctx.policy.version).inc()
        self.metrics.observe_trace(ctx.task, analysis.trace)


class DriftStage:
    """The request's statistics for this replica's drift monitors (never waits: statistics and
    tests run on the drift worker). A candidate arm's score is not the incumbent's normal and is
    left out until promoted. No step."""

    name = "drift"

    def __init__(self, drift: Any) -> None:  # router.services.drift.DriftService
        self.drift = drift

    async def run(self, ctx: RequestContext) -> None:
        if self.drift is not None:
            self.drift.observe_request(
                ctx.analysis, ctx.request.image_bytes, count_score=ctx.arm.counts_for_drift
            )


class DriftEmbeddingStage:
    """After the response: a sampled share (``drift.embedding_fraction``) of the indexed images'
    embeddings, read back from the search tier (which computed them) for the embeddings monitor;
    an image indexed eventually takes the embedding its batch's write answered with (no hop)."""

    name = "drift_embedding"

    def __init__(self, config: AppConfig, drift: Any, search: SearchBackend | None) -> None:
        self.fraction = config.drift.embedding_fraction
        self.drift = drift
        self.search = search

    def wants(self, ctx: RequestContext) -> bool:
        return (
            self.drift is not None
            and (ctx.search_id is not None or ctx.search_indexed is not None)
            and is_sampled(f"drift-embedding:{ctx.analysis.trace.request_id}", self.fraction)
        )

    async def run(self, ctx: RequestContext) -> None:
        search_id, vector = ctx.search_id, None
        if search_id is None and ctx.search_indexed is not None:
            indexed = await ctx.search_indexed
            search_id, vector = indexed.search_id, indexed.vector  # the write's answer: no read back
        if search_id is None:
            return  # shed or failed: no embedding to read
        try:
            if vector is None:
                vector = (await self.search.call("query_vector", "search_by_id", search_id, 1))["vector"]
            self.drift.observe_embedding(ctx.analysis.task, vector)
        except Exception as exc:  # e.g. another shard holds the item: this sample is skipped
            log.debug("no embedding for drift from search item %s: %s", search_id, exc)
