"""The three-tier certificate with the VLM's calibrated confidence: a third, certified threshold.

Seeded regression checks on synthetic tiers with known error rates; how often the certificate
holds over many random splits is a figure of ``visionroute bench vlm-digits``, not a test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.risk_control import (
    RiskCertificate,
    TierCosts,
    TierOutcomes,
    TierPlan,
    _plan_stats,
    choose_tier_thresholds,
)
from policies.vlm_decision import VlmOutcome, VlmPolicy, decide_after_vlm
from visionroute.errors import InputError

ALPHA, DELTA = 0.05, 0.1


def three_tiers(n: int, rng: np.random.Generator, *, informative: bool) -> TierOutcomes:
    """Cheap: score U(0, 1), P(wrong | s) = 0.4 (1 - s)^2. VLM: wrong 1 time in 6 overall; with an
    informative confidence v ~ U(0, 1), P(wrong | v) = 0.5 (1 - v)^2; with a useless one, v is
    independent of whether the answer is wrong. 2% of VLM calls give no answer (NaN)."""
    cheap_score = rng.uniform(size=n)
    cheap_error = rng.uniform(size=n) < 0.4 * (1 - cheap_score) ** 2
    strong_score = rng.uniform(size=n)
    p_wrong = 0.5 * (1 - strong_score) ** 2 if informative else np.full(n, 1 / 6)
    strong_error = rng.uniform(size=n) < p_wrong
    strong_score[rng.uniform(size=n) < 0.02] = np.nan
    return TierOutcomes(cheap_score, cheap_error, strong_error, strong_score)


def without_vlm_scores(data: TierOutcomes) -> TierOutcomes:
    # today's plan: an item without a VLM answer is a wrong answer when accepted
    return TierOutcomes(data.cheap_score, data.cheap_error, data.strong_error | np.isnan(data.strong_score))


def accepted_error(plan: TierPlan, data: TierOutcomes) -> tuple[float, int]:
    """The plan applied item by item with its own decide rules: (error among accepted, accepted)."""
    errors = accepted = 0
    for score, cheap_wrong, strong_score, strong_wrong in zip(
        data.cheap_score, data.cheap_error, data.strong_score, data.strong_error
    ):
        decision = plan.decide(score)
        if decision == "accept":
            accepted, errors = accepted + 1, errors + cheap_wrong
        elif decision == "escalate" and plan.decide_vlm(strong_score) == "accept":
            accepted, errors = accepted + 1, errors + strong_wrong
    return errors / max(accepted, 1), accepted


def test_the_vlm_threshold_is_certified_and_used():
    rng = np.random.default_rng(11)
    fit, test = three_tiers(2000, rng, informative=True), three_tiers(2000, rng, informative=True)
    plan = choose_tier_thresholds(fit, test, costs=TierCosts(), alpha=ALPHA, delta=DELTA)
    assert plan.certificate.is_feasible and plan.certificate.risk_upper_bound <= ALPHA
    # a real threshold: neither "every VLM answer" (-inf) nor "none" (inf)
    assert plan.vlm_accept_threshold is not None and math.isfinite(plan.vlm_accept_threshold)
    assert plan.rates["vlm_accept"] > 0.0
    assert plan.rates["accept"] + plan.rates["vlm_accept"] + plan.rates["review"] == pytest.approx(1.0)
    assert plan.decide_vlm(1.0) == "accept" and plan.decide_vlm(math.nan) == "review"
    assert plan.decide_vlm(None) == "review"
    assert plan.to_dict()["vlm_accept_threshold"] == plan.vlm_accept_threshold
    assert plan.certificate.extra["vlm_accept_threshold"] == plan.vlm_accept_threshold
    # Where the VLM's confidence says it is right, trusting it costs less than today's plan,
    # which must accept every escalated answer or none.
    today = choose_tier_thresholds(
        without_vlm_scores(fit), without_vlm_scores(test), costs=TierCosts(), alpha=ALPHA, delta=DELTA
    )
    assert today.vlm_accept_threshold is None
    assert plan.expected_cost_units < today.expected_cost_units
    # On fresh items from the same distribution the plan keeps its promise (seeded check).
    risk, accepted = accepted_error(plan, three_tiers(20000, np.random.default_rng(12), informative=True))
    assert accepted > 0 and risk <= ALPHA


def test_a_vlm_with_useless_confidence_sends_its_low_confidence_answers_to_review():
    rng = np.random.default_rng(21)
    useless = choose_tier_thresholds(
        three_tiers(2000, rng, informative=False),
        three_tiers(2000, rng, informative=False),
        costs=TierCosts(),
        alpha=ALPHA,
        delta=DELTA,
    )
    rng = np.random.default_rng(21)
    informative = choose_tier_thresholds(
        three_tiers(2000, rng, informative=True),
        three_tiers(2000, rng, informative=True),
        costs=TierCosts(),
        alpha=ALPHA,
        delta=DELTA,
    )
    assert useless.certificate.is_feasible and useless.certificate.risk_upper_bound <= ALPHA
    # A VLM wrong 1 time in 6 cannot be trusted wholesale at alpha = 0.05: its answers below
    # the threshold go to a human, and it is trusted less than a VLM whose confidence means something.
    assert useless.vlm_accept_threshold > 0.1
    assert useless.decide_vlm(0.05) == "review"
    assert useless.rates["vlm_accept"] < informative.rates["vlm_accept"]
    fresh = three_tiers(20000, np.random.default_rng(22), informative=False)
    risk, accepted = accepted_error(useless, fresh)
    assert accepted > 0 and risk <= ALPHA


def test_without_vlm_scores_the_plan_is_todays():
    rng = np.random.default_rng(31)
    fit, test = three_tiers(1000, rng, informative=True), three_tiers(1000, rng, informative=True)
    plan = choose_tier_thresholds(
        without_vlm_scores(fit), without_vlm_scores(test), costs=TierCosts(), alpha=ALPHA, delta=DELTA
    )
    assert plan.vlm_accept_threshold is None and plan.decide_vlm(0.0) == "accept"
    assert plan.to_dict()["vlm_accept_threshold"] is None and "vlm_accept" not in plan.rates
    assert "vlm_accept_threshold" not in plan.certificate.extra
    assert sum(plan.rates.values()) == pytest.approx(1.0)


def test_an_infeasible_plan_with_vlm_scores_accepts_nothing():
    rng = np.random.default_rng(41)
    bad = TierOutcomes(rng.uniform(size=300), np.ones(300, bool), np.ones(300, bool), rng.uniform(size=300))
    plan = choose_tier_thresholds(bad, bad, costs=TierCosts(), alpha=ALPHA, delta=DELTA)
    assert not plan.certificate.is_feasible and plan.vlm_accept_threshold == math.inf
    assert plan.decide(1.0) == "review" and plan.decide_vlm(1.0) == "review"
    assert plan.to_dict()["vlm_accept_threshold"] == "inf"


def test_bad_strong_scores_are_rejected_with_the_field():
    with pytest.raises(InputError) as shape:
        TierOutcomes(np.zeros(3), np.zeros(3, bool), np.zeros(3, bool), np.zeros(2))
    assert shape.value.field == "strong_score"
    with pytest.raises(InputError) as infinite:
        TierOutcomes(np.zeros(2), np.zeros(2, bool), np.zeros(2, bool), np.array([0.5, np.inf]))
    assert infinite.value.field == "strong_score"
    with_scores = TierOutcomes(np.zeros(2), np.zeros(2, bool), np.zeros(2, bool), np.zeros(2))
    without = TierOutcomes(np.zeros(2), np.zeros(2, bool), np.zeros(2, bool))
    with pytest.raises(InputError, match="both carry strong_score"):
        choose_tier_thresholds(with_scores, without, costs=TierCosts(), alpha=ALPHA, delta=DELTA)


def _plan(accept: float, review: float, vlm_accept: float) -> TierPlan:
    certificate = RiskCertificate(ALPHA, DELTA, 0, None, 0.0, 0, 0, 0.0, 0.0, 1.0, "binomial", 0, 0)
    return TierPlan(accept, review, 0.0, {}, certificate, vlm_accept)


@given(st.floats(0, 1) | st.just(math.nan), st.floats(0, 1))
def test_decide_vlm_is_the_services_rule_after_the_vlm(score, threshold):
    confidence = None if math.isnan(score) else score
    expected, _ = decide_after_vlm(VlmOutcome("7", confidence), VlmPolicy("v", threshold, 1.0))
    assert _plan(0.5, 0.2, threshold).decide_vlm(score) == expected.value


@given(st.integers(0, 2**32 - 1), st.integers(1, 120))
def test_the_vectorised_search_counts_what_the_decide_rules_decide(seed, n):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.uniform(size=n), 2)  # ties with the thresholds on purpose
    strong = np.round(rng.uniform(size=n), 2)
    strong[rng.uniform(size=n) < 0.1] = np.nan
    cheap_error, strong_error = rng.uniform(size=n) < 0.3, rng.uniform(size=n) < 0.3
    data = TierOutcomes(scores, cheap_error, strong_error, strong)
    levels = np.concatenate([[-np.inf], np.round(rng.uniform(size=3), 2), [np.inf]])
    accept_t, review_t, vlm_t = (x.ravel() for x in np.meshgrid(levels, levels, levels, indexing="ij"))
    keep = review_t <= accept_t
    accept_t, review_t, vlm_t = accept_t[keep], review_t[keep], vlm_t[keep]
    n_auto, n_err, n_escalated, n_reviewed, _ = _plan_stats(data, accept_t, review_t, TierCosts(), vlm_t)
    for k in range(len(accept_t)):
        plan = _plan(accept_t[k], review_t[k], vlm_t[k])
        cheap = np.array([plan.decide(s) for s in scores])
        vlm = np.array([plan.decide_vlm(v) for v in strong])
        auto = (cheap == "accept") | ((cheap == "escalate") & (vlm == "accept"))
        assert n_escalated[k] == (cheap == "escalate").sum()
        assert n_auto[k] == auto.sum() and n_reviewed[k] == n - auto.sum()
        wrong = np.where(cheap == "accept", cheap_error, strong_error)
        assert n_err[k] == (auto & wrong).sum()
