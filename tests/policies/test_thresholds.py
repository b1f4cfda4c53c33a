import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from policies.thresholds import ThresholdPolicy, decide_after_cheap_tier
from visionroute.records import Decision, Detections

ORDER = {Decision.REVIEW: 0, Decision.ESCALATE: 1, Decision.ACCEPT: 2}


def answer(confidence: float) -> Detections:
    return Detections(np.array([[0, 0, 10, 10]]), np.array([confidence]), np.array([0]), ("x",))


@pytest.mark.parametrize(
    "score, vlm, expected",
    [
        (0.95, False, Decision.ACCEPT),
        (0.5, True, Decision.ESCALATE),
        (0.5, False, Decision.REVIEW),
        (0.1, True, Decision.REVIEW),
    ],
)
def test_routing_table(score, vlm, expected):
    step = decide_after_cheap_tier(
        answer(score), ThresholdPolicy(accept_threshold=0.7, escalate_threshold=0.3), vlm_available=vlm
    )
    assert step.decision is expected
    assert step.policy_version == "thresholds-v1" and step.threshold == {"accept": 0.7, "escalate": 0.3}
    if expected is Decision.REVIEW and score >= 0.3:
        assert "no VLM is configured" in step.reason


@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1))
def test_a_stricter_accept_threshold_never_accepts_more(score, low, high):
    low, high = sorted((low, high))
    loose = decide_after_cheap_tier(
        answer(score), ThresholdPolicy(accept_threshold=low, escalate_threshold=0), vlm_available=True
    )
    strict = decide_after_cheap_tier(
        answer(score), ThresholdPolicy(accept_threshold=high, escalate_threshold=0), vlm_available=True
    )
    assert ORDER[strict.decision] <= ORDER[loose.decision]


def test_empty_detector_answer_follows_config():
    empty = Detections.empty(("text",))
    assert (
        decide_after_cheap_tier(empty, ThresholdPolicy(score="min_box"), vlm_available=False).decision
        is Decision.ACCEPT
    )
    review = ThresholdPolicy(score="min_box", empty_result="review")
    assert decide_after_cheap_tier(empty, review, vlm_available=False).decision is Decision.REVIEW


def test_escalate_threshold_above_accept_is_rejected():
    with pytest.raises(ValidationError, match="must not exceed"):
        ThresholdPolicy(accept_threshold=0.5, escalate_threshold=0.6)
