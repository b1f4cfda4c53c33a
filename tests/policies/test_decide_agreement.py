"""One rule: the risk-control plan decides exactly as ``policies.thresholds.decide`` does."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from policies.risk_control import RiskCertificate, TierCosts, TierOutcomes, TierPlan, _plan_stats
from policies.thresholds import ThresholdPolicy, decide
from visionroute.records import Decision

UNIT = st.floats(0, 1)
SCORES = st.floats(allow_nan=True, allow_infinity=True) | UNIT


def plan(accept: float, review: float) -> TierPlan:
    certificate = RiskCertificate(0.05, 0.1, 0, None, 0.0, 0, 0, 0.0, 0.0, 1.0, "binomial", 0, 0)
    return TierPlan(accept, review, 0.0, {}, certificate)


@given(SCORES, UNIT, UNIT)
def test_tier_plan_and_decide_agree_on_random_scores(score, a, b):
    escalate, accept = sorted((a, b))
    policy = ThresholdPolicy(accept_threshold=accept, escalate_threshold=escalate)
    expected, _ = decide(score, policy, vlm_available=True)
    assert plan(accept, escalate).decide(score) == expected.value
    assert plan(accept, escalate).decide(score) in ("accept", "escalate", "review")


@given(st.floats(allow_nan=False, allow_infinity=False), UNIT)
def test_infinite_plan_thresholds_mean_never(score, threshold):
    assert plan(math.inf, threshold).decide(score) != "accept"
    assert plan(threshold, -math.inf).decide(score) != "review"
    assert plan(math.inf, math.inf).decide(score) == "review"  # the infeasible plan


@given(st.integers(0, 2**32 - 1), st.integers(1, 200))
def test_the_vectorised_plan_search_counts_what_decide_decides(seed, n):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.uniform(size=n), 2)  # ties with the thresholds on purpose
    levels = np.concatenate([[-np.inf], np.round(rng.uniform(size=6), 2), [np.inf]])
    accept_t, review_t = (x.ravel() for x in np.meshgrid(levels, levels, indexing="ij"))
    keep = review_t <= accept_t
    accept_t, review_t = accept_t[keep], review_t[keep]
    data = TierOutcomes(scores, np.zeros(n, bool), np.zeros(n, bool))
    n_auto, _, n_escalated, n_reviewed, _ = _plan_stats(data, accept_t, review_t, TierCosts())
    for k in range(len(accept_t)):
        decisions = [plan(accept_t[k], review_t[k]).decide(s) for s in scores]
        assert decisions.count("escalate") == n_escalated[k]
        assert decisions.count("review") == n_reviewed[k]
        assert n - decisions.count("review") == n_auto[k]


@given(st.none() | SCORES, UNIT, UNIT, st.booleans(), st.sampled_from(["accept", "review"]))
def test_a_failed_cheap_tier_is_never_accepted(score, a, b, vlm, empty):
    escalate, accept = sorted((a, b))
    policy = ThresholdPolicy(accept_threshold=accept, escalate_threshold=escalate, empty_result=empty)
    decision, reason = decide(score, policy, vlm_available=vlm, cheap_tier_failed=True)
    assert decision is Decision.REVIEW and reason == "the cheap tier failed; a human decides"
