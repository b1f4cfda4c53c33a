import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from cascades.pipeline import _float32_list
from policies.thresholds import ThresholdPolicy, answer_score, decide, decide_after_cheap_tier
from visionroute.errors import ConfigError
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


POLICY = ThresholdPolicy(accept_threshold=0.7, escalate_threshold=0.3)


@pytest.mark.parametrize(
    "score, vlm, calibrated, expected",
    [
        (0.9021, False, False, "uncalibrated score 0.902 >= accept threshold 0.7"),
        (0.5, True, True, "calibrated score 0.500 in [0.3, 0.7): ask the VLM"),
        (
            0.5,
            False,
            False,
            "uncalibrated score 0.500 in [0.3, 0.7) would escalate, but no VLM is configured: human review",
        ),
        (0.28, True, False, "uncalibrated score 0.280 < escalate threshold 0.3: human review"),
        (None, True, False, "no detections; policy empty_result=accept"),
    ],
)
def test_reasons_keep_their_wording(score, vlm, calibrated, expected):
    """The service's golden responses compare these sentences."""
    assert decide(score, POLICY, vlm_available=vlm, is_calibrated=calibrated)[1] == expected


def test_the_policy_step_is_decide_with_what_replay_needs():
    dets = answer(0.5)
    step = decide_after_cheap_tier(dets, POLICY, vlm_available=False)
    assert (step.decision, step.reason) == decide(0.5, POLICY, vlm_available=False)
    assert step.details == {"vlm_available": False, "score_rule": "top1", "empty_result": "accept"}


@given(st.lists(st.floats(0, 1), max_size=8), st.sampled_from(["top1", "min_box", "mean_box"]))
def test_score_from_recorded_confidences_equals_the_live_score(confidences, rule):
    n = len(confidences)
    dets = Detections(np.zeros((n, 4)), np.array(confidences, ndmin=1), np.zeros(n), ())
    recorded = _float32_list(dets.confidence)  # what the pipeline writes to the trace
    assert answer_score(recorded, rule) == answer_score(dets, rule)


def test_unknown_score_rule_names_the_options():
    with pytest.raises(ConfigError, match="'median'.*top1"):
        answer_score([0.5], "median")
