"""The colour service: one ``serve run`` of the tiny colour classifier (tests/router/colour_model.py)
under several tasks, shared by the modules that need a colour task of their own
(tests/integration/conftest.py ``colour_service``): one Ray Serve start instead of one per module.

- ``colour`` (the default task): the incumbent inside the ingress with two rollout candidates,
  ``swapped`` (its own deployment; confidently wrong) and ``cheaper`` (the same model at half the
  cost), for test_rollouts_service.py;
- ``colour_recalibrated``: accepts nothing until recertified from reviewers' labels;
- ``colour_routed``: the same behind a learned router whose certified plan accepts nothing;
- ``colour_certified``: thresholds taken from a real ``visionroute calibrate`` artefact
  (``thresholds_from_certificate``), for test_certified_service.py.

Retrieval is off (no colour test searches) and rollouts are re-read every 0.2 s, so a rollout's
start reaches every replica within a test's half-second wait. The tasks share one review queue:
a test labels only its own request ids' items (and rejects the others it claims).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.integration.serve_process import REPO, ServeProcess
from tests.router.colour_model import LABELS, write_colour_model

RECALIBRATED = "colour_recalibrated"
ROUTED = "colour_routed"
CERTIFIED = "colour_certified"


def three_class_artefact(folder: Path) -> str:
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


def colour_cascades(workdir: Path) -> dict:
    """The four tasks' cascades, their models and artefacts written under ``workdir``."""
    from tests.router.test_router_stage import fitted_artefact

    models = workdir / "models"
    incumbent = write_colour_model(models / "colour.onnx")
    swapped = write_colour_model(models / "colour_swapped.onnx", np.roll(4.0 * np.eye(3), 1, axis=1))
    tier = {"decoder": "classifier", "labels": LABELS, "size_hw": 32}
    colour = {
        "tier": {"model": str(incumbent), **tier, "cost_units": 1.0},
        "policy": {"version": "colour-v1", "accept_threshold": 0.9, "escalate_threshold": 0.2},
        "placement": "ingress",
        "candidates": {
            "swapped": {
                "tier": {"model": str(swapped), **tier, "cost_units": 1.0},
                "placement": "deployment",
            },
            "cheaper": {"tier": {"model": str(incumbent), **tier, "cost_units": 0.5}, "placement": "ingress"},
        },
    }
    # The incumbent's accept threshold (0.9999) is above every answer of the colour model, so
    # every request goes to review until recertified.
    recalibrated = {
        "tier": {"model": str(incumbent), **tier, "cost_units": 1.0},
        "policy": {"version": "colour-v1", "accept_threshold": 0.9999, "escalate_threshold": 0.5},
        "placement": "ingress",
    }
    # A learned router whose certified plan (accept at 0.9999) sends every request to review until
    # a recalibration refits it. A fixed router price keeps both arms' costs independent of timing
    # (measured prices made the cost comparison a coin toss on busy cores).
    router = fitted_artefact(learned=(0.9999, 0.0)).save(workdir / "router.json")
    routed = {**recalibrated, "router": {"path": str(router), "cost_units": 0.1}}
    certified = {
        "tier": {"model": str(incumbent), **tier, "calibration": three_class_artefact(workdir)},
        "policy": {"version": "colour-v1"},
        "thresholds_from_certificate": True,
        "placement": "ingress",
    }
    return {"colour": colour, RECALIBRATED: recalibrated, ROUTED: routed, CERTIFIED: certified}


def colour_service(workdir: Path) -> ServeProcess:
    """The service's ``serve run`` (not started): its config is at ``.config_path``."""
    return ServeProcess(
        workdir,
        workdir / "models",
        extra_args={
            "default_task": "colour",
            "cascades": colour_cascades(workdir),
            "retrieval": {"enabled": False},
            "rollouts": {"refresh_s": 0.2, "cost_flush_s": 0.2},
        },
    )
