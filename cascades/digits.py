"""Two real tiers on scikit-learn's digits (1,797 labelled 8x8 images), trained here in torch.

- ``cheap``: a linear classifier on the image average-pooled to 4x4 (16 inputs, 170 weights).
  It sees a quarter of the pixels, so it is fast and clearly weaker.
- ``strong``: a small CNN on the full 8x8 image.

Both are exported to ONNX (opset 17, the TorchScript exporter) and evaluated through
``cascades.onnx_runner.OnnxModel``, the same runner the service uses, so the numbers the
harness prints come from the artefacts a deployment would load.

The split is fixed by ``seed``: ``train`` fits the tiers; ``pool`` is never seen in training and
is what calibration, threshold selection and evaluation split among themselves.

It lives beside cascades/models.py because the packaged ``digits_cheap`` model is this cheap
tier (``visionroute models prepare digits_cheap`` trains it); evals/ and examples/ use the same
split and tiers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cascades.classifier_training import export_classifier_onnx, fit_classifier
from cascades.onnx_runner import OnnxModel
from visionroute.paths import models_dir

log = logging.getLogger(__name__)

CLASS_NAMES = tuple(str(d) for d in range(10))
TIERS = ("cheap", "strong")
SEED = 0  # the split and training seed of the prepared service model (cascades.models)
TRAIN_FRACTION = 0.4  # small on purpose: the cheap tier must leave room for the strong one


@dataclass(frozen=True)
class DigitsSplit:
    images_train: np.ndarray  # (n, 1, 8, 8) float32 in [0, 1]
    labels_train: np.ndarray  # (n,) int64
    images_pool: np.ndarray
    labels_pool: np.ndarray
    pool_index: np.ndarray  # row of each pool item in load_digits(), for traceability


def load_split(seed: int = 0) -> DigitsSplit:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_train = int(TRAIN_FRACTION * len(labels))
    train, pool = order[:n_train], order[n_train:]
    return DigitsSplit(images[train], labels[train], images[pool], labels[pool], pool)


def _build(tier: str):
    from torch import nn

    if tier == "cheap":
        return nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))
    if tier == "strong":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 16, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )
    raise ValueError(f"unknown digits tier {tier!r}; expected one of {list(TIERS)}")


def train_tier(tier: str, split: DigitsSplit, *, seed: int = 0, epochs: int = 40):
    """Full-batch-ish Adam training (``classifier_training``); deterministic for a given seed on CPU."""
    import torch

    torch.manual_seed(seed)
    model = _build(tier)
    lr = 3e-3 if tier == "strong" else 3e-2
    return fit_classifier(model, split.images_train, split.labels_train, lr=lr, epochs=epochs, seed=seed)


def export_onnx(model, path: Path, *, tier: str, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    export_classifier_onnx(model, path, (1, 1, 8, 8))
    sidecar = {
        "name": f"digits-{tier}",
        "task": "classify",
        "class_names": list(CLASS_NAMES),
        "output": "logits",
        "trained_on": f"sklearn load_digits, seed={seed}, train_fraction={TRAIN_FRACTION}",
    }
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
    return path


def prepare_tiers(out_dir: Path | None = None, *, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Train and export both tiers unless their ONNX files already exist; returns the paths."""
    out_dir = Path(out_dir) if out_dir else models_dir() / "digits"
    split = None
    paths = {}
    for tier in TIERS:
        path = out_dir / f"digits_{tier}_seed{seed}.onnx"
        if force or not path.is_file():
            split = split or load_split(seed)
            log.info("training digits %s tier (seed %d)", tier, seed)
            export_onnx(train_tier(tier, split, seed=seed), path, tier=tier, seed=seed)
        paths[tier] = path
    return paths


def tier_logits(paths: dict[str, Path], images: np.ndarray) -> dict[str, np.ndarray]:
    """Run each exported tier through the service's ONNX runner: {tier: (n, 10) logits}."""
    return {tier: OnnxModel(path).run(images)[0] for tier, path in paths.items()}
