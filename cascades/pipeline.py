"""Run one ``Analysis`` through the cascade: cheap tier -> thresholds -> shift guard -> (VLM).

The cascade is four small stages (``CASCADE_STAGES``) over one state: the cheap tier's step,
the threshold decision, the shift guard's check of a would-be accept, and the VLM on an
escalation. ``run_cascade`` runs them in order for the callers that hold an ``Analysis`` and
the tiers (evals, benchmarks, tests); the service runs the same stage objects inside its analyse
pipeline (router/services/analyze/pipeline.py), whose request context is a ``CascadeState`` too.

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
    from cascades.router_stage import Route
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


class CascadeState(Protocol):
    """What the cascade's stages read and write. ``analysis`` may be replaced by the VLM;
    ``cheap_tier_failed`` is set by the cheap tier's stage (the stages after it then have no
    answer to judge)."""

    analysis: Analysis
    cheap_tier_failed: bool

    @property
    def cheap_tier(self) -> CheapTier: ...

    @property
    def thresholds(self) -> ThresholdPolicy: ...

    @property
    def vlm(self) -> VlmTier | None: ...

    @property
    def shift_guard(self) -> ShiftGuard | None: ...


@dataclass(eq=False)
class CascadeRun:
    """The state of one ``run_cascade`` call."""

    analysis: Analysis
    cheap_tier: CheapTier
    thresholds: ThresholdPolicy
    vlm: VlmTier | None = None
    shift_guard: ShiftGuard | None = None
    cheap_tier_failed: bool = False
    route: Route | None = None  # set by cascades.router_stage.RouterScoreStage, when one runs


class CheapTierStage:
    """The cheap tier's answer and its ``onnx:<task>`` step; a failing tier is a review step
    with its reason (there is no answer to accept)."""

    name = "cheap_tier"

    async def run(self, state: CascadeState) -> None:
        analysis, vlm_available = state.analysis, state.vlm is not None
        started = time.perf_counter()
        try:
            result = await state.cheap_tier(analysis.image_rgb)
        except Exception as exc:  # any backend failure must end in review, with its reason
            state.cheap_tier_failed = True
            decision, reason = decide(
                None, state.thresholds, vlm_available=vlm_available, cheap_tier_failed=True
            )
            analysis.trace.append(
                Step(
                    stage=f"onnx:{analysis.task}",
                    decision=decision,
                    reason=reason,
                    error=_step_error(analysis, "cheap tier", exc),
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                )
            )
            return
        analysis.detections = result.detections
        analysis.trace.append(
            Step(
                stage=f"onnx:{analysis.task}",
                model=result.model,
                model_version=result.model_version,
                score=answer_score(result.detections, state.thresholds.score),
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


class DecideStage:
    """The thresholds' decision on the cheap answer: accept, escalate or review
    (``policy:thresholds``, from ``policies.thresholds``, the rule replay calls too). When a
    learned router ran (``cascades.router_stage.RouterScoreStage`` set ``state.route``), its
    score and the thresholds certified on it decide instead."""

    name = "decide"

    async def run(self, state: CascadeState) -> None:
        analysis = state.analysis
        if state.cheap_tier_failed:
            return
        route = getattr(state, "route", None)
        if route is not None:
            analysis.trace.append(
                route.decide_step(
                    vlm_available=state.vlm is not None,
                    is_calibrated=analysis.detections.is_calibrated,
                )
            )
            return
        analysis.trace.append(
            decide_after_cheap_tier(
                analysis.detections, state.thresholds, vlm_available=state.vlm is not None
            )
        )


class ShiftGuardStage:
    """The calibration data's input statistics against this input (policies/shift_guard.py):
    every input is checked (the guard's window must see the traffic as it is); only a would-be
    accept gets a ``policy:shift_guard`` step, which escalates (or reviews) a shifted input."""

    name = "shift_guard"

    async def run(self, state: CascadeState) -> None:
        guard, analysis = state.shift_guard, state.analysis
        if guard is None or state.cheap_tier_failed:
            return
        verdict = await asyncio.to_thread(guard.check, analysis.image_rgb)
        if analysis.decision is Decision.ACCEPT:
            analysis.trace.append(guard.step(verdict, Decision.ACCEPT, vlm_available=state.vlm is not None))


class VlmStage:
    """An escalated request asks the VLM, which appends its own steps; a VLM host that cannot
    be reached is a ``vlm`` review step with its reason."""

    name = "vlm"

    async def run(self, state: CascadeState) -> None:
        vlm, analysis = state.vlm, state.analysis
        if vlm is None or analysis.decision is not Decision.ESCALATE:
            return
        started = time.perf_counter()
        try:
            state.analysis = await vlm(analysis)
        except Exception as exc:  # the VLM stage records its own faults; this is its host failing
            analysis.trace.append(
                Step(
                    stage="vlm",
                    decision=Decision.REVIEW,
                    reason="the VLM tier could not be reached; a human decides",
                    error=_step_error(analysis, "VLM tier", exc),
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                    # the same key the VLM stage's own failures carry: metrics and the soak count by it
                    details={"failure": _host_failure(exc)},
                )
            )


def _host_failure(exc: BaseException) -> str:
    """The ``failure`` of a VLM tier whose host failed (its replica died, its call timed out)."""
    return "timeout" if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) else "tier_unavailable"


CASCADE_STAGES = (CheapTierStage(), DecideStage(), ShiftGuardStage(), VlmStage())


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
    state = CascadeRun(analysis, cheap_tier, policy, vlm, shift_guard)
    for stage in CASCADE_STAGES:
        await stage.run(state)
    return state.analysis


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
