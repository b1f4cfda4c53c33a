"""Threshold routing after the cheap tier: accept, escalate to the VLM, or human review.

    score >= accept_threshold                 -> accept
    escalate_threshold <= score < accept      -> escalate (review when no VLM is configured)
    score < escalate_threshold                -> review

The score of a classifier answer is its top-1 confidence; of a detector answer, the lowest
confidence among its boxes (every box must be sure for the answer to be). An answer with no
boxes follows ``empty_result``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from visionroute.errors import ConfigError
from visionroute.records import Decision, Detections, Step


class ThresholdPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field("thresholds-v1", min_length=1, description="stamped on every decision")
    accept_threshold: float = Field(0.7, ge=0.0, le=1.0)
    escalate_threshold: float = Field(0.3, ge=0.0, le=1.0)
    score: Literal["top1", "min_box", "mean_box"] = "top1"
    empty_result: Literal["accept", "review"] = "accept"

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdPolicy:
        if self.escalate_threshold > self.accept_threshold:
            raise ValueError(
                f"escalate_threshold ({self.escalate_threshold}) must not exceed "
                f"accept_threshold ({self.accept_threshold})"
            )
        return self


def answer_score(detections: Detections, rule: str) -> float | None:
    if len(detections) == 0:
        return None
    if rule == "top1":
        return float(detections.confidence.max())
    if rule == "min_box":
        return float(detections.confidence.min())
    if rule == "mean_box":
        return float(detections.confidence.mean())
    raise ConfigError(f"unknown score rule {rule!r}; expected top1, min_box or mean_box", field="score")


def decide_after_cheap_tier(detections: Detections, policy: ThresholdPolicy, *, vlm_available: bool) -> Step:
    """The policy step that follows the ONNX tier, with the reason spelled out."""
    thresholds = {"accept": policy.accept_threshold, "escalate": policy.escalate_threshold}
    score = answer_score(detections, policy.score)
    calibrated = "calibrated" if detections.is_calibrated else "uncalibrated"
    if score is None:
        decision = Decision.ACCEPT if policy.empty_result == "accept" else Decision.REVIEW
        reason = f"no detections; policy empty_result={policy.empty_result}"
    elif score >= policy.accept_threshold:
        decision = Decision.ACCEPT
        reason = f"{calibrated} score {score:.3f} >= accept threshold {policy.accept_threshold}"
    elif score >= policy.escalate_threshold and vlm_available:
        decision = Decision.ESCALATE
        reason = f"{calibrated} score {score:.3f} in [{policy.escalate_threshold}, {policy.accept_threshold}): ask the VLM"
    elif score >= policy.escalate_threshold:
        decision = Decision.REVIEW
        reason = (
            f"{calibrated} score {score:.3f} in [{policy.escalate_threshold}, {policy.accept_threshold}) would "
            "escalate, but no VLM is configured: human review"
        )
    else:
        decision = Decision.REVIEW
        reason = (
            f"{calibrated} score {score:.3f} < escalate threshold {policy.escalate_threshold}: human review"
        )
    return Step(
        stage="policy:thresholds",
        decision=decision,
        reason=reason,
        policy_version=policy.version,
        score=score,
        threshold=thresholds,
    )
