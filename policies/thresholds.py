"""Threshold routing after the cheap tier: accept, escalate to the VLM, or human review.

    cheap tier failed                         -> review (a failed step never accepts)
    no detections                             -> empty_result (accept or review)
    score >= accept_threshold                 -> accept
    escalate_threshold <= score < accept      -> escalate (review when no VLM is configured)
    score < escalate_threshold                -> review

``decide`` is that table, and the only copy of it: the pipeline (``decide_after_cheap_tier``),
trace replay (``evals.replay``) and the three-tier risk-control plan
(``policies.risk_control.TierPlan.decide``) all call it, so they cannot disagree.

The score of an answer follows the policy's ``score`` rule (``answer_score``): ``top1`` the
highest confidence (a classifier's top-1), ``min_box`` the lowest (every box must be sure for
the answer to be), ``mean_box`` the mean. An answer with no boxes has no score and follows
``empty_result``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from visionroute.errors import ConfigError
from visionroute.records import Decision, Detections, Step

SCORE_RULES: tuple[str, ...] = ("top1", "min_box", "mean_box")
CHEAP_TIER_FAILED_REASON = "the cheap tier failed; a human decides"


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


class RoutingThresholds(Protocol):
    """What ``decide`` reads: a ``ThresholdPolicy``, or a ``TierPlan`` (whose thresholds may be
    infinite: ``inf`` never accepts the cheap answer, ``-inf`` never sends to a human)."""

    @property
    def accept_threshold(self) -> float: ...

    @property
    def escalate_threshold(self) -> float: ...

    @property
    def empty_result(self) -> str: ...


def answer_score(detections: Detections | Sequence[float] | np.ndarray, rule: str) -> float | None:
    """The answer's score under ``rule``; None when it has no boxes.

    Takes a ``Detections`` or its confidences alone (as a trace records them): these are read
    as float32, the dtype of ``Detections.confidence``, so a replayed score equals the live one.
    """
    if rule not in SCORE_RULES:
        raise ConfigError(f"unknown score rule {rule!r}; expected one of {list(SCORE_RULES)}", field="score")
    if isinstance(detections, Detections):
        confidence = detections.confidence
    else:
        confidence = np.asarray(detections, np.float32).reshape(-1)
    if len(confidence) == 0:
        return None
    if rule == "top1":
        return float(confidence.max())
    if rule == "min_box":
        return float(confidence.min())
    return float(confidence.mean())


def decide(
    score: float | None,
    policy: RoutingThresholds,
    *,
    vlm_available: bool,
    is_calibrated: bool = False,
    cheap_tier_failed: bool = False,
) -> tuple[Decision, str]:
    """The routing decision after the cheap tier, and its reason in one sentence.

    ``score``: the answer's score (``answer_score``), None when the answer has no boxes.
    ``vlm_available``: whether an escalation can reach a VLM; without one it goes to review.
    ``is_calibrated``: only words the reason. ``cheap_tier_failed``: the tier raised, so there
    is no answer to accept. Pure: no I/O, no clock, no state.
    """
    if cheap_tier_failed:
        return Decision.REVIEW, CHEAP_TIER_FAILED_REASON
    if score is None:
        decision = Decision.ACCEPT if policy.empty_result == "accept" else Decision.REVIEW
        return decision, f"no detections; policy empty_result={policy.empty_result}"
    accept, escalate = policy.accept_threshold, policy.escalate_threshold
    calibrated = "calibrated" if is_calibrated else "uncalibrated"
    if score >= accept:
        return Decision.ACCEPT, f"{calibrated} score {score:.3f} >= accept threshold {accept}"
    if score >= escalate and vlm_available:
        return Decision.ESCALATE, f"{calibrated} score {score:.3f} in [{escalate}, {accept}): ask the VLM"
    if score >= escalate:
        return Decision.REVIEW, (
            f"{calibrated} score {score:.3f} in [{escalate}, {accept}) would "
            "escalate, but no VLM is configured: human review"
        )
    return Decision.REVIEW, f"{calibrated} score {score:.3f} < escalate threshold {escalate}: human review"


def decide_after_cheap_tier(detections: Detections, policy: ThresholdPolicy, *, vlm_available: bool) -> Step:
    """The policy step that follows the ONNX tier, with the reason spelled out.

    Its details record what replay needs beyond the thresholds: whether a VLM was available,
    and the score rule and empty-result rule the score was judged under.
    """
    score = answer_score(detections, policy.score)
    decision, reason = decide(
        score, policy, vlm_available=vlm_available, is_calibrated=detections.is_calibrated
    )
    return Step(
        stage="policy:thresholds",
        decision=decision,
        reason=reason,
        policy_version=policy.version,
        score=score,
        threshold={"accept": policy.accept_threshold, "escalate": policy.escalate_threshold},
        details={
            "vlm_available": vlm_available,
            "score_rule": policy.score,
            "empty_result": policy.empty_result,
        },
    )
