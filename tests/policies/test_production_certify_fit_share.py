"""``certify_production_plan(fit_share=...)``: the share of the labels that places and orders
the candidates (default: 10%, at most 200 items, as the offline certificate)."""

from __future__ import annotations

import numpy as np
import pytest

from policies.certify import CertifyInputError
from policies.production_certify import ProductionSample, certify_production_plan, fit_items, split
from policies.risk_control import TierCosts


def sample(n: int, seed: int = 0) -> ProductionSample:
    """A uniform audit sample (inclusion 0.1): scores in [0.5, 1], the cheap tier wrong 5% of the
    time, the second tier 2%."""
    rng = np.random.default_rng(seed)
    score = rng.uniform(0.5, 1.0, n)
    return ProductionSample(
        score,
        (rng.random(n) < 0.05).astype(float),
        np.full(n, 0.1),
        (rng.random(n) < 0.02).astype(float),
        rng.uniform(0.5, 1.0, n),
        0.1,
    )


def test_the_default_fit_share_is_a_tenth_capped_at_200_and_a_share_is_uncapped():
    assert fit_items(100) == 20 and fit_items(1000) == 100 and fit_items(5000) == 200
    assert fit_items(1000, 0.5) == 500 and fit_items(5000, 0.5) == 2500 and fit_items(30, 0.5) == 20
    fit, test = split(sample(2000), seed=1, fit_share=0.5)
    assert 850 < len(fit) < 1150 and len(fit) + len(test) == 2000
    fit_default, _ = split(sample(2000), seed=1)
    assert len(fit_default) < 300


def test_a_plan_certified_with_half_the_labels_placing_it_is_still_certified():
    plan = certify_production_plan(sample(1500), costs=TierCosts(), alpha=0.1, delta=0.1, fit_share=0.5)
    assert plan.certificate.is_feasible and plan.certificate.p_value <= 0.1
    assert 600 < plan.certificate.n < 900  # the test share: the other half


@pytest.mark.parametrize("share", [0.0, 1.0, -0.2, 1.5])
def test_a_fit_share_outside_0_1_is_refused_by_name(share):
    with pytest.raises(CertifyInputError) as error:
        certify_production_plan(sample(300), costs=TierCosts(), alpha=0.1, delta=0.1, fit_share=share)
    assert error.value.field == "fit_share"
