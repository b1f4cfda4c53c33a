"""The cost model: what each tier's work costs, in one unit (``cost_units``).

- ONNX inference: each task's tier config sets ``cost_units`` per image (router config); a
  learned router's features (the ``router`` step, cascades/router_stage.py) count in this tier.
- VLM: ``cascades.vlm`` prices tokens (``cost_per_1k_*_tokens``); before a call the budget
  reserves ``vlm_reserve_units``, the most one call may cost.
- Human review: ``review_units_per_minute`` x ``expected_review_minutes`` per queued item.

A trace's steps carry their ``cost_units``; ``costs_by_tier`` sums them per tier, which is
what the budget ledger settles and the ``/metrics`` totals report.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from visionroute.records import Trace

Tier = Literal["onnx", "vlm", "review"]
TIERS: tuple[str, ...] = ("onnx", "vlm", "review")


class CostModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    review_units_per_minute: float = Field(2.0, ge=0, description="cost of one reviewer minute")
    expected_review_minutes: float = Field(
        0.5, ge=0, description="reviewer time one queued item is expected to take"
    )
    vlm_reserve_units: float = Field(
        5.0, ge=0, description="reserved before a VLM call: the most one call may cost"
    )

    @property
    def review_units(self) -> float:
        """What queueing one item for review costs (and reserves against a review budget)."""
        return self.review_units_per_minute * self.expected_review_minutes


def tier_of_stage(stage: str) -> str | None:
    """``onnx:classify`` and ``router`` (the learned router's features) -> onnx, ``vlm``/``vlm:*``
    -> vlm, ``review_queue`` -> review."""
    head = stage.split(":", 1)[0]
    if head in ("onnx", "router"):
        return "onnx"
    if head.startswith("vlm"):
        return "vlm"
    if head.startswith("review"):
        return "review"
    return None


def costs_by_tier(trace: Trace) -> dict[str, float]:
    """Cost units per tier in one trace (steps of other stages cost nothing by construction)."""
    totals = {tier: 0.0 for tier in TIERS}
    for step in trace:
        tier = tier_of_stage(step.stage)
        if tier is not None:
            totals[tier] += step.cost_units
    return totals


def review_value(score: float | None, error_cost_units: float) -> float:
    """Value of one review: the chance the machine answer is wrong times what that error costs.

    ``1 - score`` is the error probability when the score is a calibrated confidence; an item
    with no score (the tier failed, nothing answered) is treated as certainly unresolved.
    """
    uncertainty = 1.0 if score is None else min(1.0, max(0.0, 1.0 - float(score)))
    return uncertainty * error_cost_units
