"""Budgets and degrade modes, in one place: the ``BudgetGuard``.

Every paid call of a request is reserved on the policy set's budgets first (policies/budgets.py)
and settled at its real cost after; a reservation that does not fit applies the exhausted
budget's degrade mode (``BudgetGuard.degrade``, docs/policies.md). The stages know nothing of
this: the pipeline's declaration wraps the paid ones.

- ``guard.paid("onnx", *stages)``: the cheap tier and what judges its answer, under one
  reservation of the arm's ``cost_units``, settled at the cheap tier's cost when they end. A
  refusal skips them (``review``: the request goes to the queue unanswered).
- A call no budget rule covers writes nothing on the request path: its reservation is only in
  memory and its settle adds to usage totals the ledger writes within a second for all calls
  (``BudgetLedger.settle_later``); a covered call's reservation and settle are durable rows.
- ``guard.paid_calls("vlm", stage)``: each VLM call reserves ``vlm_reserve_units`` when it is
  made, inside the VLM stage, so a refusal or a failing reservation is handled like any VLM
  failure; a call that raised is charged its whole reservation (it may have run).
- ``guard.paid("review", *stages)``: one queue write (redaction included) reserves
  ``review_units``; audit samples reserve under no budget (their cost is still recorded); a
  failed write gives the units back.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from policies.costs import costs_by_tier
from policies.runtime import PolicyRuntime, Refusal
from router.metrics import IngressMetrics
from router.services.analyze.context import RequestContext, Stage
from visionroute.records import Analysis, Decision

if TYPE_CHECKING:
    from cascades.pipeline import VlmTier
    from policies.budgets import Reservation
    from policies.policy_set import PolicySet


class BudgetGuard:
    def __init__(self, policies: PolicyRuntime, metrics: IngressMetrics) -> None:
        self.policies = policies
        self.metrics = metrics

    # -- the wrappers the pipeline declares ------------------------------------------------------

    def paid(self, tier: str, *stages: Stage) -> Stage:
        """``stages`` under one reservation of ``tier`` (``onnx`` or ``review``)."""
        if tier == "onnx":
            return PaidCheapTier(self, stages)
        if tier == "review":
            return PaidQueueWrite(self, stages)
        raise ValueError(f"no budgeted stage sequence for tier {tier!r}; expected 'onnx' or 'review'")

    def paid_calls(self, tier: str, stage: Stage) -> Stage:
        """``stage``'s calls of ``tier`` (``vlm``), each reserved when it is made."""
        if tier != "vlm":
            raise ValueError(f"no budgeted calls for tier {tier!r}; expected 'vlm'")
        return PaidVlmCalls(self, stage)

    # -- reserve, settle, release, degrade -------------------------------------------------------

    async def reserve(
        self, policy: PolicySet, analysis: Analysis, tier: str, units: float, *, under_budgets: bool = True
    ) -> Reservation | None:
        """The reservation, or None when a budget refused and its degrade mode let the request
        go on (its ``policy:budget`` step is in the trace); a ``reject`` raises (HTTP 429)."""
        if under_budgets and _gated(policy, analysis, tier):
            reservation = await asyncio.to_thread(self.policies.reserve, policy, analysis, tier, units)
        else:  # no budget gates it: the ledger writes nothing yet (settle records the cost), so
            # no worker-thread hop; the reservation itself is the same
            reservation = self.policies.ledger.reserve(
                [], tenant=analysis.tenant, feature=analysis.task, tier=tier, units=units
            )
        if isinstance(reservation, Refusal):
            self.degrade(analysis, policy, reservation)
            return None
        return reservation

    async def settle(self, reservation: Reservation, units: float | None = None) -> None:
        """Charge ``units`` (default: the whole reservation)."""
        if reservation.budgets:  # a cap reads it: its own fully durable transaction
            await asyncio.to_thread(self.policies.ledger.settle, reservation, units)
        else:  # only the usage totals: added in memory, written within a second for all calls
            self.policies.ledger.settle_later(reservation, units)

    async def release(self, reservation: Reservation) -> None:
        """The call did not run: give the units back."""
        await asyncio.to_thread(self.policies.ledger.release, reservation)

    def degrade(self, analysis: Analysis, policy: PolicySet, refusal: Refusal) -> Analysis:
        """Apply the exhausted budget's degrade mode; raise BudgetExceeded (429) when it is reject,
        or when it is accept_degraded and there is no cheap answer yet."""
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
        if refusal.mode == "accept_degraded" and analysis.detections is not None:
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


def _gated(policy: PolicySet, analysis: Analysis, tier: str) -> bool:
    """Whether a budget rule of ``policy`` covers this call (else the ledger reads and writes
    nothing when it reserves: policies/budgets.py ``BudgetLedger.reserve``)."""
    return any(rule.matches(analysis.tenant, analysis.task, tier) for rule in policy.budgets)


class PaidCheapTier:
    """The cheap tier and the stages that judge its answer, under one ``onnx`` reservation."""

    name = "budget:onnx"

    def __init__(self, guard: BudgetGuard, stages: tuple[Stage, ...]) -> None:
        self.guard, self.stages = guard, stages

    async def run(self, ctx: RequestContext) -> None:
        reservation = await self.guard.reserve(ctx.policy, ctx.analysis, "onnx", ctx.arm.cost_units)
        if reservation is None:
            return
        try:
            for stage in self.stages:
                await stage.run(ctx)
        finally:
            await self.guard.settle(reservation, costs_by_tier(ctx.analysis.trace)["onnx"])


class PaidVlmCalls:
    """The VLM called through the budget guard: reserved before each call, settled after."""

    name = "budget:vlm"

    def __init__(self, guard: BudgetGuard, stage: Stage) -> None:
        self.guard, self.stages = guard, (stage,)

    async def run(self, ctx: RequestContext) -> None:
        if ctx.vlm is not None:
            ctx.vlm = self._paid(ctx.vlm, ctx.policy)
        await self.stages[0].run(ctx)

    def _paid(self, vlm: VlmTier, policy: PolicySet) -> VlmTier:
        guard = self.guard

        async def paid(escalated: Analysis) -> Analysis:
            reservation = await guard.reserve(policy, escalated, "vlm", policy.costs.vlm_reserve_units)
            if reservation is None:
                return escalated
            spent_before = costs_by_tier(escalated.trace)["vlm"]
            try:
                result = await vlm(escalated)
            except BaseException:
                await guard.settle(reservation)  # it may have run: charge the whole reservation
                raise
            await guard.settle(reservation, costs_by_tier(result.trace)["vlm"] - spent_before)
            return result

        return paid


class PaidQueueWrite:
    """One review-queue write (its redaction included) under one ``review`` reservation."""

    name = "budget:review"

    def __init__(self, guard: BudgetGuard, stages: tuple[Stage, ...]) -> None:
        self.guard, self.stages = guard, stages

    async def run(self, ctx: RequestContext) -> None:
        ticket = ctx.ticket
        if ticket is None:
            return
        units = ctx.policy.costs.review_units
        reservation = await self.guard.reserve(
            ctx.policy, ctx.analysis, "review", units, under_budgets=not ticket.is_audit
        )
        if reservation is None:
            return
        try:
            for stage in self.stages:
                await stage.run(ctx)
        except Exception:
            await self.guard.release(reservation)
            raise
        await self.guard.settle(reservation)
