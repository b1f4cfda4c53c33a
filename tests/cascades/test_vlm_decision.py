"""Properties of the decision after the VLM (policies/vlm_decision.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.vlm_decision import (
    VlmOutcome,
    VlmPolicy,
    classify_disagreement,
    decide_after_vlm,
    text_disagreement,
    verify_disagreement,
)
from visionroute.records import Decision, Detections, Step

unit = st.floats(0.0, 1.0, allow_nan=False)
outcomes = st.builds(
    VlmOutcome,
    answer=st.one_of(st.none(), st.sampled_from(["cat", "dog", "yes", "no", ""])),
    confidence=st.one_of(st.none(), unit),
    disagreement=st.one_of(st.none(), unit),
    error=st.one_of(st.none(), st.just("timeout: no answer in 1s")),
    invalid_reason=st.one_of(st.none(), st.just("not JSON")),
)
policies = st.builds(VlmPolicy, version=st.just("v1"), accept_threshold=unit, disagreement_margin=unit)


@given(outcomes, policies)
def test_accept_only_when_valid_confident_and_consistent(outcome, policy):
    decision, reason = decide_after_vlm(outcome, policy)
    assert decision in (Decision.ACCEPT, Decision.REVIEW) and reason
    if decision is Decision.ACCEPT:
        assert outcome.error is None and outcome.invalid_reason is None and outcome.answer is not None
        assert outcome.confidence is not None and outcome.confidence >= policy.accept_threshold
        assert outcome.disagreement is None or outcome.disagreement <= policy.disagreement_margin
    # the record type enforces the same promise: a failed step never accepts
    Step(stage="vlm", decision=decision, error=outcome.error)


@given(outcomes, policies, unit)
def test_a_stricter_threshold_never_accepts_more(outcome, policy, stricter):
    strict = VlmPolicy(policy.version, max(policy.accept_threshold, stricter), policy.disagreement_margin)
    if decide_after_vlm(outcome, strict)[0] is Decision.ACCEPT:
        assert decide_after_vlm(outcome, policy)[0] is Decision.ACCEPT


@given(outcomes, policies, unit)
def test_a_tighter_margin_never_accepts_more(outcome, policy, tighter):
    tight = VlmPolicy(policy.version, policy.accept_threshold, min(policy.disagreement_margin, tighter))
    if decide_after_vlm(outcome, tight)[0] is Decision.ACCEPT:
        assert decide_after_vlm(outcome, policy)[0] is Decision.ACCEPT


def test_reasons_name_the_cause():
    policy = VlmPolicy("v1", 0.5, 0.3)
    assert "timeout" in decide_after_vlm(VlmOutcome(None, None, error="timeout: 1s"), policy)[1]
    assert "invalid" in decide_after_vlm(VlmOutcome(None, None, invalid_reason="not JSON"), policy)[1]
    assert "logprobs" in decide_after_vlm(VlmOutcome("cat", None), policy)[1]
    assert "disagrees" in decide_after_vlm(VlmOutcome("cat", 0.9, 0.31), policy)[1]


def _cheap(probabilities, names=("cat", "dog", "cup")) -> Detections:
    return Detections.from_class_probabilities(
        np.array(probabilities), names, width=4, height=4, top_k=len(names)
    )


def test_classify_disagreement():
    cheap = _cheap([0.5, 0.3, 0.2])
    assert classify_disagreement(cheap, "cat") == 0.0
    assert classify_disagreement(cheap, "dog") == pytest.approx(0.2)
    assert classify_disagreement(cheap, "wolf") == pytest.approx(0.5)  # outside the top-k: support 0
    assert classify_disagreement(None, "cat") is None


def test_verify_and_text_disagreement():
    assert verify_disagreement(0.9, "yes") == 0.0
    assert verify_disagreement(0.9, "no") == pytest.approx(0.8)
    assert verify_disagreement(0.4, "no") == 0.0  # the cheap tier itself leant towards "no"
    assert text_disagreement(None, "abc") is None
    assert text_disagreement("STOP", "STOP") == 0.0 and text_disagreement("STOP", "GO") > 0.5
