"""A real 8-class ONNX classifier and a learned router calibrated for it, for the router's tests.

The classifier reads the mean colour: each class is a corner of the RGB cube (``LABELS``), logits
``= 3 * means @ W`` with W the corners' +-1 signs, so a pure colour is confident and a mixed one
is not. It has more classes than the served answer keeps rows (5), so a router for it exercises
the served path's completed probability vector (``cascades.router_stage.served_output``).

``calibrated_router`` runs the tier on noisy colour images (the uploads), takes labels that
flip more often where the tier is unsure, a VLM that is right 90% of the time, and calibrates
through ``cascades.router_calibration.calibrate_router``: the cheap tier's calibrator and the
router with both certified plans (each with a VLM accept threshold). ``tier_config`` is the
cascade tier that serves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

LABELS = ["black", "red", "green", "yellow", "blue", "magenta", "cyan", "white"]
SIZE = 32


def write_colour8_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    corners = np.array(
        [[(k >> bit) & 1 for bit in range(3)] for k in range(8)], np.float32
    )  # (8, 3) RGB bits
    weight = numpy_helper.from_array((3.0 * (2 * corners - 1)).T.astype(np.float32), "weight")  # (3, 8)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["images"], ["means"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["means", "weight"], ["logits"]),
        ],
        "colour8",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 8])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tier_config(model: Path, calibration: Path | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"model": str(model), "decoder": "classifier", "labels": LABELS, "size_hw": SIZE}
    if calibration is not None:
        config["calibration"] = str(calibration)
    return config


def uploads(n: int, seed: int = 0) -> list[np.ndarray]:
    """Noisy colour images: a random colour plus pixel noise (some near a corner, some between)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        colour = rng.integers(0, 256, 3)
        noise = rng.normal(0, 12, (16, 16, 3))
        images.append(np.clip(colour[None, None, :] + noise, 0, 255).astype(np.uint8))
    return images


def full_probabilities(stage, images: list[np.ndarray]) -> np.ndarray:
    """(n, 8) the model's whole probability vectors on the stage's own preprocessing."""
    from scipy.special import softmax

    tensors = np.concatenate([stage.decoder.preprocess(image)[0] for image in images])
    return softmax(np.asarray(stage.model.run(tensors)[0], np.float64), axis=1)


def calibrated_router(
    work_dir: Path,
    *,
    n: int = 900,
    alpha: float = 0.1,
    delta: float = 0.1,
    max_review_share: float | None = None,
    seed: int = 0,
):
    """(model path, RouterCalibration, the images, RouterData) for the colour8 tier."""
    from cascades.onnx_stage import OnnxStage, OnnxStageConfig
    from cascades.router_calibration import RouterData, calibrate_router
    from policies.certify import split_indices
    from policies.risk_control import TierCosts

    work_dir = Path(work_dir)
    model = write_colour8_model(work_dir / "colour8.onnx")
    stage = OnnxStage(OnnxStageConfig(**tier_config(model)), models_dir=work_dir)
    images = uploads(n, seed)
    probabilities = full_probabilities(stage, images)
    rng = np.random.default_rng(seed + 1)
    answers = probabilities.argmax(1)
    unsure = 1.0 - probabilities.max(1)
    flipped = rng.random(n) < 0.05 + 0.8 * unsure  # the tier is wrong more often where it is unsure
    labels = np.where(flipped, (answers + 1 + rng.integers(0, 7, n)) % 8, answers)
    strong_right = rng.random(n) < 0.9
    strong_answers = np.where(strong_right, labels, (labels + 1) % 8)
    strong_scores = np.clip(np.where(strong_right, rng.beta(8, 2, n), rng.beta(2, 4, n)), 0, 1)
    data = RouterData(tuple(LABELS), probabilities, labels, strong_answers, strong_scores, images, "colour8")
    splits = split_indices(n, seed=seed, calibration_fraction=0.5)
    result = calibrate_router(
        data,
        splits.fit,
        splits.certify,
        splits.test,
        alpha=alpha,
        delta=delta,
        costs=TierCosts(cheap=1, escalate=10, review=100),
        max_review_share=max_review_share,
        embedding_dim=12,  # RGB 2x2
        seed=seed,
    )
    return model, result, images, data


def routed_cascades(work_dir: Path) -> dict[str, dict[str, Any]]:
    """Two cascades for a shared test service (tests/integration/conftest.py ``keyed_service``):
    ``colour8`` with the calibrated router, ``colour8_fallback`` with the same router and
    ``timeout_ms: 0`` (its features are never waited for: every request takes the certified
    fallback plan). Both run inside the ingress (no tier deployment of their own)."""
    work_dir = Path(work_dir)
    model, result, _, _ = calibrated_router(work_dir)
    calibration = result.calibrator.save(work_dir / "colour8-calibration.json")
    router = result.artefact.save(work_dir / "colour8-router.json")
    tier = tier_config(model, calibration)
    return {
        name: {
            "tier": tier,
            "placement": "ingress",
            "router": {"path": str(router), **extra},
        }
        for name, extra in (("colour8", {}), ("colour8_fallback", {"timeout_ms": 0}))
    }
