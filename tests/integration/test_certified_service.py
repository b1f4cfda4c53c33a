"""The threshold version a live trace names is the one `visionroute check-config` prints.

Regression: each replica used to re-validate the dumped config and append the certificate's
suffix a second time (``colour-v1+temperature@…+temperature@…``), a version that exists nowhere.
"""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.integration.serve_process import REPO, ServeProcess
from tests.router.colour_model import LABELS, solid_png, write_colour_model

pytestmark = [pytest.mark.server, pytest.mark.slow]


def three_class_artefact(folder) -> str:
    """A real `visionroute calibrate` run on synthetic 3-class outputs, right ~85% of the time."""
    rng = np.random.default_rng(0)
    n = 3000
    labels = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    right = rng.random(n) < 0.85
    boost = np.where(right, rng.uniform(2, 8, n), rng.uniform(0, 2.5, n))
    logits[np.arange(n), np.where(right, labels, (labels + 1) % 3)] += boost
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.savez(folder / "outputs.npz", probabilities=probabilities, labels=labels)
    out = folder / "artefact.json"
    subprocess.run(
        [sys.executable, "-m", "visionroute.cli", "calibrate", "--predictions", str(folder / "outputs.npz")]
        + ["--out", str(out)],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    return str(out)


def test_live_trace_names_the_threshold_version_check_config_printed(tmp_path):
    model = write_colour_model(tmp_path / "models" / "colour.onnx")
    cascade = {
        "tier": {
            "model": str(model),
            "decoder": "classifier",
            "labels": LABELS,
            "size_hw": 32,
            "calibration": three_class_artefact(tmp_path),
        },
        "policy": {"version": "colour-v1"},
        "thresholds_from_certificate": True,
        "placement": "ingress",
    }
    service = ServeProcess(
        tmp_path,
        tmp_path / "models",
        extra_args={
            "default_task": "colour",
            "cascades": {"colour": cascade},
            "retrieval": {"enabled": False},
        },
    )
    printed = subprocess.run(
        [sys.executable, "-m", "visionroute.cli", "check-config", str(service.config_path)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout
    version = re.search(r"colour: thresholds (\S+)", printed).group(1)
    assert version.startswith("colour-v1+temperature@") and version.count("+") == 1
    service.start()
    try:
        response = httpx.post(
            service.url + "/v1/analyze",
            files={"image": ("r.png", solid_png((255, 0, 0)), "image/png")},
            timeout=120,
        )
    finally:
        service.stop()
    assert response.status_code == 200, response.text
    step = next(s for s in response.json()["trace"]["steps"] if s["stage"] == "policy:thresholds")
    assert step["policy_version"] == version
