"""The learned score (policies.router_learner), its certificate over many splits, and the
three-tier plan's review-capacity constraint (policies.risk_control)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from policies.certify import certify_split
from policies.risk_control import TierCosts, TierOutcomes, choose_tier_thresholds
from policies.router_learner import LearnedScore, cross_fitted_scores
from visionroute.errors import ConfigError

NAMES = ("confidence", "second")


def population(n: int, rng: np.random.Generator):
    """Two features; the answer is wrong with a probability that depends on both (the second
    carries signal the confidence misses)."""
    x = rng.uniform(size=(n, 2))
    p_wrong = 0.02 + 0.5 * (x[:, 0] < 0.25) * (x[:, 1] < 0.6) + 0.25 * (x[:, 1] < 0.15)
    return x, rng.uniform(size=n) < p_wrong


def test_learner_round_trips_through_json():
    rng = np.random.default_rng(0)
    x, wrong = population(300, rng)
    learner = LearnedScore.fit(x, ~wrong, NAMES)
    text = json.dumps(learner.to_document())
    loaded = LearnedScore.from_document(json.loads(text), feature_names=NAMES)
    np.testing.assert_array_equal(loaded.score(x), learner.score(x))
    assert loaded.sha256 == learner.sha256
    out_of_fold = cross_fitted_scores(x, ~wrong, NAMES, folds=5, seed=0)
    assert out_of_fold.shape == (300,) and not np.allclose(out_of_fold, learner.score(x))
    sklearn_like = 1 / (
        1 + np.exp(-(learner.intercept + ((x - learner.mean) / learner.scale) @ learner.coef))
    )
    np.testing.assert_allclose(learner.score(x), sklearn_like, rtol=1e-12)


def test_learner_names_the_mismatched_field():
    x, wrong = population(100, np.random.default_rng(1))
    learner = LearnedScore.fit(x, ~wrong, NAMES)
    with pytest.raises(ConfigError) as info:
        LearnedScore.from_document(learner.to_document(), feature_names=("confidence", "other"))
    assert info.value.field == "learner.feature_names"
    document = {**learner.to_document(), "scale": [1.0, -1.0]}
    with pytest.raises(ConfigError) as info:
        LearnedScore.from_document(document)
    assert info.value.field == "learner.scale"


@pytest.mark.slow
def test_certificate_on_a_learned_score_holds_over_many_splits():
    """Fit the learner on a fit share, certify on a certification share it never saw, and
    measure the true accepted error on a large fresh sample: above alpha in at most delta of
    the splits, plus a binomial allowance."""
    alpha, delta, splits = 0.1, 0.1, 200
    violations = certified = 0
    for seed in range(splits):
        rng = np.random.default_rng(seed)
        x_fit, wrong_fit = population(200, rng)
        x_cert, wrong_cert = population(300, rng)
        x_pop, wrong_pop = population(5_000, rng)
        learner = LearnedScore.fit(x_fit, ~wrong_fit, NAMES)
        # the grid from the fit share only (in-sample scores here: any fit-only choice keeps the
        # guarantee; the router's out-of-fold scores are tested above)
        result = certify_split(
            learner.score(x_fit), wrong_fit, learner.score(x_cert), wrong_cert, alpha=alpha, delta=delta
        )
        threshold = result.certificate.threshold
        if threshold is None:
            continue
        certified += 1
        accepted = learner.score(x_pop) >= threshold
        violations += bool(accepted.any() and wrong_pop[accepted].mean() > alpha)
    assert certified > splits / 2  # the test can fail: most splits must certify something
    allowance = delta + 3 * math.sqrt(delta * (1 - delta) / splits)
    assert violations / splits <= allowance


def tiers(n: int, seed: int) -> TierOutcomes:
    rng = np.random.default_rng(seed)
    score = rng.uniform(size=n)
    cheap_error = rng.uniform(size=n) < 0.4 * (1 - score) ** 2
    strong_score = rng.uniform(size=n)
    strong_error = rng.uniform(size=n) < 0.2 * (1 - strong_score) ** 2
    return TierOutcomes(score, cheap_error, strong_error, strong_score)


def test_review_capacity_reports_the_smallest_feasible_share():
    fit, test = tiers(400, 1), tiers(600, 2)
    kwargs = dict(costs=TierCosts(), alpha=0.05, delta=0.1)
    free = choose_tier_thresholds(fit, test, **kwargs)
    assert free.capacity is None and free.certificate.is_feasible
    tight = choose_tier_thresholds(fit, test, max_review_share=0.0, **kwargs)
    assert tight.capacity["feasible"] is False
    assert (
        math.isinf(tight.accept_threshold) and tight.rates["review"] == 1.0
    )  # infeasible: review everything
    smallest = tight.capacity["smallest_feasible_review_share"]
    assert 0.0 < smallest <= free.rates["review"]
    at = choose_tier_thresholds(fit, test, max_review_share=smallest, **kwargs)
    assert at.capacity["feasible"] and at.rates["review"] <= smallest + 1e-12
    assert at.certificate.is_feasible and at.capacity["smallest_feasible_review_share"] == smallest
    below = choose_tier_thresholds(fit, test, max_review_share=smallest - 1e-9, **kwargs)
    assert below.capacity["feasible"] is False
    assert at.expected_cost_units >= free.expected_cost_units - 1e-12  # a constraint never lowers the cost
    assert "capacity" in at.to_dict() and "capacity" not in free.to_dict()
