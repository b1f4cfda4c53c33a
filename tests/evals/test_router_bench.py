"""``bench router``'s arithmetic (evals.benchmarks.router) and the direction the learned router
must move the certified cost on a population where the confidence misses a signal."""

from __future__ import annotations

import numpy as np
import pytest

from evals.benchmarks.router import alpha_oracle, apply_plan, zero_error_oracle
from policies.risk_control import TierCosts, TierOutcomes, choose_tier_thresholds
from policies.router_learner import LearnedScore, cross_fitted_scores

NAMES = ("confidence", "second")


def population(n: int, rng: np.random.Generator):
    """The confidence ranks the cheap tier's errors only in part; a second feature flags a
    region where the cheap tier is often wrong at any confidence. The second tier is always
    right here (the test is about which cheap answers to accept)."""
    confidence = rng.uniform(size=n)
    second = rng.uniform(size=n)
    p_wrong = 0.01 + 0.1 * (1 - confidence) ** 2 + 0.6 * (second < 0.1)
    cheap_error = rng.uniform(size=n) < p_wrong
    return np.column_stack([confidence, second]), cheap_error, np.zeros(n, bool)


def test_oracles():
    rng = np.random.default_rng(0)
    _, cheap_error, _ = population(5000, rng)
    strong_error = rng.uniform(size=5000) < 0.05
    prices = TierCosts()
    zero = zero_error_oracle(cheap_error, strong_error, prices=prices)
    alpha = alpha_oracle(cheap_error, strong_error, alpha=0.04, prices=prices)
    assert alpha.accepted_error <= 0.04 and alpha.cost_per_1000 < zero.cost_per_1000
    assert sum(alpha.shares.values()) == pytest.approx(1.0) and sum(zero.shares.values()) == pytest.approx(
        1.0
    )


@pytest.mark.slow
def test_learned_certified_cost_is_below_confidence_certified_over_draws():
    alpha, delta, prices = 0.05, 0.1, TierCosts()
    learned, confidence = [], []
    for seed in range(16):
        rng = np.random.default_rng(seed)
        x_fit, e_fit, s_fit = population(400, rng)
        x_cert, e_cert, s_cert = population(400, rng)
        x_rest, e_rest, s_rest = population(4000, rng)
        model = LearnedScore.fit(x_fit, ~e_fit, NAMES)
        for costs, fit_score, cert_score, rest_score in (
            (
                learned,
                cross_fitted_scores(x_fit, ~e_fit, NAMES, folds=3),
                model.score(x_cert),
                model.score(x_rest),
            ),
            (confidence, x_fit[:, 0], x_cert[:, 0], x_rest[:, 0]),
        ):
            plan = choose_tier_thresholds(
                TierOutcomes(fit_score, e_fit, s_fit),
                TierOutcomes(cert_score, e_cert, s_cert),
                costs=prices,
                alpha=alpha,
                delta=delta,
                n_points=25,
            )
            out = apply_plan(
                plan,
                rest_score,
                np.ones(len(rest_score)),
                e_rest,
                s_rest,
                alpha=alpha,
                cheap_price=1.0,
                prices=prices,
            )
            costs.append(out.cost_per_1000)
    # a direction with a margin over many draws, not a pinned number
    # (seen here: medians about 0.55x apart, the learned one lower in every draw)
    assert np.median(learned) < 0.8 * np.median(confidence)
    assert np.mean(np.array(learned) < np.array(confidence)) >= 0.75
