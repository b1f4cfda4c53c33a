"""A rollout's evidence from one served request, after the response (docs/rollouts.md).

The arm that served the request was chosen at its start (``ArmStage``); what the rollout learns
from it is gathered here, off the request's path: a canary arm's served cost, and on a
shadow-sampled request the candidate's own run on the same decoded image, recorded beside the
served answer and never served (its cheap tier, its refit router if it carries one, and its
thresholds: an escalation is costed at the VLM's reserve units, never paid for). A shadow accept may be queued as a ``shadow`` audit
item, through the same privacy and queue-write stages as the served request's items.
"""

from __future__ import annotations

import asyncio
import logging

from cascades.pipeline import run_cascade
from cascades.rollout_router import routed_cascade
from policies.runtime import PolicyRuntime
from router.services.analyze.context import QueueTicket, RequestContext, Stage
from router.services.analyze.stages import last_score
from router.services.rollouts import RolloutService, is_arm_audit_sampled
from visionroute.records import Analysis, Decision, Trace

log = logging.getLogger("visionroute.service.analyze")


def served_cost(analysis: Analysis) -> float:
    """What serving the request cost: every step's cost but the audit samples' (never served)."""
    return sum(s.cost_units for s in analysis.trace if not s.stage.startswith("review_queue:"))


class RolloutEvidenceStage:
    """After the response: a canary arm's served cost, or the shadow candidate's run beside the
    served answer (recorded in the rollout store, paired costs, a sampled shadow accept queued
    for audit). A failure is logged and recorded nowhere else: the request is long answered."""

    name = "rollout_evidence"

    def __init__(self, rollouts: RolloutService, queue_write: Stage) -> None:
        self.rollouts = rollouts
        self.queue_write = queue_write  # the privacy and queue-write stages, under the review budget

    def wants(self, ctx: RequestContext) -> bool:
        choice = ctx.arm.choice
        return choice is not None and (choice.shadow or choice.rollout.mode == "canary")

    async def run(self, ctx: RequestContext) -> None:
        choice = ctx.arm.choice
        if choice.rollout.mode == "canary":  # the arm's cost, audits excluded
            self.rollouts.note_cost(choice, choice.arm, served_cost(ctx.analysis))
        if not choice.shadow:
            return
        try:
            await self._shadow(ctx)
        except Exception:
            log.exception(
                "shadow run of rollout %s on %s failed", choice.rollout.id, ctx.analysis.trace.request_id
            )

    async def _shadow(self, ctx: RequestContext) -> None:
        choice, served = ctx.arm.choice, ctx.analysis
        rollout = choice.rollout
        arm = self.rollouts.shadow_arm(ctx.arm, ctx.task)
        shadow = Analysis(
            image_rgb=served.image_rgb,
            image_sha256=served.image_sha256,
            task=served.task,
            tenant=served.tenant,
            trace=Trace(served.trace.request_id),
            policy_version=arm.policy.version,
        )
        shadow.trace.append(arm.step())
        shift_guard = PolicyRuntime.shift_guard(arm.policy, ctx.task)
        if arm.router is not None:  # a refit router: it scores the shadow run as it would the served one
            shadow = await routed_cascade(
                shadow,
                cheap_tier=arm.cheap_tier.predict,
                policy=arm.thresholds,
                router=arm.router,
                shift_guard=shift_guard,
            )
        else:
            shadow = await run_cascade(
                shadow,
                cheap_tier=arm.cheap_tier.predict,
                policy=arm.thresholds,
                vlm=None,  # the shadow never pays for a VLM call: an escalation is costed at its reserve
                shift_guard=shift_guard,
            )
        costs = arm.policy.costs
        candidate_cost = shadow.trace.cost_units + {
            Decision.ESCALATE: costs.vlm_reserve_units,
            Decision.REVIEW: costs.review_units,
        }.get(shadow.decision, 0.0)
        incumbent_cost = served_cost(served)
        await asyncio.to_thread(
            self.rollouts.store.record_shadow,
            rollout.id,
            {
                "request_id": served.trace.request_id,
                "tenant": served.tenant,
                "incumbent_decision": getattr(served.decision, "value", None),
                "incumbent_score": last_score(served),
                "incumbent_cost": incumbent_cost,
                "candidate_decision": getattr(shadow.decision, "value", None),
                "candidate_score": last_score(shadow),
                "candidate_cost": candidate_cost,
                "candidate_answer": shadow.detections.to_dicts() if shadow.detections is not None else [],
            },
        )
        self.rollouts.note_cost(choice, "incumbent", incumbent_cost)  # paired: the same requests
        self.rollouts.note_cost(choice, "candidate", candidate_cost)
        if is_arm_audit_sampled(choice, shadow):
            reason = f"rollout {rollout.id}: shadow candidate's accept, audit sample ({rollout.audit_fraction:.1%})"
            await self.queue_write.run(
                ctx.derived(shadow, arm, QueueTicket("shadow", reason, "rollout", rollout.audit_fraction))
            )
