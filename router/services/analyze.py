"""Analyse one image: decode, budgeted cascade, review or audit enqueue, search indexing.

No FastAPI and no Ray here: the faces hand in bytes and the caller, and get back the
``Analysis`` (the shared record) whose ``response_body`` both faces return.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cascades.decode_budget import BudgetSession, DecodeBudget, in_file_pixels, input_need
from cascades.pipeline import run_cascade
from policies.audit_sampling import is_sampled
from policies.costs import costs_by_tier, review_value
from policies.image_redaction import Redactor
from policies.policy_set import PolicySet
from policies.review_queue import ReviewQueue
from policies.runtime import PolicyRuntime, Refusal
from router.config import AppConfig
from router.metrics import IngressMetrics
from router.security import Principal, resolve_tenant
from router.services.backends import CheapTierClient, SearchBackend, VlmTierClient
from router.services.common import checked_tenant
from visionroute.errors import BackendUnavailable, InputError, RouterError
from visionroute.records import Analysis, Decision, Step, Trace

if TYPE_CHECKING:
    from router.services.rollouts import ArmChoice, RolloutService
from visionroute.redaction import failure_summary

log = logging.getLogger("visionroute.service.analyze")


@dataclass(frozen=True)
class ImageRequest:
    """One analyse request as both faces hand it in."""

    image_bytes: bytes
    request_id: str
    task: str | None = None
    tenant: str | None = None


def _image_size(analysis: Analysis) -> dict[str, int]:
    """The file's own size (a large image may have been decoded smaller: cascades/decode_budget.py)."""
    width, height = analysis.metadata.get("image_size", (analysis.width, analysis.height))
    return {"width": width, "height": height}


def _last_score(analysis: Analysis) -> float | None:
    return next((s.score for s in reversed(analysis.trace.steps) if s.score is not None), None)


def response_body(analysis: Analysis) -> dict[str, Any]:
    """The answer both faces return (router/schemas.py AnalyzeResponse documents it)."""
    trace = analysis.trace.to_dict()
    return {
        "request_id": analysis.trace.request_id,
        "task": analysis.task,
        "decision": trace["decision"],
        "answer": analysis.detections.to_dicts() if analysis.detections is not None else [],
        "text": analysis.answer_text,
        "image": {"sha256": analysis.image_sha256, **_image_size(analysis)},
        "review_item_id": analysis.review_item_id,
        "cost_units": trace["cost_units"],
        "trace": trace,
        "policy_version": analysis.policy_version,
        "degraded": analysis.degraded,
    }


class AnalyzeService:
    def __init__(
        self,
        config: AppConfig,
        *,
        tiers: Mapping[str, CheapTierClient],
        vlm_tiers: Mapping[str, VlmTierClient],
        search: SearchBackend | None,
        queue: ReviewQueue,
        policies: PolicyRuntime,
        metrics: IngressMetrics,
        rollouts: RolloutService | None = None,
        drift: Any = None,  # router.services.drift.DriftService
    ) -> None:
        self.drift = drift
        self.config = config
        self.rollouts = rollouts
        self.tiers = dict(tiers)
        self.vlm_tiers = dict(vlm_tiers)
        self.search = search
        self.queue = queue
        self.policies = policies
        self.metrics = metrics
        self._label_sets_stored: set[str] = set()
        self.redactor = Redactor(config.models_dir)  # privacy: detectors load on first use
        self.decode_budget = DecodeBudget(config.limits.decode)  # pixels in flight on this replica
        self._input_needs = {
            task: input_need(cascade.tier, config.models_dir, has_vlm=cascade.vlm is not None)
            for task, cascade in config.cascades.items()
        }

    async def analyze(self, request: ImageRequest, caller: Principal | None) -> Analysis:
        """The cascade for one image, under one policy version from start to end; its decoded
        pixels count against this replica's decode budget until the answer is made."""
        async with self.decode_budget.session() as budget:
            return await self._analyze(request, caller, budget)

    async def _analyze(
        self, request: ImageRequest, caller: Principal | None, budget: BudgetSession
    ) -> Analysis:
        limits = self.config.limits
        tenant = resolve_tenant(caller, checked_tenant(request.tenant))
        task = request.task or self.config.default_task
        if task not in self.tiers:
            raise InputError(f"unknown task {task!r}; expected one of {sorted(self.tiers)}", field="task")
        decode_started = time.perf_counter()
        decoded = await budget.decode(
            request.image_bytes,
            need=self._input_needs.get(task),
            max_bytes=limits.max_body_bytes,
            max_pixels=limits.max_pixels,
            allowed_formats=tuple(limits.allowed_formats),
        )
        incumbent_policy = self.policies.current  # one policy version decides the whole request
        choice = (
            self.rollouts.choose(await self.rollouts.in_effect(task), request.request_id, tenant)
            if self.rollouts is not None
            else None
        )
        policy = (
            self.rollouts.policy_for(choice, incumbent_policy) if choice is not None else incumbent_policy
        )
        analysis = Analysis(
            image_rgb=decoded.rgb,
            image_sha256=decoded.sha256,
            task=task,
            tenant=tenant,
            trace=Trace(request.request_id),
            policy_version=policy.version,
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
                latency_ms=(time.perf_counter() - decode_started) * 1000.0,  # decode (and its budget wait)
            )
        )
        vlm_tier = self.vlm_tiers.get(task)
        cheap_tier, thresholds, units = self.tiers[task], None, self.config.cascades[task].tier.cost_units
        if choice is not None:
            analysis.trace.append(choice.step(policy.version))
            cheap_tier = self.rollouts.tier_for(choice, cheap_tier)
            thresholds = self.rollouts.thresholds_for(choice, policy, task)
            if choice.arm == "candidate" and choice.rollout.candidate is not None:
                units = self.config.cascades[task].candidates[choice.rollout.candidate].tier.cost_units
        analysis = await self._run_budgeted(
            analysis,
            policy,
            units,
            cheap_tier.predict,
            vlm_tier.run if vlm_tier is not None else None,
            thresholds,
        )
        if decoded.is_reduced:  # boxes in the file's own pixels, as if decoded whole
            analysis.detections = in_file_pixels(analysis.detections, decoded)
            analysis.metadata["image_size"] = (decoded.width, decoded.height)
        needs_review = analysis.decision in (Decision.REVIEW, Decision.ESCALATE)
        if needs_review:
            await self._enqueue(analysis, request.image_bytes, policy)
        if choice is not None and choice.rollout.mode == "canary":  # the arm's cost, audits excluded
            self.rollouts.note_cost(choice, choice.arm, analysis.trace.cost_units)
        if not needs_review and self.policies.audit_sampled(policy, analysis):
            await self._enqueue(analysis, request.image_bytes, policy, kind="audit")
        elif not needs_review and self.rollouts is not None and self.rollouts.audit_sampled(choice, analysis):
            await self._enqueue(
                analysis,
                request.image_bytes,
                policy,
                kind="audit",
                reason=f"rollout audit sample ({choice.rollout.audit_fraction:.1%} of the {choice.arm}'s accepts)",
            )
        if choice is not None and choice.shadow:  # off the request's path: the response does not wait
            self.rollouts.spawn(self._shadow(choice, analysis, request.image_bytes, policy))
        self.metrics.decisions.labels(task, getattr(analysis.decision, "value", "none"), policy.version).inc()
        await self._index_for_search(analysis)
        self.metrics.observe_trace(task, analysis.trace)
        if self.drift is not None:  # never waits: statistics and tests run on the drift worker
            self.drift.observe_request(
                analysis,
                request.image_bytes,
                count_score=choice is None
                or choice.arm != "candidate"
                or choice.rollout.status == "promoted",
            )
        return analysis

    # -- budgets ------------------------------------------------------------------------------

    async def _run_budgeted(
        self, analysis: Analysis, policy: PolicySet, units: float, cheap_tier, vlm, thresholds=None
    ) -> Analysis:
        """The cascade with each paid call reserved first (policies.budgets) and settled after."""
        reservation = await asyncio.to_thread(self.policies.reserve, policy, analysis, "onnx", units)
        if isinstance(reservation, Refusal):
            return self._degrade(analysis, policy, reservation, answered=False)
        if vlm is not None:
            vlm = self._budgeted_vlm(vlm, policy)
        try:
            thresholds = thresholds or self.policies.thresholds(policy, analysis.task)
            analysis = await run_cascade(
                analysis,
                cheap_tier=cheap_tier,
                policy=thresholds,
                vlm=vlm,
                shift_guard=self.policies.shift_guard(policy, analysis.task),
            )
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
                # it may have run: charge the whole reservation
                await asyncio.to_thread(self.policies.ledger.settle, reservation)
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
                    f"budget {name!r} is exhausted; degrade mode accept_degraded: the cheap answer "
                    "stands, flagged degraded",
                )
            )
            return analysis
        if refusal.mode == "accept_degraded":
            refusal.error.reason += "; degrade mode accept_degraded has no cheap answer to give yet"
        raise refusal.error

    # -- review and audit ---------------------------------------------------------------------

    async def _enqueue(
        self,
        analysis: Analysis,
        image_bytes: bytes,
        policy: PolicySet,
        kind: str = "review",
        reason: str | None = None,
    ) -> None:
        """Durably queue for review (or audit); if that fails the request fails (503), never silently.

        A review is paid work: its cost is reserved on review budgets first, and an exhausted
        budget applies its degrade mode. Audit samples are the safety net and are never skipped.
        """
        if kind == "review" and any(step.stage == "policy:budget" for step in analysis.trace):
            kind = "budget"
        units = policy.costs.review_units
        audit = kind in ("audit", "shadow")  # samples for labels: they never change the answer
        if audit:  # no budget gates an audit; its cost is still recorded
            reservation = await asyncio.to_thread(
                self.policies.ledger.reserve,
                [],
                tenant=analysis.tenant,
                feature=analysis.task,
                tier="review",
                units=units,
            )
        else:
            reservation = await asyncio.to_thread(self.policies.reserve, policy, analysis, "review", units)
        if isinstance(reservation, Refusal):
            self._degrade(analysis, policy, reservation, answered=True)
            return
        # Privacy before storage: the queue gets the redacted image (or none: fail closed).
        stored = await asyncio.to_thread(
            self.redactor.prepare,
            image_bytes,
            None if "image_size" in analysis.metadata else analysis.image_rgb,  # reduced: the file's pixels
            policy.privacy,
            analysis.tenant,
            policy_version=policy.version,
        )
        analysis.trace.append(stored.step)
        reasons = [s.reason for s in analysis.trace if s.decision in (Decision.REVIEW, Decision.ESCALATE)]
        started = time.perf_counter()
        score = next((s.score for s in reversed(analysis.trace.steps) if s.score is not None), None)
        detections = analysis.detections
        label_set = (
            detections.class_names
            if detections is not None and analysis.task not in self._label_sets_stored
            else None
        )
        reason = reason or (
            f"audit sample ({policy.audit.fraction:.1%} of auto-accepts)"
            if kind == "audit"
            else (reasons[-1] if reasons else "review")
        )
        if stored.withheld:
            reason += f"; image not stored: {stored.withheld}"
        try:
            item = await asyncio.to_thread(
                self.queue.enqueue,
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
                priority=review_value(score, policy.review.error_cost(analysis.task)),
                kind=kind,
                sla_s=policy.review.sla_s,
                label_set=label_set,
            )
        except RouterError:  # the caller's own mistake (a request id reused for another image): 409
            await asyncio.to_thread(self.policies.ledger.release, reservation)
            raise
        except Exception as exc:
            await asyncio.to_thread(self.policies.ledger.release, reservation)
            log.exception("review queue write failed for %s", analysis.trace.request_id)
            raise BackendUnavailable(
                f"the review queue could not store the item: {failure_summary(exc)}", field="review_queue"
            ) from None
        await asyncio.to_thread(self.policies.ledger.settle, reservation)
        if label_set:
            self._label_sets_stored.add(analysis.task)
        if not audit:
            analysis.review_item_id = item.id
        analysis.trace.append(
            Step(
                stage=f"review_queue:{kind}" if audit else "review_queue",
                decision=None if audit else Decision.REVIEW,  # an audit never changes the answer
                reason=f"{reason}: item {item.id}" if audit else f"queued for human review as item {item.id}",
                policy_version=policy.version,
                cost_units=units,
                latency_ms=(time.perf_counter() - started) * 1000.0,
                details={"item_id": item.id, "kind": kind, "priority": item.priority},
            )
        )

    # -- rollouts: the shadow run ---------------------------------------------------------------

    async def _shadow(
        self, choice: ArmChoice, served: Analysis, image_bytes: bytes, policy: PolicySet
    ) -> None:
        """The candidate on the same decoded image, recorded beside the served answer, never served.
        A failure is logged and recorded nowhere else: the served request is long answered."""
        from router.services.rollouts import ArmChoice

        rollout, task = choice.rollout, served.task
        try:
            candidate_policy = self.rollouts.policy_for(ArmChoice(rollout, "candidate", True), policy)
            shadow = Analysis(
                image_rgb=served.image_rgb,
                image_sha256=served.image_sha256,
                task=task,
                tenant=served.tenant,
                trace=Trace(served.trace.request_id),
                policy_version=candidate_policy.version,
            )
            shadow.trace.append(ArmChoice(rollout, "candidate", True).step(candidate_policy.version))
            shadow = await run_cascade(
                shadow,
                cheap_tier=self.rollouts.tier_for(choice, self.tiers[task], candidate=True).predict,
                policy=self.rollouts.thresholds_for(choice, candidate_policy, task, candidate=True),
                vlm=None,  # the shadow never pays for a VLM call: an escalation is costed at its reserve
                shift_guard=self.policies.shift_guard(candidate_policy, task),
            )
            candidate_cost = shadow.trace.cost_units + {
                Decision.ESCALATE: candidate_policy.costs.vlm_reserve_units,
                Decision.REVIEW: candidate_policy.costs.review_units,
            }.get(shadow.decision, 0.0)
            incumbent_cost = sum(
                s.cost_units for s in served.trace if not s.stage.startswith("review_queue:")
            )
            await asyncio.to_thread(
                self.rollouts.store.record_shadow,
                rollout.id,
                {
                    "request_id": served.trace.request_id,
                    "tenant": served.tenant,
                    "incumbent_decision": getattr(served.decision, "value", None),
                    "incumbent_score": _last_score(served),
                    "incumbent_cost": incumbent_cost,
                    "candidate_decision": getattr(shadow.decision, "value", None),
                    "candidate_score": _last_score(shadow),
                    "candidate_cost": candidate_cost,
                    "candidate_answer": shadow.detections.to_dicts() if shadow.detections is not None else [],
                },
            )
            self.rollouts.note_cost(choice, "incumbent", incumbent_cost)  # paired: the same requests
            self.rollouts.note_cost(choice, "candidate", candidate_cost)
            if self.rollouts.audit_sampled(choice, shadow):
                await self._enqueue(
                    shadow,
                    image_bytes,
                    candidate_policy,
                    kind="shadow",
                    reason=f"rollout {rollout.id}: shadow candidate's accept, audit sample "
                    f"({rollout.audit_fraction:.1%})",
                )
        except Exception:
            log.exception("shadow run of rollout %s on %s failed", rollout.id, served.trace.request_id)

    def _feed_embedding(self, analysis: Analysis, item_id: int | None) -> None:
        """A sampled share of indexed images: their embedding (the search tier computed it) read
        back off the request's path, for the drift monitor of embeddings."""
        fraction = self.config.drift.embedding_fraction
        if self.drift is None or item_id is None or self.rollouts is None:
            return
        if not is_sampled(f"drift-embedding:{analysis.trace.request_id}", fraction):
            return

        async def feed() -> None:
            try:
                asked = await self.search.call("query_vector", "search_by_id", item_id, 1)
                self.drift.observe_embedding(analysis.task, asked["vector"])
            except Exception as exc:  # e.g. another shard holds the item: this sample is skipped
                log.debug("no embedding for drift from search item %s: %s", item_id, exc)

        self.rollouts.spawn(feed())

    # -- search -------------------------------------------------------------------------------

    async def _index_for_search(self, analysis: Analysis) -> None:
        """retrieval.index_analysed: make the analysed image searchable; a failure is recorded
        in the trace and never changes the decision."""
        if self.search is None or not self.config.retrieval.index_analysed:
            return
        started = time.perf_counter()
        try:
            item_id = await self.search.call("index_analysis", analysis)
            self._feed_embedding(analysis, item_id)
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
                    error=failure_summary(exc),
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                )
            )
