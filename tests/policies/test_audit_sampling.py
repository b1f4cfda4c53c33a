"""Audit sampling: the deterministic sampler, exact bounds and alerts (coverage: tests/evals/test_benchmarks.py)."""

from __future__ import annotations

import logging
import uuid

import pytest
from scipy.stats import binomtest

from policies.audit_sampling import (
    AuditConfig,
    AuditMonitor,
    clopper_pearson,
    estimate,
    is_error,
    is_sampled,
)


def test_sampler_rate_and_determinism():
    ids = [uuid.uuid4().hex for _ in range(20000)]
    picked = [i for i in ids if is_sampled(i, 0.1)]
    assert 0.09 < len(picked) / len(ids) < 0.11
    assert all(is_sampled(i, 0.1) for i in picked)  # same id, same answer (replicas agree)
    assert not any(is_sampled(i, 0.0) for i in ids[:100]) and all(is_sampled(i, 1.0) for i in ids[:100])


def test_bounds_match_scipy_exact_interval():
    lower, upper = clopper_pearson(7, 120, 0.95)
    ci = binomtest(7, 120).proportion_ci(confidence_level=0.90, method="exact")  # two one-sided 95% bounds
    assert lower == pytest.approx(ci.low) and upper == pytest.approx(ci.high)
    assert clopper_pearson(0, 0, 0.9) == (0.0, 1.0)
    assert clopper_pearson(0, 50, 0.9)[0] == 0.0 and clopper_pearson(50, 50, 0.9)[1] == 1.0


def test_alert_modes_and_minimum(caplog):
    config = AuditConfig(alpha=0.05, confidence=0.9, min_labelled=30)
    assert not estimate("classify", 10, 20, config).alert  # too few labels yet
    assert estimate("classify", 12, 100, config).alert  # lower bound ~0.072 > 0.05
    assert not estimate("classify", 6, 100, config).alert  # 6%: not shown to exceed alpha
    early = config.model_copy(update={"alert_when": "upper_bound_above_alpha"})
    assert estimate("classify", 6, 100, early).alert  # but no longer vouched for
    monitor = AuditMonitor()
    with caplog.at_level(logging.WARNING, logger="visionroute.audit"):
        monitor.update(estimate("classify", 12, 100, config))
        monitor.update(estimate("classify", 13, 101, config))
    alerts = [r for r in caplog.records if "AUDIT ALERT" in r.message]
    assert len(alerts) == 1 and "above alpha 0.05" in alerts[0].message  # logged once per episode


def test_is_error_reads_the_verdict():
    proposed = [{"label": "cat"}]
    assert not is_error({"verdict": "confirm"}, proposed)
    assert not is_error({"verdict": "correct", "label": "cat", "boxes": None}, proposed)
    assert is_error({"verdict": "correct", "label": "dog", "boxes": None}, proposed)
    assert is_error({"verdict": "reject"}, proposed)
