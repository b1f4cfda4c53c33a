"""The analyse path, declared in one place: ``analyze_pipeline`` lists its stages in order.

    input -> arm -> [budget:onnx: cheap_tier -> (router) -> decide -> shift_guard -> [budget:vlm: vlm]]
          -> file_pixels -> review_select -> [budget:review: privacy -> store]
          -> search_index -> metrics -> drift
    after the response (spawned, off the request's path): rollout_evidence, drift_embedding

Each stage is a small object with one job and an ``async run(ctx)`` over the one
``RequestContext`` (context.py); it appends its own trace step, if it has one. The rollout arm is
chosen once, at ``arm``; budgets and degrade modes are the ``BudgetGuard``'s (budget.py), which
wraps the paid stages here. A new capability is one more stage object in this list: the learned
router's score (``router``, cascades/router_stage.py) sits between ``cheap_tier`` and ``decide``
when a cascade names a router artefact (``cascades.<task>.router``), and is absent otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cascades.pipeline import CheapTierStage, DecideStage, ShiftGuardStage, VlmStage
from cascades.router_stage import RouterScoreStage
from router.services.analyze.budget import BudgetGuard
from router.services.analyze.context import AfterResponseStage, RequestContext, Spawn, Stage
from router.services.analyze.rollout import RolloutEvidenceStage
from router.services.analyze.stages import (
    ArmStage,
    DecodeStage,
    DriftEmbeddingStage,
    DriftStage,
    FilePixelsStage,
    MetricsStage,
    PrivacyStage,
    QueueSelectStage,
    SearchIndexStage,
    StoreStage,
)
from visionroute.records import Analysis

if TYPE_CHECKING:
    from router.services.analyze.service import AnalyzeService


def analyze_pipeline(service: AnalyzeService) -> Pipeline:
    """The stages of one analyse request, in order, wired to the service's backends."""
    budget = BudgetGuard(service.policies, service.metrics)
    queue_write = budget.paid("review", PrivacyStage(service.redactor), StoreStage(service.queue))
    rollouts = service.rollouts
    return Pipeline(
        stages=(
            DecodeStage(
                service.config,
                set(service.tiers),
                service.input_needs,
                service.policies,
                set(service.routers) | (service.drift.whole_image_tasks() if service.drift else set()),
                rollouts,
            ),
            ArmStage(service.config, service.policies, service.tiers, service.vlm_tiers, rollouts),
            budget.paid(
                "onnx",
                CheapTierStage(),
                *((RouterScoreStage(service.routers),) if service.routers else ()),
                DecideStage(),
                ShiftGuardStage(),
                budget.paid_calls("vlm", VlmStage()),
            ),
            FilePixelsStage(),
            QueueSelectStage(service.policies, service.drift),
            queue_write,
            SearchIndexStage(service.indexer),
            MetricsStage(service.metrics),
            DriftStage(service.drift),
        ),
        after_response=(
            *((RolloutEvidenceStage(rollouts, queue_write),) if rollouts is not None else ()),
            DriftEmbeddingStage(service.config, service.drift, service.search),
        ),
        spawn=service.after_response.spawn,  # bounded (after_response.py)
    )


@dataclass(frozen=True)
class Pipeline:
    """Stages run in order over one request's context; then the after-response stages that
    want this request are spawned (``spawn``; None: there is nowhere to run them)."""

    stages: tuple[Stage, ...]
    after_response: tuple[AfterResponseStage, ...] = ()
    spawn: Spawn | None = None

    async def run(self, ctx: RequestContext) -> Analysis:
        for stage in self.stages:
            await stage.run(ctx)
        if self.spawn is not None:
            for stage in self.after_response:
                if stage.wants(ctx):
                    self.spawn(stage.run(ctx))
        return ctx.analysis

    def names(self) -> tuple[str, ...]:
        """Every stage's name in the order it runs, wrapped stages after their wrapper's."""
        return tuple(_names(self.stages))


def _names(stages: tuple[Stage, ...]) -> Iterator[str]:
    for stage in stages:
        yield stage.name
        yield from _names(getattr(stage, "stages", ()))
