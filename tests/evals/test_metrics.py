"""Metrics: update/compute/reset, agreement with direct computation, slicing, plots."""

from __future__ import annotations

import numpy as np
import pytest

from evals.metrics import (
    Accuracy,
    CalibrationError,
    PerClassPRF,
    RiskCoverage,
    TopKAccuracy,
    expected_calibration_error,
    risk_coverage_curve,
)
from evals.slicing import MetricSuite, bucket

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_accuracy_accumulates_over_batches_and_resets():
    metric = Accuracy()
    metric.update(predictions=[0, 1, 2], targets=[0, 1, 1])
    metric.update(predictions=[3], targets=[3])
    assert metric.compute() == {"accuracy": 0.75, "n": 4}
    metric.reset()
    assert metric.compute() == {"accuracy": None, "n": 0}
    with pytest.raises(ValueError, match="different lengths"):
        metric.update(predictions=[0, 1], targets=[0])


def test_top_k_and_per_class_scores():
    probabilities = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.4, 0.35, 0.25]])
    targets = np.array([1, 2, 2])
    top2 = TopKAccuracy(2)
    top2.update(probabilities=probabilities, targets=targets)
    assert top2.compute() == {"top2_accuracy": pytest.approx(2 / 3)}
    prf = PerClassPRF(["a", "b", "c"])
    prf.update(predictions=probabilities.argmax(1), targets=targets)
    result = prf.compute()
    assert result["per_class"]["c"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "support": 2,
    }
    assert result["per_class"]["a"]["precision"] == 0.0  # predicted once, wrong
    assert result["macro_recall"] == pytest.approx(0.25)  # over classes present: b 0, c 0.5


def test_ece_and_mce_on_a_worked_example():
    # two bins used: (0.2, 0.267] holds 0.25 x4 with 1 right; (0.933, 1] holds 0.95 x4 with 4 right
    confidences = np.r_[np.full(4, 0.25), np.full(4, 0.95)]
    correct = np.array([1, 0, 0, 0, 1, 1, 1, 1], bool)
    metric = CalibrationError(n_bins=15)
    metric.update(confidences=confidences, correct=correct)
    out = metric.compute()
    assert out["ece"] == pytest.approx(0.5 * 0.0 + 0.5 * 0.05)
    assert out["mce"] == pytest.approx(0.05)
    assert expected_calibration_error(confidences, correct) == pytest.approx(out["ece"])


def test_ece_is_small_for_calibrated_and_large_for_overconfident_scores():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, 20000)
    honest = rng.uniform(size=20000) < confidence
    assert expected_calibration_error(confidence, honest) < 0.02
    assert expected_calibration_error(np.minimum(1.0, confidence + 0.2), honest) > 0.15


def test_risk_coverage_and_aurc():
    confidences = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, False, True, True])
    coverage, risk = risk_coverage_curve(confidences, correct)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.5, 1 / 3, 0.25])
    metric = RiskCoverage()
    metric.update(confidences=confidences, correct=correct)
    out = metric.compute()
    assert out["aurc"] == pytest.approx(np.mean([0.0, 0.5, 1 / 3, 0.25]))
    # the oracle ranks the one error last: risks 0, 0, 0, 0.25
    assert out["e_aurc"] == pytest.approx(out["aurc"] - 0.0625)


def test_plots_are_png_files(tmp_path):
    rng = np.random.default_rng(0)
    confidence = rng.uniform(size=300)
    correct = rng.uniform(size=300) < confidence
    calibration, rc = CalibrationError(), RiskCoverage()
    for metric in (calibration, rc):
        metric.update(confidences=confidence, correct=correct)
    for path in (calibration.plot(tmp_path / "rel.png"), rc.plot(tmp_path / "rc.png")):
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_suite_slices_by_metadata():
    suite = MetricSuite({"accuracy": Accuracy}, slice_keys=("source", "size"))
    metadata = [
        {"source": "web", "size": bucket(100, [256], ["small", "large"])},
        {"source": "web", "size": bucket(900, [256], ["small", "large"])},
        {"source": "phone"},
    ]
    suite.update(metadata=metadata, predictions=[1, 0, 1], targets=[1, 1, 1])
    out = suite.compute()
    assert out["all"]["accuracy"] == pytest.approx(2 / 3)
    assert out["source=web"] == {"accuracy": 0.5, "n": 2}
    assert out["source=phone"]["accuracy"] == 1.0
    assert out["size=small"]["accuracy"] == 1.0 and out["size=large"]["accuracy"] == 0.0
    assert out["size=<missing>"]["n"] == 1
    with pytest.raises(ValueError, match="one metadata dict per item"):
        suite.update(metadata=metadata[:1], predictions=[1, 0], targets=[1, 1])
    suite.reset()
    assert list(suite.compute()) == ["all"]
