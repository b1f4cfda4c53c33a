"""Learn then Test: exact p-values, monotone in the targets, valid on data with known risk."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from policies.risk_control import (
    TierCosts,
    TierOutcomes,
    binomial_p_value,
    choose_tier_thresholds,
    clopper_pearson_upper,
    hoeffding_bentkus_p_value,
    learn_then_test,
    min_items_to_certify,
    threshold_grid,
)
from visionroute.errors import ConfigError, InputError

GRID = np.linspace(1.0, 0.0, 51)


def synthetic(n: int, rng: np.random.Generator):
    """Scores U(0, 1), P(wrong | s) = 0.4 (1 - s)^2: selective risk at t is 0.4 (1 - t)^2 / 3."""
    scores = rng.uniform(size=n)
    return scores, rng.uniform(size=n) < 0.4 * (1 - scores) ** 2


def true_risk(threshold: float) -> float:
    return 0.4 * (1 - threshold) ** 2 / 3


def test_binomial_p_value_is_the_exact_lower_tail():
    assert binomial_p_value(3, 100, 0.1) == pytest.approx(stats.binom.cdf(3, 100, 0.1))
    assert binomial_p_value(0, 0, 0.1) == 1.0
    assert min_items_to_certify(0.05, 0.1) == 45
    assert binomial_p_value(0, 45, 0.05) <= 0.1 < binomial_p_value(0, 44, 0.05)


@settings(deadline=None)
@given(n=st.integers(1, 400), k_frac=st.floats(0, 1), alpha=st.floats(0.01, 0.5), delta=st.floats(0.01, 0.5))
def test_binomial_test_agrees_with_the_clopper_pearson_bound(n, k_frac, alpha, delta):
    k = int(k_frac * n)
    p = binomial_p_value(k, n, alpha)
    bound = clopper_pearson_upper(k, n, delta)
    if abs(p - delta) > 1e-9 and abs(bound - alpha) > 1e-9:  # away from the exact tie
        assert (p <= delta) == (bound <= alpha)


@settings(deadline=None)
@given(n=st.integers(1, 400), k_frac=st.floats(0, 1), alpha=st.floats(0.01, 0.5))
def test_hoeffding_bentkus_is_never_less_conservative_than_exact(n, k_frac, alpha):
    k = int(k_frac * n)
    assert hoeffding_bentkus_p_value(k / n, n, alpha) >= binomial_p_value(k, n, alpha) - 1e-12


scores_and_errors = st.integers(1, 300).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(0, 1), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),
    )
)


@settings(max_examples=150, deadline=None)
@given(
    data=scores_and_errors,
    a1=st.floats(0.01, 0.5),
    a2=st.floats(0.01, 0.5),
    delta=st.floats(0.01, 0.3),
    p_value=st.sampled_from(["binomial", "hoeffding_bentkus"]),
)
def test_a_stricter_alpha_never_accepts_more(data, a1, a2, delta, p_value):
    scores, errors = map(np.array, data)
    strict, loose = sorted([a1, a2])
    c_strict = learn_then_test(scores, errors, alpha=strict, delta=delta, thresholds=GRID, p_value=p_value)
    c_loose = learn_then_test(scores, errors, alpha=loose, delta=delta, thresholds=GRID, p_value=p_value)
    assert c_strict.n_accepted <= c_loose.n_accepted
    if c_strict.is_feasible:
        assert c_loose.is_feasible and c_strict.threshold >= c_loose.threshold


@settings(max_examples=100, deadline=None)
@given(data=scores_and_errors, d1=st.floats(0.01, 0.5), d2=st.floats(0.01, 0.5))
def test_a_stricter_delta_never_accepts_more(data, d1, d2):
    scores, errors = map(np.array, data)
    strict, loose = sorted([d1, d2])
    assert (
        learn_then_test(scores, errors, alpha=0.1, delta=strict, thresholds=GRID).n_accepted
        <= learn_then_test(scores, errors, alpha=0.1, delta=loose, thresholds=GRID).n_accepted
    )


@settings(max_examples=100, deadline=None)
@given(scores=st.lists(st.floats(0, 1), min_size=1, max_size=300), alpha=st.floats(0.01, 0.5))
def test_infeasible_targets_accept_nothing(scores, alpha):
    errors = np.ones(len(scores), bool)  # every answer wrong: no threshold can be certified
    certificate = learn_then_test(scores, errors, alpha=alpha, delta=0.1, thresholds=GRID)
    assert not certificate.is_feasible and certificate.threshold is None
    assert certificate.coverage == 0.0 and certificate.n_accepted == 0
    assert not certificate.accepts(1.0)
    assert "INFEASIBLE" in certificate.statement() and "coverage 0.0%" in certificate.statement()
    assert certificate.to_dict()["feasible"] is False


@settings(max_examples=100, deadline=None)
@given(data=scores_and_errors, alpha=st.floats(0.02, 0.5))
def test_a_certified_threshold_has_its_bound_below_alpha(data, alpha):
    scores, errors = map(np.array, data)
    certificate = learn_then_test(scores, errors, alpha=alpha, delta=0.1, thresholds=GRID)
    if certificate.is_feasible:
        accepted = scores >= certificate.threshold
        assert certificate.n_accepted == accepted.sum() and certificate.n_errors == errors[accepted].sum()
        assert certificate.risk_upper_bound <= alpha + 1e-9


def test_the_guarantee_holds_on_data_with_known_risk():
    """Over 1,000 calibration draws the chosen threshold's true risk exceeds alpha at most
    delta of the time (with a binomial margin for the 1,000 draws themselves)."""
    rng = np.random.default_rng(0)
    alpha, delta, draws = 0.05, 0.1, 1000
    violations, coverage = 0, []
    for _ in range(draws):
        grid_scores, _ = synthetic(300, rng)
        scores, errors = synthetic(300, rng)
        grid = threshold_grid(grid_scores, n_test=300, alpha=alpha, delta=delta)
        certificate = learn_then_test(scores, errors, alpha=alpha, delta=delta, thresholds=grid)
        if certificate.is_feasible:
            violations += true_risk(certificate.threshold) > alpha
            coverage.append(1 - certificate.threshold)
    assert violations / draws <= delta + 3 * np.sqrt(delta * (1 - delta) / draws)
    assert np.mean(coverage) > 0.3  # and it is not vacuous: the risk is 0.05 at coverage ~0.61


def test_fixed_sequence_stops_at_the_first_failure():
    # 100 items at 0.9 all right, then 100 at 0.5 all wrong, then 1000 at 0.1 all right: the
    # pooled risk at 0.1 is low, but the sequence must stop at 0.5 and never reach it.
    scores = np.r_[np.full(100, 0.9), np.full(100, 0.5), np.full(1000, 0.1)]
    errors = np.r_[np.zeros(100, bool), np.ones(100, bool), np.zeros(1000, bool)]
    certificate = learn_then_test(scores, errors, alpha=0.2, delta=0.1, thresholds=[0.9, 0.5, 0.1])
    assert certificate.threshold == 0.9 and certificate.n_certified == 1


def test_bad_inputs_are_rejected_with_the_field():
    with pytest.raises(ConfigError) as alpha:
        learn_then_test([0.5], [False], alpha=1.5, delta=0.1, thresholds=[0.5])
    assert alpha.value.field == "alpha"
    with pytest.raises(InputError, match="strictly decreasing"):
        learn_then_test([0.5], [False], alpha=0.1, delta=0.1, thresholds=[0.1, 0.5])
    with pytest.raises(InputError, match="equally long"):
        learn_then_test([0.5, 0.6], [False], alpha=0.1, delta=0.1, thresholds=[0.5])
    with pytest.raises(ConfigError, match="unknown p-value"):
        learn_then_test([0.5], [False], alpha=0.1, delta=0.1, thresholds=[0.5], p_value="bonferroni")  # type: ignore[arg-type]


def test_grid_starts_where_enough_items_can_be_certified():
    rng = np.random.default_rng(0)
    grid = threshold_grid(rng.uniform(size=1000), n_test=900, alpha=0.05, delta=0.1, n_points=50)
    assert (np.diff(grid) < 0).all() and len(grid) <= 50
    assert grid[0] == pytest.approx(1 - 2 * 45 / 900, abs=0.02)  # twice the 45 items alpha=0.05 needs


def tiers(n: int, rng: np.random.Generator, strong_error_rate: float = 0.02) -> TierOutcomes:
    scores, cheap_error = synthetic(n, rng)
    return TierOutcomes(scores, cheap_error, rng.uniform(size=n) < strong_error_rate)


def test_three_tier_plan_is_certified_and_cheaper_than_reviewing_everything():
    rng = np.random.default_rng(1)
    plan = choose_tier_thresholds(
        tiers(2000, rng), tiers(2000, rng), costs=TierCosts(), alpha=0.05, delta=0.1
    )
    assert plan.certificate.is_feasible
    assert plan.certificate.risk_upper_bound <= 0.05
    assert plan.review_threshold <= plan.accept_threshold
    assert plan.expected_cost_units < TierCosts().cheap + TierCosts().review
    assert sum(plan.rates.values()) == pytest.approx(1.0)
    assert {plan.decide(0.999), plan.decide(-1.0)} <= {"accept", "escalate", "review"}
    assert plan.to_dict()["certificate"]["feasible"] is True


def test_three_tier_plan_follows_the_costs():
    rng = np.random.default_rng(2)
    fit, test = tiers(2000, rng, 0.3), tiers(2000, rng, 0.3)  # a VLM that is often wrong
    # With a bad VLM, meeting alpha=0.02 needs humans; cheap humans get more of the work.
    cheap_humans = choose_tier_thresholds(
        fit, test, costs=TierCosts(cheap=1, escalate=10, review=12), alpha=0.02, delta=0.1
    )
    dear_humans = choose_tier_thresholds(
        fit, test, costs=TierCosts(cheap=1, escalate=10, review=1000), alpha=0.02, delta=0.1
    )
    assert cheap_humans.certificate.is_feasible and dear_humans.certificate.is_feasible
    assert cheap_humans.rates["review"] >= dear_humans.rates["review"]


def test_three_tier_plan_infeasible_reviews_everything():
    rng = np.random.default_rng(3)
    bad = TierOutcomes(rng.uniform(size=500), np.ones(500, bool), np.ones(500, bool))
    plan = choose_tier_thresholds(bad, bad, costs=TierCosts(), alpha=0.05, delta=0.1)
    assert not plan.certificate.is_feasible
    assert plan.rates == {"accept": 0.0, "escalate": 0.0, "review": 1.0}
    assert plan.decide(1.0) == "review"
    assert plan.to_dict()["accept_threshold"] == "inf"
