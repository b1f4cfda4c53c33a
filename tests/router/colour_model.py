"""A real (tiny) ONNX classifier whose answers the tests can steer: the mean colour decides.

logits = 4 * mean(normalised channel): a pure red image is "red" at 0.9993, mid grey gives
three equal logits (1/3 each). Built with onnx.helper in milliseconds; run by ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LABELS = ["red", "green", "blue"]


def write_colour_model(path: Path, weights: np.ndarray | None = None) -> Path:
    """``weights``: the 3x3 matrix from channel means to logits (default 4 * identity; a permuted
    one makes a confidently wrong model, the worse candidate of the rollout tests)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    matrix = 4.0 * np.eye(3) if weights is None else np.asarray(weights, dtype=np.float64)
    weight = numpy_helper.from_array(matrix.astype(np.float32), "weight")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["images"], ["means"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["means", "weight"], ["logits"]),
        ],
        "colour",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def solid_png(rgb: tuple[int, int, int], size: int = 48) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def colour_app_config(tmp_path: Path, policies=None, **review):
    """A one-task service config around the colour classifier; ``review`` adds review settings."""
    from router.config import parse_app_config

    model = write_colour_model(tmp_path / "colour.onnx")
    return parse_app_config(
        {
            "models_dir": str(tmp_path),
            "default_task": "colour",
            "cascades": {
                "colour": {
                    "tier": {"model": str(model), "decoder": "classifier", "labels": LABELS, "size_hw": 32},
                    "policy": {"version": "colour-v1", "accept_threshold": 0.9, "escalate_threshold": 0.2},
                }
            },
            "review": {"path": str(tmp_path / "review"), **review},
            "retrieval": {"enabled": False},
            **({"policies": policies} if policies else {}),
        }
    )
