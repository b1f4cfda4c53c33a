"""``check_plan``: the running plan judged on labels (the production certificate's test, worst
case for what the labels lack) and its Horvitz-Thompson cost, so a recertification loop keeps it
only while fresh labels still certify it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from policies.production_certify import ProductionSample
from policies.recert_plan import above_alpha_p_value, check_plan
from policies.risk_control import TierCosts

COSTS = TierCosts(cheap=1.0, escalate=10.0, review=100.0)


def plan(accept, review=-np.inf, vlm=None):
    return SimpleNamespace(accept_threshold=accept, review_threshold=review, vlm_accept_threshold=vlm)


def audits(rng, n, error_rate, pi=0.1):
    """A uniform audit sample: every item accepted-looking (score 0.9) at one inclusion probability."""
    wrong = (rng.random(n) < error_rate).astype(float)
    return ProductionSample(np.full(n, 0.9), wrong, np.full(n, pi), np.full(n, np.nan), np.full(n, np.nan))


def test_a_plan_whose_accepts_are_right_is_certified_and_a_wrong_one_is_not():
    rng = np.random.default_rng(0)
    good = check_plan(plan(0.5), audits(rng, 400, 0.02), costs=COSTS, alpha=0.1, delta=0.1)
    bad = check_plan(plan(0.5), audits(rng, 400, 0.25), costs=COSTS, alpha=0.1, delta=0.1)
    assert good.certified and good.p_value <= 0.1 and good.accepted == 400
    assert not bad.certified and bad.p_value > 0.1
    # the monitor's side: the bad plan's labels show its error above alpha, the good one's do not
    assert bad.p_above_alpha <= 0.1 < good.p_above_alpha
    assert bad.wrong > good.wrong


def test_near_alpha_neither_certified_nor_shown_above():
    """A plan right at the edge on a few dozen labels: no evidence either way, so a loop keeps it
    (its own certificate stands) instead of taking a dearer one."""
    sample = ProductionSample(np.full(50, 0.9), (np.arange(50) < 4).astype(float), np.full(50, 0.1))
    check = check_plan(plan(0.5), sample, costs=COSTS, alpha=0.1, delta=0.1)
    assert not check.certified and check.p_above_alpha > 0.1
    assert check.p_above_alpha == pytest.approx(above_alpha_p_value(4, 50, 0.1))


def test_an_unlabelled_accept_counts_as_an_error():
    labelled = ProductionSample(np.full(30, 0.9), np.zeros(30), np.full(30, 0.1))
    missing = np.zeros(30)
    missing[:3] = np.nan
    unanswered = ProductionSample(np.full(30, 0.9), missing, np.full(30, 0.1))
    p_labelled = check_plan(plan(0.5), labelled, costs=COSTS, alpha=0.1, delta=0.1).p_value
    p_unanswered = check_plan(plan(0.5), unanswered, costs=COSTS, alpha=0.1, delta=0.1).p_value
    assert p_unanswered > p_labelled


def test_an_escalated_item_without_a_vlm_answer_passes_and_is_wrong():
    # every item escalated (score between the thresholds); none has a VLM answer
    n = 60
    sample = ProductionSample(
        np.full(n, 0.5), np.zeros(n), np.full(n, 0.1), np.full(n, np.nan), np.full(n, np.nan)
    )
    check = check_plan(plan(0.9, 0.2, 0.8), sample, costs=COSTS, alpha=0.1, delta=0.1)
    assert check.accepted == n and not check.certified


def test_the_cost_is_the_horvitz_thompson_mean_of_the_plans_decisions():
    # accepted at pi 0.5 (weight 2), escalated and VLM-accepted at pi 1, reviewed at pi 1
    sample = ProductionSample(
        np.array([0.95, 0.6, 0.1]),
        np.zeros(3),
        np.array([0.5, 1.0, 1.0]),
        np.array([np.nan, 0.0, np.nan]),
        np.array([np.nan, 0.9, np.nan]),
    )
    check = check_plan(plan(0.9, 0.5, 0.8), sample, costs=COSTS, alpha=0.1, delta=0.1)
    assert check.cost_per_item == pytest.approx(1.0 + (10.0 * 1 + 100.0 * 1) / 4)
    assert check.accepted == 2


def test_no_labels_certify_nothing():
    empty = ProductionSample(np.zeros(0), np.zeros(0), np.zeros(0))
    check = check_plan(plan(0.5), empty, costs=COSTS, alpha=0.1, delta=0.1)
    assert not check.certified and check.accepted == 0


def test_a_loop_that_may_keep_its_running_plan_certifies_each_plan_at_half_delta():
    from policies.certify import CertifyInputError
    from policies.recert_plan import per_certificate_delta

    # two certified plans, the deployed one chosen on labels: a union bound over both
    assert per_certificate_delta(0.1, keeps_incumbent=True) == pytest.approx(0.05)
    assert per_certificate_delta(0.1, keeps_incumbent=False) == pytest.approx(0.1)
    with pytest.raises(CertifyInputError) as error:
        per_certificate_delta(1.0, keeps_incumbent=True)
    assert error.value.field == "delta"
