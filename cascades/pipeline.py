"""Run one ``Analysis`` through the cascade: cheap tier -> thresholds -> (VLM) -> review.

The tiers come in as async callables so the same code runs in-process (tests, evals) and
behind Ray Serve handles (the router). A tier that fails becomes a recorded step that routes
to review; it is never a silent accept. Every decision here comes from
``policies.thresholds.decide``, the rule trace replay calls too.

The cheap tier's step records what a replay needs to re-judge the answer under another policy:
``details.confidences`` (every row's confidence, as the shortest decimal that reads back to the
same float32) and ``details.is_calibrated``; the policy step records ``vlm_available``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from policies.thresholds import ThresholdPolicy, answer_score, decide, decide_after_cheap_tier
from visionroute.records import Analysis, Decision, Detections, Step
from visionroute.redaction import failure_summary

if TYPE_CHECKING:
    from policies.shift_guard import ShiftGuard

log = logging.getLogger("visionroute.cascade")


@dataclass(frozen=True)
class TierResult:
    """What the cheap tier hands back across the process boundary."""

    detections: Detections
    model: str
    model_version: str
    latency_ms: float
    cost_units: float
    calibration: dict | None = None  # Calibrator.trace_details(): artefact id and certificate


CheapTier = Callable[[np.ndarray], Awaitable[TierResult]]


class VlmTier(Protocol):
    async def __call__(self, analysis: Analysis) -> Analysis: ...


async def run_cascade(
    analysis: Analysis,
    *,
    cheap_tier: CheapTier,
    policy: ThresholdPolicy,
    vlm: VlmTier | None = None,
    shift_guard: ShiftGuard | None = None,
) -> Analysis:
    """Append the cheap tier's step, the policy's step and, on escalation, the VLM's steps.

    With a ``shift_guard`` (policies/shift_guard.py), a would-be accept is first checked against
    the calibration data's input statistics; a shifted input escalates (or goes to review)."""
    started = time.perf_counter()
    try:
        result = await cheap_tier(analysis.image_rgb)
    except Exception as exc:  # any backend failure must end in review, with its reason
        decision, reason = decide(None, policy, vlm_available=vlm is not None, cheap_tier_failed=True)
        analysis.trace.append(
            Step(
                stage=f"onnx:{analysis.task}",
                decision=decision,
                reason=reason,
                error=_step_error(analysis, "cheap tier", exc),
                latency_ms=(time.perf_counter() - started) * 1000.0,
            )
        )
        return analysis
    analysis.detections = result.detections
    analysis.trace.append(
        Step(
            stage=f"onnx:{analysis.task}",
            model=result.model,
            model_version=result.model_version,
            score=answer_score(result.detections, policy.score),
            latency_ms=result.latency_ms,
            cost_units=result.cost_units,
            details={
                "detections": len(result.detections),
                "label": result.detections.labels[0] if len(result.detections) else None,
                "calibration": (result.calibration or {}).get("calibration"),
                "certificate": (result.calibration or {}).get("certificate"),
                "confidences": _float32_list(result.detections.confidence),
                "is_calibrated": result.detections.is_calibrated,
            },
        )
    )
    analysis.trace.append(decide_after_cheap_tier(result.detections, policy, vlm_available=vlm is not None))
    if shift_guard is not None:
        # every input is checked (the guard's window must see the traffic as it is); only a
        # would-be accept can be changed
        verdict = await asyncio.to_thread(shift_guard.check, analysis.image_rgb)
        if analysis.decision is Decision.ACCEPT:
            analysis.trace.append(shift_guard.step(verdict, Decision.ACCEPT, vlm_available=vlm is not None))
    if analysis.decision is Decision.ESCALATE and vlm is not None:
        started = time.perf_counter()
        try:
            analysis = await vlm(analysis)
        except Exception as exc:  # the VLM stage records its own faults; this is its host failing
            analysis.trace.append(
                Step(
                    stage="vlm",
                    decision=Decision.REVIEW,
                    reason="the VLM tier could not be reached; a human decides",
                    error=_step_error(analysis, "VLM tier", exc),
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                )
            )
    return analysis


def _step_error(analysis: Analysis, tier: str, exc: BaseException) -> str:
    """What a failed tier's step records: the kind and a short message without paths, pids,
    node addresses or actor ids (the trace reaches callers and reviewers); the whole error
    goes to the log under the request id."""
    log.warning("request %s: the %s failed: %r", analysis.trace.request_id, tier, exc)
    return failure_summary(exc)


def _float32_list(values: np.ndarray) -> list[float]:
    """JSON-ready floats that read back (as float32) to exactly ``values``: replay recomputes
    the score from them, so a threshold right at a confidence decides the same way."""
    return [float(str(v)) for v in np.asarray(values, np.float32)]
