"""The cheap tier's calibration refit from production labels (policies/production_calibration.py):
weighted by 1 / inclusion probability, the refit and its reliability figures describe the whole
traffic, not the escalation-heavy mix reviewers see. Simulated: an overconfident score (true
P(right | s) = s^3), every escalation reviewed, 5% of the accepts audited."""

from __future__ import annotations

import numpy as np
import pytest

from policies.production_calibration import MIN_LABELS, refit_calibration, weighted_ece
from policies.production_certify import ProductionSample


def production(seed: int = 0, n: int = 20_000):
    rng = np.random.default_rng(seed)
    score = rng.uniform(0.3, 1.0, n)
    right = (rng.random(n) < score**3).astype(float)
    pi = np.where(score >= 0.8, 0.05, 1.0)  # accepts audited at 5%, the rest all reviewed
    sampled = rng.random(n) < pi
    return score, right, pi, sampled


def test_the_weighted_refit_recovers_the_true_calibration_and_the_populations_ece():
    score, right, pi, sampled = production()
    sample = ProductionSample(score[sampled], 1.0 - right[sampled], pi[sampled])
    refit = refit_calibration(sample)
    assert refit is not None and refit.labelled == int(sampled.sum()) and refit.left_out_unlabelled == 0
    assert refit.weighted_n == pytest.approx(len(score), rel=0.1)  # the labels stand for all traffic
    for s, tolerance in ((0.5, 0.05), (0.7, 0.05), (0.9, 0.15)):
        assert refit.p_correct_at(s) == pytest.approx(s**3, abs=tolerance)
    population = weighted_ece(score, right, np.ones(len(score)))
    unweighted = weighted_ece(score[sampled], right[sampled], np.ones(int(sampled.sum())))
    assert abs(refit.ece_incumbent - population) < 0.025 < abs(unweighted - population)
    assert refit.ece_refit < refit.ece_incumbent / 3 and refit.brier_refit < refit.brier_incumbent
    assert np.all(np.diff(refit.scores) > 0) and np.all(np.diff(refit.p_correct) >= 0)  # monotone
    assert "weighted by 1 / inclusion probability" in refit.statement()


def test_unlabelled_items_are_left_out_and_counted_and_too_few_labels_refit_nothing():
    score, right, pi, sampled = production(n=2_000)
    error = 1.0 - right[sampled]
    error[::4] = np.nan  # non-response: an expired audit, a flagged reviewer's label
    refit = refit_calibration(ProductionSample(score[sampled], error, pi[sampled]))
    assert (
        refit.left_out_unlabelled == int(np.isnan(error).sum())
        and refit.labelled == len(error) - refit.left_out_unlabelled
    )
    few = ProductionSample(score[:MIN_LABELS], np.r_[np.zeros(MIN_LABELS - 1), np.nan], np.ones(MIN_LABELS))
    assert refit_calibration(few) is None
