"""Certification from production labels: valid under the audit sampling (Horvitz-Thompson
betting), unlabelled audits counted as errors, too few labels refused with the count needed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evals.benchmarks.recert import Scenario, recert_validity
from policies.production_certify import (
    ProductionSample,
    TooFewLabels,
    certify_production,
    certify_production_plan,
    log_evidence,
)
from policies.risk_control import TierCosts


def population(rng, n, *, slope=8.0, intercept=1.0):
    score = rng.beta(4.0, 1.5, n)
    wrong = rng.random(n) < 1 / (1 + np.exp(-(intercept - slope * score)))
    return score, wrong


def test_the_betting_p_value_is_valid_at_the_boundary_where_the_sampling_follows_the_errors():
    # the traffic's risk is exactly alpha: a clean half wrong 2% of the time, audited at 30%, and
    # a hard half wrong 18% of the time, audited at 2%. Weighted: P(p <= delta) <= delta; the
    # same labels unweighted look like a 3% risk.
    rng = np.random.default_rng(0)
    alpha, delta, runs, rejected = 0.1, 0.1, 300, 0
    for _ in range(runs):
        clean = rng.random(10_000) < 0.5
        wrong = rng.random(10_000) < np.where(clean, 0.02, 0.18)
        pi = np.where(clean, 0.3, 0.02)
        sampled = rng.random(10_000) < pi
        u = 0.02 / pi[sampled]
        log_k = log_evidence(np.ones((1, sampled.sum()), bool), wrong[sampled][None, :], u, alpha)
        rejected += math.exp(-log_k[0]) <= delta
    assert rejected / runs <= delta
    assert wrong[sampled].mean() < 0.05  # what the naive reading would certify on


def test_with_equal_inclusion_probabilities_it_certifies_like_the_exact_test():
    rng = np.random.default_rng(1)
    score, wrong = population(rng, 3000)
    sample = ProductionSample(score, wrong.astype(float), np.full(3000, 0.1))
    cert = certify_production(sample, alpha=0.1, delta=0.1)
    assert cert.is_feasible and 0.3 < cert.coverage <= 1.0
    accepted = score >= cert.threshold
    assert wrong[accepted].mean() <= 0.1
    assert cert.empirical_risk <= cert.risk_upper_bound <= 0.1 + 1e-9
    assert cert.extra["nonresponse"].startswith("worst case")
    assert "With probability at least 0.9" in cert.statement()


def test_unlabelled_audits_count_as_errors():
    rng = np.random.default_rng(2)
    score = rng.beta(4.0, 1.5, 2000)
    error = np.zeros(2000)  # every labelled answer was right...
    error[rng.random(2000) < 0.3] = np.nan  # ...but 30% of the audits expired unlabelled
    sample = ProductionSample(score, error, np.full(2000, 0.05))
    cert = certify_production(sample, alpha=0.1, delta=0.1)
    assert not cert.is_feasible and "INFEASIBLE" in cert.statement()
    assert cert.extra["unlabelled_items"] == int(np.isnan(error).sum())
    labelled = ~np.isnan(error)
    dropped = ProductionSample(score[labelled], error[labelled], np.full(labelled.sum(), 0.05))
    assert certify_production(dropped, alpha=0.1, delta=0.1).is_feasible  # ignoring them would certify


def test_too_few_labels_is_a_refusal_that_says_how_many_more():
    sample = ProductionSample(np.linspace(0.5, 1, 40), np.zeros(40), np.full(40, 0.05))
    with pytest.raises(TooFewLabels) as refusal:
        certify_production(sample, alpha=0.05, delta=0.1)
    more = refusal.value.needed_more
    assert more > 0 and f"at least {more} more audit labels" in str(refusal.value)
    assert refusal.value.field == "cheap_error"
    grown = ProductionSample(np.linspace(0.5, 1, 40 + more), np.zeros(40 + more), np.full(40 + more, 0.05))
    certify_production(grown, alpha=0.05, delta=0.1)  # with that many right labels: no refusal


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"inclusion_probability": np.zeros(30)}, "inclusion_probability"),
        ({"cheap_error": np.full(30, 0.5)}, "cheap_error"),
        ({"min_inclusion_probability": 0.5}, "min_inclusion_probability"),
    ],
)
def test_bad_samples_are_refused_naming_the_field(kwargs, field):
    args = {
        "cheap_score": np.linspace(0, 1, 30),
        "cheap_error": np.zeros(30),
        "inclusion_probability": np.full(30, 0.1),
    }
    with pytest.raises(ValueError) as error:
        ProductionSample(**{**args, **kwargs})
    assert error.value.field == field


def test_the_three_tier_plan_from_production_labels_keeps_its_promise():
    rng = np.random.default_rng(3)
    n = 6000
    score, cheap_wrong = population(rng, n)
    strong_wrong = rng.random(n) < 0.04
    strong_score = np.clip(rng.normal(np.where(strong_wrong, 0.5, 0.85), 0.1), 0, 1)
    accepted_now = score >= 0.6
    pi = np.where(accepted_now, np.where(np.arange(n) < n // 2, 0.05, 0.2), 1.0)
    sampled = rng.random(n) < pi
    vlm_asked = ~accepted_now  # production only asked the VLM below the current accept threshold
    sample = ProductionSample(
        score[sampled],
        cheap_wrong[sampled].astype(float),
        pi[sampled],
        np.where(vlm_asked, strong_wrong, np.nan)[sampled],
        np.where(vlm_asked, strong_score, np.nan)[sampled],
    )
    plan = certify_production_plan(sample, costs=TierCosts(), alpha=0.1, delta=0.1)
    assert plan.certificate.is_feasible and plan.certificate.p_value <= 0.1
    assert sum(plan.rates[k] for k in ("accept", "vlm_accept", "review")) == pytest.approx(1.0)
    # the promise, on the whole traffic: the new plan asks the VLM wherever it escalates (an
    # answer production never saw was counted as accepted and wrong)
    cheap_ok = score >= plan.accept_threshold
    escalated = ~cheap_ok & (score >= plan.review_threshold)
    vlm_ok = escalated & (strong_score >= plan.vlm_accept_threshold)
    auto = cheap_ok | vlm_ok
    assert ((cheap_ok & cheap_wrong) | (vlm_ok & strong_wrong))[auto].mean() <= 0.1
    with pytest.raises(ValueError, match="strong_error"):
        certify_production_plan(
            ProductionSample(score, cheap_wrong, np.ones(n)), costs=TierCosts(), alpha=0.1, delta=0.1
        )


def test_simulation_weighted_keeps_delta_where_the_naive_reading_does_not():
    result = recert_validity(alpha=0.1, delta=0.1, runs=16, scenario=Scenario(items=30_000), seed=7)
    weighted, naive = result["weighted"], result["naive"]
    assert weighted["certified_share"] >= 0.25  # it certifies: no violation is not by abstaining
    assert weighted["violation_rate"] <= 0.1 + 0.1  # delta, with room for 16 runs' noise
    assert naive["violation_rate"] >= 0.5  # selection bias: the oversampled segment is the easier one


def test_review_items_become_a_production_sample():
    from types import SimpleNamespace

    from policies.production_certify import sample_from_items

    def item(kind, pi, score, status="labelled", verdict="confirm", vlm=None, task="classify"):
        steps = [{"stage": "policy:thresholds", "score": score}]
        if vlm is not None:
            steps.append({"stage": "vlm", "score": vlm})
        return SimpleNamespace(
            task=task,
            kind=kind,
            inclusion_probability=pi,
            trace={"steps": steps},
            status=status,
            label={"verdict": verdict} if status == "labelled" else None,
            proposed=[{"label": "cat"}],
        )

    items = [
        item("audit", 0.1, 0.9),
        item("audit", 0.28, 0.8, verdict="reject"),
        item("audit", 0.1, 0.95, status="expired"),
        item("review", 1.0, 0.2, vlm=0.7),
        item("audit", None, 0.9),  # queued before provenance was stored
        item("shadow", 0.1, 0.9),
        item("audit", 0.1, 0.9, task="text"),
    ]
    read = sample_from_items(items, task="classify")
    sample = read.sample
    assert read.left_out == {"shadow": 1, "unknown_inclusion_probability": 1, "no_score": 0, "other_task": 1}
    assert sample.cheap_score.tolist() == [0.9, 0.8, 0.95, 0.2]
    assert sample.inclusion_probability.tolist() == [0.1, 0.28, 0.1, 1.0]
    assert sample.cheap_error[:2].tolist() == [0.0, 1.0] and np.isnan(sample.cheap_error[2:]).all()
    assert sample.strong_error[3] == 0.0 and sample.strong_score[3] == 0.7
    assert sample.n_unlabelled == 1  # the expired audit (the VLM's answer was labelled)


def test_simulation_of_the_three_tier_plan_weighted_against_naive():
    from evals.benchmarks.recert import recert_validity_plan

    result = recert_validity_plan(alpha=0.1, delta=0.1, runs=6, scenario=Scenario(items=30_000), seed=3)
    assert result["weighted"]["violation_rate"] <= 1 / 6 and result["weighted"]["certified_share"] > 0
    assert result["naive"]["violation_rate"] >= 0.5


def test_a_uniform_sample_takes_the_exact_binomial_test_and_keeps_delta():
    # every item sampled at one inclusion probability: the binomial test (far more powerful than
    # the betting mixture at a few hundred labels), and still P(true risk > alpha) <= delta over
    # many production windows drawn from one traffic whose risk curve is known
    rng = np.random.default_rng(11)
    alpha, delta, runs = 0.1, 0.1, 120
    traffic_score, traffic_wrong = population(rng, 200_000, intercept=3.0)  # alpha binds: ~91% accepted
    order = np.argsort(-traffic_score)
    risk_above = np.cumsum(traffic_wrong[order]) / np.arange(1, len(order) + 1)  # risk at each threshold
    violations = certified = 0
    for run in range(runs):
        pick = rng.choice(len(traffic_score), 400, replace=False)
        sample = ProductionSample(traffic_score[pick], traffic_wrong[pick].astype(float), np.full(400, 0.05))
        cert = certify_production(sample, alpha=alpha, delta=delta, seed=run)
        assert cert.p_value_method == "binomial"
        if cert.is_feasible:
            certified += 1
            accepted = np.searchsorted(-traffic_score[order], -cert.threshold, side="right")
            violations += risk_above[accepted - 1] > alpha
    assert certified / runs >= 0.8  # it certifies: no violation is not by abstaining
    assert violations / runs <= delta + 0.05  # delta, with room for the runs' noise
    mixed = ProductionSample(
        traffic_score[:400], traffic_wrong[:400].astype(float), np.where(np.arange(400) < 200, 0.05, 0.2)
    )
    assert certify_production(mixed, alpha=alpha, delta=delta).p_value_method == "ht_betting"
