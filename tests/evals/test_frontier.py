from __future__ import annotations

import numpy as np
import pytest

from evals.frontier import cascade_frontier


def test_frontier_endpoints_baselines_and_escalation_needed():
    rng = np.random.default_rng(0)
    n = 1000
    targets = rng.integers(0, 10, n)
    confidence = rng.uniform(size=n)
    cheap_right = rng.uniform(size=n) < 0.5 + 0.5 * confidence  # confidence tracks correctness
    cheap = np.where(cheap_right, targets, (targets + 1) % 10)
    strong = np.where(rng.uniform(size=n) < 0.97, targets, (targets + 2) % 10)
    f = cascade_frontier(cheap, confidence, strong, targets, cheap_cost=1, strong_cost=10)
    assert f.cascade_accuracy[0] == pytest.approx(f.cheap_accuracy) == pytest.approx(f.random_accuracy[0])
    assert f.cascade_accuracy[-1] == pytest.approx(f.strong_accuracy) == pytest.approx(f.random_accuracy[-1])
    assert (f.oracle_accuracy >= f.cascade_accuracy - 1e-12).all()
    assert (np.diff(f.oracle_accuracy) >= 0).all()
    np.testing.assert_allclose(f.cost_units[[0, -1]], [1, 11])
    need = f.escalation_needed(0.99 * f.strong_accuracy)
    assert need["oracle"] <= need["cascade"] < need["random"]
    # random routing is linear: r = (target - cheap) / (strong - cheap), up to the 1/n grid
    exact = (0.99 * f.strong_accuracy - f.cheap_accuracy) / (f.strong_accuracy - f.cheap_accuracy)
    assert need["random"] == pytest.approx(exact, abs=1 / n)
    assert f.escalation_needed(1.01)["cascade"] is None
    summary = f.summary()
    assert summary["target_accuracy"] == pytest.approx(0.99 * f.strong_accuracy)
