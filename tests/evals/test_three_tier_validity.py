"""``bench vlm-digits``'s three-tier validity run, on synthetic tiers (no server): the rates it
reports are computed from the plans it certifies, and the VLM threshold buys coverage."""

from __future__ import annotations

import numpy as np
import pytest

from evals.benchmarks.vlm_digits import three_tier_validity


def synthetic_tiers(n: int, seed: int):
    """Ten classes; the cheap tier right 88% of the time, the VLM 97%, both surer when right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    cheap = np.where(rng.uniform(size=n) < 0.88, labels, (labels + 1) % 10)
    cheap_raw = np.clip(rng.uniform(0.3, 0.8, n) + 0.2 * (cheap == labels), 0.0, 0.999)
    vlm = np.where(rng.uniform(size=n) < 0.97, labels, (labels + 1) % 10)
    vlm_raw = np.clip(rng.uniform(0.5, 0.7, n) + 0.3 * (vlm == labels), 0.0, 0.999)
    vlm_raw[:5] = np.nan  # no answer: never accepted
    vlm[:5] = -1
    return cheap_raw, cheap, vlm_raw, vlm, labels


def test_the_validity_run_reports_both_plans_over_every_split():
    # A few seeded splits: nothing here is a rate over splits (`bench vlm-digits --splits 200`
    # measures those on the real tiers).
    figures = three_tier_validity(*synthetic_tiers(1079, 0), n_fit=270, n_certify=270, n_splits=5)
    assert figures["n_splits"] == 5 and figures["n_rest"] == 1079 - 540
    with_threshold, previous = figures["with_vlm_threshold"], figures["previous"]
    for rates in (with_threshold, previous):
        assert 0.0 <= rates["violation_rate"] <= 1.0 and 0.0 <= rates["certified_rate"] <= 1.0
        assert 0.0 <= rates["mean_coverage"] <= 1.0 and rates["mean_cost_units"] >= 1.0
    # Seeded check: trusting the VLM by its confidence answers more of the rest without a human.
    assert with_threshold["mean_coverage"] > previous["mean_coverage"]
    assert with_threshold["mean_cost_units"] < previous["mean_cost_units"]


def test_the_split_must_leave_items_to_test():
    with pytest.raises(ValueError, match="must leave items to test"):
        three_tier_validity(*synthetic_tiers(100, 1), n_fit=50, n_certify=50, n_splits=1)
