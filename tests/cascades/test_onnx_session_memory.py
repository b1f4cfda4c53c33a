"""OnnxModel keeps a serving replica's memory steady: no per-shape memory pattern, and a warm-up
that runs every batch size the tier can gather, smallest first (docs/soak.md has the RSS figures:
``python -m evals.benchmarks.soak_onnx_memory``)."""

from __future__ import annotations

import numpy as np

from cascades.onnx_runner import OnnxModel
from tests.router.colour_model import write_colour_model


def recorded_batch_sizes(model: OnnxModel) -> list[int]:
    sizes: list[int] = []
    run = model.session.run

    def recording(outputs, feeds):
        sizes.append(next(iter(feeds.values())).shape[0])
        return run(outputs, feeds)

    model.session = type("Recording", (), {"run": staticmethod(recording)})()
    return sizes


def test_the_memory_pattern_is_off(tmp_path):
    model = OnnxModel(write_colour_model(tmp_path / "colour.onnx"))
    assert model.session.get_session_options().enable_mem_pattern is False


def test_warm_up_runs_every_batch_size_smallest_first(tmp_path):
    model = OnnxModel(write_colour_model(tmp_path / "colour.onnx"), max_batch_size=5)
    sizes = recorded_batch_sizes(model)
    model.warm_up(8)  # capped at the model's own batch size
    assert sizes == [1, 2, 3, 4, 5]
    green = np.zeros((2, 3, 32, 32), np.float32)
    green[:, 1] = 1.0
    (logits,) = model.run(green)  # and the warmed model still answers
    assert logits.shape == (2, 3) and list(np.argmax(logits, axis=1)) == [1, 1]


def test_warm_up_leaves_a_model_without_a_fixed_image_size_alone(tmp_path):
    import onnx

    path = write_colour_model(tmp_path / "colour.onnx")
    document = onnx.load(str(path))
    dims = document.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    onnx.save(document, str(path))
    model = OnnxModel(path)
    assert model.input_hw is None
    sizes = recorded_batch_sizes(model)
    model.warm_up(8)
    assert sizes == []


def test_a_warm_up_that_onnx_runtime_refuses_is_logged_not_raised(tmp_path, caplog):
    """A third-party file whose input is not float (uint8 here): ONNX Runtime refuses the zeros;
    the warm-up is an optimisation, so the tier's start logs it and goes on to report the
    model's own errors on real requests, as before the warm-up existed."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, ["n", 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, tmp_path / "u8.onnx")
    model = OnnxModel(tmp_path / "u8.onnx")
    model.warm_up(4)
    assert "warm-up of u8.onnx skipped" in caplog.text and "uint8" in caplog.text
