"""The risk certificate from `visionroute calibrate` drives the service's thresholds and traces."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cascades.onnx_stage import OnnxStage
from cascades.pipeline import TierResult, run_cascade
from router.config import parse_app_config
from visionroute.errors import ConfigError
from visionroute.records import Analysis

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def artefact(tmp_path_factory) -> Path:
    """A real calibration run on synthetic model outputs: 10 classes, right ~85% of the time."""
    rng = np.random.default_rng(0)
    n, classes = 3000, 10
    labels = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    right = rng.random(n) < 0.85
    # Right answers tend to be confident, wrong ones less so: a threshold can be certified.
    boost = np.where(right, rng.uniform(2, 8, n), rng.uniform(0, 2.5, n))
    logits[np.arange(n), np.where(right, labels, (labels + 1) % classes)] += boost
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    folder = tmp_path_factory.mktemp("calibration")
    np.savez(folder / "outputs.npz", probabilities=probabilities, labels=labels)
    out = folder / "artefact.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "visionroute.cli",
            "calibrate",
            "--predictions",
            str(folder / "outputs.npz"),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        cwd=REPO,
        env={"VISIONROUTE_HOME": str(folder), "PATH": "/usr/bin:/bin"},
    )
    return out


def cascade_args(artefact: Path, **extra) -> dict:
    return {
        "cascades": {
            "classify": {"tier": {"model": "efficientnet_lite0", "calibration": str(artefact)}, **extra}
        }
    }


def test_certified_thresholds_come_from_the_certificate(artefact):
    certificate = json.loads(artefact.read_text())["certificate"]
    assert certificate["feasible"]
    policy = (
        parse_app_config(cascade_args(artefact, thresholds_from_certificate=True)).cascades["classify"].policy
    )
    tiers = certificate.get("three_tier")
    expected = tiers["accept_threshold"] if tiers else certificate["threshold"]
    assert policy.accept_threshold == pytest.approx(min(1.0, float(expected)))
    assert policy.escalate_threshold <= policy.accept_threshold
    assert "+temperature@" in policy.version  # the decision names the certificate it used


def test_certified_thresholds_need_an_artefact():
    with pytest.raises(ConfigError, match="thresholds_from_certificate needs tier.calibration"):
        parse_app_config(
            {"cascades": {"classify": {"tier": {"model": "m"}, "thresholds_from_certificate": True}}}
        )


def test_calibrated_answer_and_certificate_appear_in_the_trace(artefact, prepared_models_dir):
    from skimage import data

    config = parse_app_config(
        {**cascade_args(artefact, thresholds_from_certificate=True), "models_dir": str(prepared_models_dir)}
    )
    cascade = config.cascades["classify"]
    stage = OnnxStage(cascade.tier, models_dir=prepared_models_dir)

    async def cheap_tier(image):
        (detections,), latency_ms = stage.predict([image])
        info = stage.describe()
        return TierResult(
            detections, info["model"], info["model_version"], latency_ms, 1.0, info["calibration"]
        )

    analysis = Analysis(image_rgb=data.coffee(), image_sha256="0" * 64, task="classify")
    analysis = asyncio.run(run_cascade(analysis, cheap_tier=cheap_tier, policy=cascade.policy))
    onnx_step, policy_step = analysis.trace.steps
    assert analysis.detections.is_calibrated
    assert onnx_step.details["calibration"].startswith("temperature@")
    assert onnx_step.details["certificate"]["alpha"] == 0.05 and onnx_step.details["certificate"]["feasible"]
    assert policy_step.reason.startswith("calibrated score")
    assert policy_step.policy_version == cascade.policy.version
