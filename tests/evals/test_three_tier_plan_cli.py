"""``visionroute calibrate`` / ``eval --calibration`` with the strong tier's accept threshold:
``evals.harness.calibrate`` certifies it (the strong tier's scores go into the plan),
``visionroute.cli.calibrate._plan_from_certificate`` reads it back from the artefact, and ``evaluate`` replays
the three-tier policy with it. Synthetic tiers, seeded: fast."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cascades.calibration import load_calibration
from evals.harness import TierData, calibrate, evaluate
from policies.certify import split_indices
from policies.risk_control import RiskCertificate, TierPlan
from visionroute.cli.calibrate import _plan_from_certificate

N, CLASSES = 3000, 10


def probabilities(labels: np.ndarray, confidence: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """One row per item: ``confidence`` on the answer (the label when ``correct``), the rest spread."""
    answer = np.where(correct, labels, (labels + 1) % CLASSES)
    rows = np.tile(((1 - confidence) / (CLASSES - 1))[:, None], (1, CLASSES))
    rows[np.arange(len(labels)), answer] = confidence
    return rows


def tiers(seed: int = 0) -> TierData:
    """A cheap tier right with probability = its confidence, and a strong tier that is right when
    sure (0.99 above 0.7) and often wrong when not (0.5 below): 16% wrong overall, so accepting
    every escalated strong answer would break alpha 0.05, while its confident answers keep it."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, N)
    cheap_conf = rng.uniform(0.3, 1.0, N)
    strong_conf = rng.uniform(0.4, 1.0, N)
    strong_right = rng.random(N) < np.where(strong_conf >= 0.7, 0.99, 0.5)
    return TierData(
        probabilities(labels, cheap_conf, rng.random(N) < cheap_conf),
        probabilities(labels, strong_conf, strong_right),
        labels,
        tuple(map(str, range(CLASSES))),
        name="synthetic",
    )


@pytest.fixture(scope="module")
def calibrated():
    data = tiers()
    splits = split_indices(len(data), seed=0)
    return data, splits, calibrate(data, splits.fit, splits.certify, alpha=0.05, delta=0.1)


def test_calibrate_certifies_a_finite_strong_tier_threshold(calibrated):
    _, _, calibration = calibrated
    plan = calibration.plan
    assert plan.certificate.is_feasible and plan.certificate.risk_upper_bound <= 0.05
    assert plan.vlm_accept_threshold is not None and math.isfinite(plan.vlm_accept_threshold)
    assert 0.4 < plan.vlm_accept_threshold <= 1.0  # inside the strong tier's score range
    written = calibration.calibrator.certificate["three_tier"]
    assert written["vlm_accept_threshold"] == pytest.approx(plan.vlm_accept_threshold)
    assert "strong tier" in written["strong_score"]


def test_the_plan_read_back_from_the_artefact_decides_as_the_certified_one(calibrated, tmp_path):
    _, _, calibration = calibrated
    path = calibration.calibrator.save(tmp_path / "cal.json")
    read = _plan_from_certificate(load_calibration(path).certificate, TierPlan, RiskCertificate)
    plan = calibration.plan
    assert read.vlm_accept_threshold == pytest.approx(plan.vlm_accept_threshold)
    assert (read.accept_threshold, read.review_threshold) == (plan.accept_threshold, plan.review_threshold)
    for score in np.linspace(0.0, 1.0, 41):
        assert read.decide(score) == plan.decide(score)
        assert read.decide_vlm(score) == plan.decide_vlm(score)
    assert read.decide_vlm(plan.vlm_accept_threshold - 1e-6) == "review"
    assert read.decide_vlm(math.nan) == "review"  # no valid answer


def test_an_artefact_without_the_strong_tier_threshold_accepts_every_escalated_answer(calibrated):
    _, _, calibration = calibrated
    certificate = json.loads(json.dumps(calibration.calibrator.certificate))
    del certificate["three_tier"]["vlm_accept_threshold"]  # an artefact written before this key
    read = _plan_from_certificate(certificate, TierPlan, RiskCertificate)
    assert read.vlm_accept_threshold is None and read.decide_vlm(0.0) == "accept"
    certificate["three_tier"]["vlm_accept_threshold"] = "inf"  # never accept the strong answer
    assert _plan_from_certificate(certificate, TierPlan, RiskCertificate).decide_vlm(1.0) == "review"


def test_eval_replays_the_strong_tier_threshold(calibrated, tmp_path):
    data, splits, calibration = calibrated
    report = evaluate(data, calibration, splits.test, out_dir=tmp_path)
    tiers_report = report["certified_risk_check"]["three_tier"]
    rates = tiers_report["rates"]
    plan = calibration.plan
    test = data.subset(splits.test)
    strong_conf = test.strong_probabilities.max(axis=1)
    cheap_scores = calibration.calibrator.calibrate_probabilities(test.cheap_probabilities).max(axis=1)
    escalated = np.array([plan.decide(s) == "escalate" for s in cheap_scores])
    below = escalated & (strong_conf < plan.vlm_accept_threshold)
    assert below.any()  # some escalated strong answers are not confident enough: a human sees them
    assert rates["vlm_accept"] == pytest.approx((escalated & ~below).mean())
    assert rates["accept"] + rates["vlm_accept"] + rates["review"] == pytest.approx(1.0)
    assert rates["vlm_accept"] < rates["escalate"]
    assert tiers_report["vlm_accept_threshold"] == pytest.approx(plan.vlm_accept_threshold)
    # The threshold keeps the strong tier's unsure (half wrong) answers out of the accepted ones.
    assert tiers_report["auto_accepted_error"] <= 0.05
