"""Decoders on real layouts: a constant-output YOLOv8-layout ONNX model, the real DBNet."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cascades.decoders import build_decoder
from cascades.decoders.yolo import letterbox
from cascades.onnx_stage import OnnxStage, OnnxStageConfig
from visionroute.errors import ConfigError


def constant_model(path: Path, output: np.ndarray, input_hw=(64, 64)) -> Path:
    """An ONNX graph that ignores its image and returns ``output`` (shape [1, 4+C, A])."""
    graph = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["raw"], value=numpy_helper.from_array(output.astype(np.float32))
            ),
            helper.make_node("Shape", ["images"], ["shape"]),
            helper.make_node("Identity", ["raw"], ["output0"]),
        ],
        "constant_yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, *input_hw])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(output.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_yolo_layout_nms_and_boxes_mapped_back_to_original_pixels(tmp_path):
    # Four anchors, two classes, in 64x64 letterboxed input coordinates (cx, cy, w, h).
    anchors = np.array(
        [
            # cx, cy, w, h, class0, class1
            [32, 32, 16, 16, 0.9, 0.1],  # class 0, best
            [33, 32, 16, 16, 0.8, 0.1],  # class 0, overlaps the first: suppressed
            [33, 32, 16, 16, 0.1, 0.7],  # class 1, same place: kept (NMS is per class by default)
            [10, 10, 4, 4, 0.1, 0.1],  # below the confidence threshold
        ],
        np.float32,
    )
    model = constant_model(tmp_path / "yolo.onnx", anchors.T[None])
    stage = OnnxStage(
        OnnxStageConfig(
            model=str(model), decoder="yolov8", labels=["cat", "dog"], decoder_options={"size_hw": [64, 64]}
        )
    )
    image = np.zeros((32, 128, 3), np.uint8)  # scale 0.5, 16 px of padding above and below
    (detections,), _ = stage.predict([image])
    assert detections.labels == ["cat", "dog"]
    np.testing.assert_allclose(detections.confidence, [0.9, 0.7], rtol=1e-6)
    # (32 +- 8 - pad) / 0.5 with pad_x = 0, pad_y = 16
    np.testing.assert_allclose(detections.xyxy[0], [48, 0, 80, 32], atol=1e-4)
    np.testing.assert_allclose(detections.xyxy[1], [50, 0, 82, 32], atol=1e-4)


def test_letterbox_keeps_aspect_and_pads():
    canvas, scale, pad = letterbox(np.full((50, 100, 3), 255, np.uint8), (64, 64))
    assert canvas.shape == (64, 64, 3) and scale == pytest.approx(0.64)
    assert pad == (0, 16) and canvas[0, 0, 0] == 114 and canvas[32, 32, 0] == 255


def test_wrong_class_count_is_a_config_error(tmp_path):
    # The file's output shape fixes 3 classes: caught when the stage loads, not at the first image.
    model = constant_model(tmp_path / "yolo.onnx", np.zeros((1, 7, 5)))
    with pytest.raises(ConfigError, match=r"model output \[1, 7, 5\] has 3 classes, 2 labels configured"):
        OnnxStage(
            OnnxStageConfig(
                model=str(model), decoder="yolov8", labels=["a", "b"], decoder_options={"size_hw": [64, 64]}
            )
        )
    # An output whose class count is not fixed in the file is checked when decoded.
    decoder = build_decoder("yolov8", labels=["a", "b"], options={"size_hw": [64, 64]})
    _, meta = decoder.preprocess(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ConfigError, match="3 classes, 2 labels"):
        decoder.decode([np.zeros((1, 7, 5), np.float32)], meta)


def test_unknown_decoder_names_the_options():
    with pytest.raises(
        ConfigError, match=r"unknown decoder 'ssd'; expected one of \['classifier', 'dbnet', 'yolov8'\]"
    ):
        build_decoder("ssd", labels=[], options={})


def test_classifier_softmax_and_labels():
    decoder = build_decoder("classifier", labels=["a", "b", "c"], options={"size_hw": [8, 8], "top_k": 3})
    tensor, meta = decoder.preprocess(np.zeros((10, 20, 3), np.uint8))
    assert tensor.shape == (1, 3, 8, 8) and tensor.dtype == np.float32
    detections = decoder.decode([np.array([[0.0, 2.0, 1.0]])], meta)
    assert detections.labels == ["b", "c", "a"]
    assert detections.confidence.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_dbnet_finds_the_text_lines_of_a_scanned_page(prepared_models_dir):
    from skimage import data

    page = np.stack([data.page()] * 3, axis=-1)
    stage = OnnxStage(OnnxStageConfig(model="ppocr_det"), models_dir=prepared_models_dir)
    (detections,), _ = stage.predict([page])
    assert len(detections) >= 5  # the page has several lines of printed text
    assert (detections.confidence >= 0.5).all()
    height, width = page.shape[:2]
    assert (detections.xyxy[:, 2] <= width).all() and (detections.xyxy[:, 3] <= height).all()
    # Lines are wide and short.
    widths = detections.xyxy[:, 2] - detections.xyxy[:, 0]
    heights = detections.xyxy[:, 3] - detections.xyxy[:, 1]
    assert np.median(widths / heights) > 3
    (blank,), _ = stage.predict([np.full((200, 300, 3), 255, np.uint8)])
    assert len(blank) == 0
