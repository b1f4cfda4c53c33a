"""Calibration: fitting recovers known distortions, the artefact round-trips, errors are clear."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from cascades.calibration import (
    Calibrator,
    fit_classifier,
    fit_detector,
    fit_temperature,
    load_calibration,
)
from evals.metrics import expected_calibration_error
from visionroute.errors import ConfigError, InputError
from visionroute.records import Detections

NAMES = tuple(f"c{i}" for i in range(10))


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def overconfident(n: int, true_temperature: float = 2.5, seed: int = 0):
    """Labels drawn from softmax(z / T): a model reporting softmax(z) is over-confident by T."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, 10))
    truth = _softmax(logits / true_temperature)
    labels = np.array([rng.choice(10, p=p) for p in truth])
    return _softmax(logits), labels


def test_temperature_fit_recovers_the_true_temperature():
    probabilities, labels = overconfident(6000, 2.5)
    assert fit_temperature(np.log(probabilities), labels) == pytest.approx(2.5, rel=0.1)


def test_temperature_reduces_ece_on_held_out_items_and_keeps_the_argmax():
    probabilities, labels = overconfident(4000, 2.5)
    calibrator = fit_classifier("temperature", probabilities[:2000], labels[:2000], NAMES)
    held_out, held_labels = probabilities[2000:], labels[2000:]
    after = calibrator.calibrate_probabilities(held_out)
    assert (after.argmax(1) == held_out.argmax(1)).all()
    correct = held_out.argmax(1) == held_labels
    before_ece = expected_calibration_error(held_out.max(1), correct)
    after_ece = expected_calibration_error(after.max(1), correct)
    assert after_ece < before_ece / 3
    np.testing.assert_allclose(after.sum(1), 1.0, atol=1e-9)


def test_apply_on_detections_with_all_classes_matches_the_full_vector():
    probabilities, labels = overconfident(500)
    calibrator = fit_classifier("temperature", probabilities, labels, NAMES)
    p = probabilities[0]
    full = Detections.from_class_probabilities(p, NAMES, width=8, height=8, top_k=10)
    calibrated = calibrator.apply(full)
    assert calibrated.is_calibrated and not full.is_calibrated
    expected = calibrator.calibrate_probabilities(p[None])[0][calibrated.class_id]
    np.testing.assert_allclose(calibrated.confidence, expected, rtol=1e-5)


def test_apply_on_top_k_keeps_order_and_rejects_double_calibration():
    probabilities, labels = overconfident(500)
    calibrator = fit_classifier("temperature", probabilities, labels, NAMES)
    top3 = Detections.from_class_probabilities(probabilities[1], NAMES, width=8, height=8, top_k=3)
    out = calibrator.apply(top3)
    assert list(out.class_id) == list(top3.class_id)
    assert (np.diff(out.confidence) <= 0).all() and out.confidence.sum() <= 1.0 + 1e-6
    with pytest.raises(InputError, match="already calibrated"):
        calibrator.apply(out)
    assert len(calibrator.apply(Detections.empty(NAMES))) == 0


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_detector_maps_learn_the_true_positive_rate_per_class(method):
    rng = np.random.default_rng(1)
    n = 6000
    scores = rng.uniform(0.01, 0.99, n)
    # class 0 is over-confident (P(tp) = s^2), class 1 honest (P(tp) = s), class 2 has 10 rows only
    class_ids = rng.integers(0, 2, n)
    class_ids[:10] = 2
    p_true = np.where(class_ids == 0, scores**2, scores)
    tp = rng.uniform(size=n) < p_true
    calibrator = fit_detector(method, scores, class_ids, tp, ["a", "b", "rare"])
    maps = calibrator.artifact.platt or calibrator.artifact.isotonic
    assert set(maps) == {"*", "0", "1"}  # the rare class falls back to the global map
    grid = np.array([0.2, 0.5, 0.8])
    out0 = calibrator.calibrate_scores(grid, np.zeros(3, int))
    out1 = calibrator.calibrate_scores(grid, np.ones(3, int))
    np.testing.assert_allclose(out0, grid**2, atol=0.08)
    np.testing.assert_allclose(out1, grid, atol=0.08)
    dets = Detections(np.zeros((3, 4)), grid, [0, 1, 2], ("a", "b", "rare"))
    assert calibrator.apply(dets).is_calibrated


def test_artefact_round_trips_with_a_stable_id_and_certificate(tmp_path):
    probabilities, labels = overconfident(300)
    calibrator = fit_classifier(
        "temperature", probabilities, labels, NAMES, model={"name": "m", "sha256": "ab"}
    )
    assert re.fullmatch(r"temperature@[0-9a-f]{12}", calibrator.artifact_id)
    assert calibrator.certificate is None
    certified = calibrator.with_certificate({"alpha": 0.05, "delta": 0.1, "threshold": 0.9})
    assert certified.artifact_id != calibrator.artifact_id
    path = certified.save(tmp_path / "cal.json")
    loaded = load_calibration(path)
    assert loaded.artifact_id == certified.artifact_id
    assert loaded.certificate == {"alpha": 0.05, "delta": 0.1, "threshold": 0.9}
    assert loaded.trace_details() == {"calibration": loaded.artifact_id, "certificate": loaded.certificate}
    np.testing.assert_allclose(
        loaded.calibrate_probabilities(probabilities), certified.calibrate_probabilities(probabilities)
    )
    document = json.loads(path.read_text())
    assert {"method", "created_at", "data_sha256", "n_samples", "schema_version"} <= set(document)
    assert document["n_samples"] == 300 and len(document["data_sha256"]) == 64


def test_data_hash_identifies_the_calibration_data():
    probabilities, labels = overconfident(300)
    a = fit_classifier("isotonic", probabilities, labels, NAMES)
    b = fit_classifier("isotonic", probabilities[:-1], labels[:-1], NAMES)
    assert a.artifact.data_sha256 != b.artifact.data_sha256


def test_bad_artefacts_and_inputs_fail_with_field_and_reason(tmp_path):
    with pytest.raises(ConfigError) as missing:
        load_calibration(tmp_path / "nope.json")
    assert missing.value.field == "calibration_path"
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "method": "temperature",
                "kind": "detector",
                "created_at": "x",
                "data_sha256": "y",
                "n_samples": 3,
                "class_names": [],
                "temperature": 1.5,
            }
        )
    )
    with pytest.raises(ConfigError, match="temperature scaling needs a classifier"):
        load_calibration(bad)
    with pytest.raises(ConfigError, match="expected one of"):
        fit_classifier("histogram", np.eye(10), np.arange(10), NAMES)
    with pytest.raises(ConfigError, match="platt"):
        fit_detector("temperature", [0.5], [0], [True], ["a"])
    with pytest.raises(InputError, match=r"\(n, 10\)"):
        fit_classifier("temperature", np.eye(3), np.arange(3), NAMES)


def test_calibrator_is_immutable():
    probabilities, labels = overconfident(100)
    calibrator = fit_classifier("temperature", probabilities, labels, NAMES)
    assert isinstance(calibrator, Calibrator)
    with pytest.raises(dataclasses.FrozenInstanceError):
        calibrator.artifact = None  # type: ignore[misc]
