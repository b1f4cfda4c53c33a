"""The rollout test: seeded regression checks (its error rates over many streams: bench rollout)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.sequential import (
    BernoulliConfidenceSequence,
    RolloutConfig,
    RolloutMonitor,
    SequentialInputError,
    confidence_bounds,
    log_mixture_martingale,
    log_worse_e_value,
)


def _feed(monitor: RolloutMonitor, risks: dict, costs: dict, labels: int, seed: int) -> str:
    """Alternating labels from both arms until a decision or ``labels`` run out."""
    rng = np.random.default_rng(seed)
    for i in range(labels):
        arm = ("candidate", "incumbent")[i % 2]
        decision = monitor.observe(arm, is_error=bool(rng.random() < risks[arm]), cost=costs[arm])
        if decision != "continue":
            return decision
    return monitor.decision


def test_clearly_worse_candidate_is_rolled_back():
    monitor = RolloutMonitor(RolloutConfig(alpha=0.05, delta=0.05))
    decision = _feed(monitor, {"candidate": 0.3, "incumbent": 0.02}, {"candidate": 1, "incumbent": 1}, 400, 1)
    status = monitor.status()
    assert decision == "rollback" == status["decision"]
    assert status["arms"]["candidate"]["lower"] > 0.05  # shown above alpha
    assert status["decided_after_labels"]["candidate"] < 200
    assert "above alpha" in status["reason"]


def test_worse_than_incumbent_but_below_alpha_is_rolled_back_by_the_comparison():
    monitor = RolloutMonitor(RolloutConfig(alpha=0.2, delta=0.05))
    decision = _feed(
        monitor, {"candidate": 0.15, "incumbent": 0.01}, {"candidate": 1, "incumbent": 1}, 2000, 2
    )
    status = monitor.status()
    assert decision == "rollback"
    assert status["arms"]["candidate"]["lower"] <= 0.2  # not via alpha...
    assert status["evidence"]["candidate_worse_e_value"] >= status["evidence"]["e_value_threshold"]
    assert "incumbent" in status["reason"]


def test_equal_but_cheaper_candidate_is_promoted_after_enough_labels():
    monitor = RolloutMonitor(RolloutConfig(alpha=0.05, delta=0.05))
    risks = {"candidate": 0.01, "incumbent": 0.01}
    assert _feed(monitor, risks, {"candidate": 0.5, "incumbent": 1.0}, 60, 3) == "continue"  # too early
    decision = _feed(monitor, risks, {"candidate": 0.5, "incumbent": 1.0}, 1200, 4)
    status = monitor.status()
    assert decision == "promote"
    assert status["arms"]["candidate"]["upper"] < 0.05
    assert status["arms"]["candidate"]["mean_cost"] < status["arms"]["incumbent"]["mean_cost"]


def test_equal_but_dearer_candidate_is_not_promoted():
    monitor = RolloutMonitor(RolloutConfig(alpha=0.05, delta=0.05))
    decision = _feed(
        monitor, {"candidate": 0.01, "incumbent": 0.01}, {"candidate": 1.5, "incumbent": 1.0}, 1200, 4
    )
    assert decision == "continue"
    assert monitor.arms["candidate"].cs.upper < 0.05  # risk was shown below alpha...
    assert "above the incumbent's" in monitor.reason  # ...but the cost blocks it


def test_decision_is_final():
    monitor = RolloutMonitor(RolloutConfig(alpha=0.05, delta=0.05))
    _feed(monitor, {"candidate": 0.5, "incumbent": 0.0}, {"candidate": 1, "incumbent": 1}, 400, 5)
    assert monitor.decision == "rollback"
    for _ in range(300):
        monitor.observe("candidate", is_error=False)
    assert monitor.decision == "rollback"


def test_bounds_contain_the_truth_at_every_time_on_a_seeded_stream():
    cs = BernoulliConfidenceSequence(delta=0.05)
    rng = np.random.default_rng(7)
    widths = []
    for x in rng.random(1500) < 0.1:
        cs.update(bool(x))
        assert cs.lower <= 0.1 <= cs.upper
        widths.append(cs.upper - cs.lower)
    assert widths[-1] < 0.07 < 0.15 < widths[99]  # it narrows
    assert cs.lower <= cs.rate <= cs.upper


def test_bounds_sit_where_the_martingale_crosses_one_over_delta():
    errors, labelled, delta = np.array([3, 40, 0]), np.array([200, 500, 80]), 0.05
    lower, upper = confidence_bounds(errors, labelled, delta, 1.0, 19.0)
    threshold = math.log(1 / delta)
    for bound, inward in ((lower, 1e-9), (upper, -1e-9)):
        at = log_mixture_martingale(errors, labelled, bound, 1.0, 19.0)
        inside = log_mixture_martingale(errors, labelled, bound + inward, 1.0, 19.0)
        has_end = (bound > 0) & (bound < 1)
        assert np.all(at[has_end] >= threshold) and np.all(inside[has_end] < threshold)
    assert lower[2] == 0.0 and confidence_bounds(0, 0, delta, 1.0, 1.0) == (0.0, 1.0)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 300),
    st.integers(0, 300),
    st.integers(0, 300),
    st.integers(0, 300),
    st.floats(0.001, 0.999),
    st.floats(0.0, 1.0),
)
def test_worse_e_value_is_the_infimum_over_the_null(sc, extra_c, si, extra_i, p_i, shrink):
    """E_n <= M_c(p_c) * M_i(p_i) at every null point p_c <= p_i, and E_n <= 1 when the candidate
    looks no worse."""
    nc, ni = sc + extra_c, si + extra_i
    log_e = float(log_worse_e_value(sc, nc, si, ni, 1.0, 19.0))
    p_c = p_i * shrink
    at_null = log_mixture_martingale(sc, nc, p_c, 1.0, 19.0) + log_mixture_martingale(si, ni, p_i, 1.0, 19.0)
    assert log_e <= float(at_null) + 1e-9
    if nc and ni and sc / nc <= si / ni:
        assert log_e <= 1e-12


def test_json_round_trip_is_exact_and_deterministic():
    config = RolloutConfig(alpha=0.1, delta=0.1, cost_tolerance=0.05, min_cost_observations=5)
    first, second = RolloutMonitor(config), RolloutMonitor(config)
    for monitor in (first, second):
        _feed(monitor, {"candidate": 0.05, "incumbent": 0.05}, {"candidate": 1.0, "incumbent": 1.0}, 150, 9)
    assert first.to_json() == second.to_json()  # same outcomes, same state
    restored = RolloutMonitor.from_json(first.to_json())
    assert restored.to_json() == first.to_json()
    assert restored.status() == first.status()
    for monitor in (first, restored):
        _feed(monitor, {"candidate": 0.05, "incumbent": 0.05}, {"candidate": 1.0, "incumbent": 1.0}, 100, 10)
    assert restored.to_json() == first.to_json()  # and it goes on identically
    assert json.loads(first.to_json())["config"]["alpha"] == 0.1


def test_confidence_sequence_round_trip():
    cs = BernoulliConfidenceSequence(0.1, 0.5, 0.5).update_many([1, 0, 0, True, False])
    assert BernoulliConfidenceSequence.from_dict(cs.to_dict()).to_dict() == cs.to_dict()


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: BernoulliConfidenceSequence(delta=0.0), "delta"),
        (lambda: BernoulliConfidenceSequence(delta=1.5), "delta"),
        (lambda: BernoulliConfidenceSequence(prior_a=-1.0), "prior_a"),
        (lambda: BernoulliConfidenceSequence().update(2), "x"),
        (lambda: BernoulliConfidenceSequence().update(0.5), "x"),
        (lambda: BernoulliConfidenceSequence().update("1"), "x"),
        (lambda: BernoulliConfidenceSequence().e_value(1.2), "p"),
        (lambda: RolloutMonitor().observe("canary", is_error=True), "arm"),
        (lambda: RolloutMonitor().observe("candidate"), "is_error"),
        (lambda: RolloutMonitor().observe("candidate", is_error=1), "is_error"),
        (lambda: RolloutMonitor().observe("candidate", cost=-1.0), "cost"),
        (lambda: RolloutMonitor().observe("candidate", cost=float("nan")), "cost"),
        (lambda: RolloutMonitor.from_json("{not json"), "text"),
        (lambda: confidence_bounds([5], [3], 0.05, 1.0, 1.0), "errors"),
    ],
)
def test_bad_input_names_the_argument(call, field):
    with pytest.raises(ValueError) as raised:
        call()
    assert isinstance(raised.value, SequentialInputError)
    assert raised.value.field == field
    assert field in str(raised.value)


def test_bad_config_and_state_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        RolloutConfig(alpha=1.0)
    with pytest.raises(ValueError, match="fraction|extra"):
        RolloutConfig(fraction=0.5)
    state = json.loads(RolloutMonitor().to_json())
    state["arms"]["candidate"]["errors"] = 3  # more errors than labels
    with pytest.raises(ValueError, match="cannot exceed"):
        RolloutMonitor.from_dict(state)
    state = json.loads(RolloutMonitor().to_json())
    del state["arms"]["incumbent"]
    with pytest.raises(ValueError, match="arms"):
        RolloutMonitor.from_dict(state)


def test_bench_simulation_runs_the_monitor_rule_and_the_peeking_baseline_breaks():
    """``bench rollout`` on a few streams: ours stays within delta/2 at the null boundary, the
    fixed-n test re-run after every label does not (seeded; the 1000-stream figures: the bench)."""
    from evals.benchmarks.rollout import Scenario, simulate

    config = RolloutConfig(alpha=0.05, delta=0.05)
    row = simulate(
        Scenario("risk = alpha", 0.05, 0.02, "promotion_rate"),
        config,
        streams=300,
        horizon=1000,
        candidate_share=0.5,
        seed=0,
    )
    assert row["seq_promotion_rate"] <= config.delta / 2 < row["naive_promotion_rate"]
