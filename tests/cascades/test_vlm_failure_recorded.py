"""Every VLM step that failed says why in ``details.failure`` (metrics and the soak count by it):
the VLM stage's own backend failures, an invalid answer, and a VLM tier whose host failed
before the stage could record anything (its replica died, its call timed out)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cascades.pipeline import TierResult, run_cascade
from cascades.vlm import VlmConfig, VlmStage
from cascades.vlm.client import VlmBackendError, VlmCompletion
from policies.thresholds import ThresholdPolicy
from visionroute.records import Analysis, Decision, Detections

LABELS = ("cat", "dog")


def escalated_analysis() -> Analysis:
    image = np.zeros((32, 32, 3), np.uint8)
    return Analysis(image, "0" * 64, "classify")


async def unsure_cheap_tier(image: np.ndarray) -> TierResult:
    detections = Detections.from_class_probabilities(np.array([0.55, 0.45]), LABELS, width=32, height=32)
    return TierResult(detections, "tiny", "tiny==1", 1.0, 1.0)


def cascade_with(vlm) -> Analysis:
    policy = ThresholdPolicy(accept_threshold=0.9, escalate_threshold=0.1)  # 0.55 escalates
    return asyncio.run(
        run_cascade(escalated_analysis(), cheap_tier=unsure_cheap_tier, policy=policy, vlm=vlm)
    )


@pytest.mark.parametrize(
    "error, failure",
    [
        (RuntimeError("The actor died unexpectedly before finishing this task"), "tier_unavailable"),
        (TimeoutError("the VLM tier's call timed out"), "timeout"),
    ],
)
def test_a_vlm_tier_whose_host_fails_is_a_review_step_naming_its_failure(error, failure):
    async def dead_tier(analysis: Analysis) -> Analysis:
        raise error

    result = cascade_with(dead_tier)
    step = result.trace.steps[-1]
    assert step.stage == "vlm" and step.decision is Decision.REVIEW and step.error
    assert step.details["failure"] == failure


class ScriptedBackend:
    def __init__(self, result) -> None:
        self.result = result

    def complete(self, request):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.mark.parametrize(
    "result, failure",
    [
        (VlmBackendError("cannot reach the VLM server", kind="connection"), "connection"),
        (VlmCompletion("not json", "stop", (), 10, 2, "m", 1, 5.0), "invalid_output"),
    ],
)
def test_the_vlm_stage_names_the_failure_of_every_errored_step(result, failure):
    stage = VlmStage(VlmConfig(labels=LABELS), ScriptedBackend(result))

    async def tier(analysis: Analysis) -> Analysis:
        return stage.run(analysis)

    step = cascade_with(tier).trace.steps[-1]
    assert step.stage == "vlm" and step.decision is Decision.REVIEW and step.error
    assert step.details["failure"] == failure
