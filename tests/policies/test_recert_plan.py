"""The label plan from production: the audit fraction to set for a window, within the review
budget, for one threshold and for the three-tier plan."""

from __future__ import annotations

import numpy as np
import pytest

from policies.production_certify import ProductionSample
from policies.recert_plan import plan_audit_fraction


def pilot(rng, n=3000, *, with_vlm=False):
    score = rng.beta(4.0, 1.5, n)
    wrong = rng.random(n) < 1 / (1 + np.exp(-(1.0 - 8.0 * score)))
    accepted = score >= 0.5
    pi = np.where(accepted, 0.1, 1.0)
    sampled = rng.random(n) < pi
    strong = strong_score = None
    if with_vlm:
        strong_wrong = rng.random(n) < 0.03
        strong = np.where(accepted, np.nan, strong_wrong)[sampled]
        strong_score = np.where(
            accepted, np.nan, np.clip(rng.normal(np.where(strong_wrong, 0.5, 0.85), 0.1), 0, 1)
        )[sampled]
    return ProductionSample(score[sampled], wrong[sampled].astype(float), pi[sampled], strong, strong_score)


def test_a_generous_budget_gets_a_fraction_and_a_daily_label_count():
    plan = plan_audit_fraction(
        pilot(np.random.default_rng(0)),
        alpha=0.1,
        delta=0.1,
        items_per_day=2000,
        review_budget_per_day=1000,
        days=7,
        reps=10,
        min_fraction=0.02,
    )
    assert plan.within_budget and plan.audit_fraction is not None
    assert 0 < plan.audit_fraction <= plan.budget_fraction
    assert plan.audit_labels_per_day == pytest.approx(plan.audit_fraction * plan.accept_share * 2000)
    assert f"{plan.audit_fraction:.2%}" in plan.message
    assert plan.fractions == sorted(plan.fractions) and plan.certified_share == sorted(plan.certified_share)


def test_a_budget_too_small_says_so_instead_of_a_fraction():
    plan = plan_audit_fraction(
        pilot(np.random.default_rng(1)),
        alpha=0.1,
        delta=0.1,
        items_per_day=2000,
        review_budget_per_day=2,
        days=1,
        reps=10,
    )
    assert not plan.within_budget and plan.audit_fraction is None
    assert plan.message.startswith("NOT WITHIN BUDGET") and plan.budget_fraction < 0.01


def test_the_three_tier_plan_can_be_planned_too():
    plan = plan_audit_fraction(
        pilot(np.random.default_rng(2), with_vlm=True),
        alpha=0.1,
        delta=0.1,
        items_per_day=2000,
        review_budget_per_day=1000,
        days=7,
        reps=10,
        min_fraction=0.05,
        plan="three_tier",
    )
    assert plan.plan == "three_tier" and plan.within_budget


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"items_per_day": 0}, "items_per_day"),
        ({"reps": 3}, "reps"),
        ({"plan": "two"}, "plan"),
    ],
)
def test_bad_plans_are_refused_naming_the_field(kwargs, field):
    args = dict(alpha=0.1, delta=0.1, items_per_day=100, review_budget_per_day=10)
    with pytest.raises(ValueError) as error:
        plan_audit_fraction(pilot(np.random.default_rng(3), n=400), **{**args, **kwargs})
    assert error.value.field == field
