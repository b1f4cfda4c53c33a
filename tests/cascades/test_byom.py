"""Bring your own model: what an ONNX file states (fixed input, Ultralytics metadata) is used,
a config that contradicts it is refused, and the YOLO decoder's channel, NMS and score rules.

The model under test is a real YOLOv8-layout ONNX graph built here: a colour detector whose
output ``[1, 4 + 3, 3]`` holds, per class (red, green, blue), the box around the pixels where
that input channel is above 0.5 (cx, cy, w, h in input pixels) and a score of 0.9 if any.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cascades.decoders import build_decoder, install_hint
from cascades.onnx_runner import OnnxModel, parse_metadata_value
from cascades.onnx_stage import OnnxStage, OnnxStageConfig
from visionroute.cli import main as visionroute_main
from visionroute.errors import ConfigError

COLOURS = ("red", "green", "blue")
ULTRALYTICS_METADATA = {
    "author": "Ultralytics",
    "version": "8.2.46",
    "stride": "32",
    "task": "detect",
    "batch": "1",
    "imgsz": "[320, 320]",
    "names": "{0: 'red', 1: 'green', 2: 'blue'}",
}


def colour_detector(path: Path, *, input_hw=(320, 320), metadata=None) -> Path:
    """A YOLOv8-layout detector of saturated colour patches; ``input_hw`` None = dynamic."""
    num_classes = len(COLOURS)
    height, width = input_hw or ("height", "width")
    nodes = [helper.make_node("Split", ["images"], ["ch0", "ch1", "ch2"], axis=1)]
    initializers = [
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
    ]
    anchors = []
    for c in range(num_classes):
        onehot = np.zeros((1, num_classes), np.float32)
        onehot[0, c] = 0.9
        initializers.append(numpy_helper.from_array(onehot, f"score{c}"))
        nodes += [
            helper.make_node("Greater", [f"ch{c}", "half"], [f"gt{c}"]),
            helper.make_node("Cast", [f"gt{c}"], [f"m{c}"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMax", [f"m{c}"], [f"col{c}"], axes=[2], keepdims=0),  # [1, 1, W]
            helper.make_node("ReduceMax", [f"m{c}"], [f"row{c}"], axes=[3], keepdims=0),  # [1, 1, H]
            helper.make_node("ReduceMax", [f"col{c}"], [f"any{c}"], axes=[2], keepdims=0),  # [1, 1]
            helper.make_node("Mul", [f"any{c}", f"score{c}"], [f"scores{c}"]),  # [1, C]
        ]
        for axis, profile in (("x", f"col{c}"), ("y", f"row{c}")):
            first, last = f"{axis}first{c}", f"{axis}last{c}"
            nodes += [
                helper.make_node("ArgMax", [profile], [first + "i"], axis=2, keepdims=0),
                helper.make_node("ArgMax", [profile], [last + "i"], axis=2, keepdims=0, select_last_index=1),
                helper.make_node("Cast", [first + "i"], [first], to=TensorProto.FLOAT),
                helper.make_node("Cast", [last + "i"], [last + "0"], to=TensorProto.FLOAT),
                helper.make_node("Add", [last + "0", "one"], [last]),  # exclusive end
                helper.make_node("Add", [first, last], [f"{axis}sum{c}"]),
                helper.make_node("Mul", [f"{axis}sum{c}", "half"], [f"{axis}centre{c}"]),
                helper.make_node("Sub", [last, first], [f"{axis}size{c}"]),
            ]
        nodes += [
            helper.make_node(
                "Concat",
                [f"xcentre{c}", f"ycentre{c}", f"xsize{c}", f"ysize{c}", f"scores{c}"],
                [f"anchor{c}"],
                axis=1,
            ),
            helper.make_node("Unsqueeze", [f"anchor{c}", "axis2"], [f"anchor{c}u"]),
        ]
        anchors.append(f"anchor{c}u")
    nodes.append(helper.make_node("Concat", anchors, ["output0"], axis=2))
    graph = helper.make_graph(
        nodes,
        "colour_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + num_classes, num_classes])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def channel_means_classifier(path: Path, metadata=None, batch: int = 1) -> Path:
    """A [batch, 3] output: the mean of each input channel (an Ultralytics-style classifier)."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["output0"], axes=[2, 3], keepdims=0)],
        "channel_means",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [batch, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


def image_with_square(colour, xyxy, size_hw=(480, 640)) -> np.ndarray:
    image = np.zeros((*size_hw, 3), np.uint8)
    x1, y1, x2, y2 = xyxy
    image[y1:y2, x1:x2] = colour
    return image


@pytest.fixture(scope="module")
def yolo_file(tmp_path_factory) -> Path:
    """Static 1x3x320x320 input and Ultralytics metadata, like a default `yolo export`."""
    return colour_detector(tmp_path_factory.mktemp("byom") / "colours.onnx", metadata=ULTRALYTICS_METADATA)


@pytest.fixture(scope="module")
def bare_file(tmp_path_factory) -> Path:
    """Dynamic input and no metadata at all: everything must come from config."""
    return colour_detector(tmp_path_factory.mktemp("byom") / "bare.onnx", input_hw=None)


RED_SQUARE = (200, 100, 360, 260)  # xyxy in a 640x480 image


def test_the_files_size_and_names_are_used_and_the_decoder_is_inferred(yolo_file):
    stage = OnnxStage(OnnxStageConfig(model=str(yolo_file)))
    assert stage.decoder_name == "yolov8" and stage.decoder.size_hw == (320, 320)
    assert stage.decoder.labels == COLOURS
    assert stage.describe()["sources"] == {
        "decoder": "onnx metadata task='detect'",
        "labels": "onnx metadata names",
        "size_hw": "onnx input shape",
    }
    assert stage.version.startswith("ultralytics==8.2.46;sha256:")
    tensor, _ = stage.decoder.preprocess(image_with_square((255, 0, 0), RED_SQUARE))
    assert tensor.shape == (1, 3, 320, 320)
    # Two images through a file whose batch is fixed at 1: run one at a time.
    blue_square = (10, 20, 90, 60)
    (red, blue), _ = stage.predict(
        [image_with_square((255, 0, 0), RED_SQUARE), image_with_square((0, 0, 255), blue_square)]
    )
    assert red.labels == ["red"] and blue.labels == ["blue"]
    np.testing.assert_allclose(red.xyxy[0], RED_SQUARE, atol=2.5)  # 640 -> 320: one input pixel = 2
    np.testing.assert_allclose(blue.xyxy[0], blue_square, atol=2.5)
    assert red.confidence[0] == pytest.approx(0.9)


def test_metadata_imgsz_sets_the_size_of_a_dynamic_input(tmp_path):
    model = colour_detector(tmp_path / "dynamic.onnx", input_hw=None, metadata=ULTRALYTICS_METADATA)
    stage = OnnxStage(OnnxStageConfig(model=str(model)))
    assert stage.decoder.size_hw == (320, 320)  # not the decoder's default 640
    assert stage.describe()["sources"]["size_hw"] == "onnx metadata imgsz"
    tensor, _ = stage.decoder.preprocess(np.zeros((100, 100, 3), np.uint8))
    assert tensor.shape == (1, 3, 320, 320)


def test_config_that_agrees_with_the_file_is_accepted(yolo_file, tmp_path):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("red\ngreen\nblue\n")
    stage = OnnxStage(
        OnnxStageConfig(model=str(yolo_file), decoder="yolov8", size_hw=320, labels_file=str(labels_file))
    )
    assert stage.decoder.size_hw == (320, 320) and stage.describe()["sources"]["size_hw"] == "config"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"size_hw": 640},
            "configured size_hw 640x640 conflicts with the model file's onnx input shape 320x320",
        ),
        (
            {"decoder_options": {"size_hw": [320, 480]}},
            "configured size_hw 320x480 conflicts with the model file's onnx input shape 320x320",
        ),
        ({"labels": ["red", "blue", "green"]}, "class 1 is 'blue' in config but 'green' in the file's"),
        ({"labels": ["a", "b"]}, "2 labels configured, the file's metadata names has 3 classes"),
        ({"decoder": "classifier"}, "decoder 'classifier' conflicts with the model file: onnx metadata task"),
        ({"size_hw": 320, "decoder_options": {"size_hw": 256}}, "size_hw is set twice"),
    ],
)
def test_config_that_contradicts_the_file_is_a_config_error_naming_both(yolo_file, config, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        OnnxStage(OnnxStageConfig(model=str(yolo_file), **config))


def test_a_file_that_contradicts_itself_or_a_size_off_the_stride(tmp_path):
    liar = colour_detector(tmp_path / "liar.onnx", metadata={**ULTRALYTICS_METADATA, "imgsz": "[256, 256]"})
    with pytest.raises(ConfigError, match="fixed input shape 320x320 but metadata imgsz 256x256"):
        OnnxStage(OnnxStageConfig(model=str(liar)))
    strided = colour_detector(
        tmp_path / "strided.onnx", input_hw=None, metadata={"stride": "32", "task": "detect"}
    )
    with pytest.raises(ConfigError, match="300x300 is not a multiple of the model's stride 32"):
        OnnxStage(OnnxStageConfig(model=str(strided), size_hw=300))
    assert OnnxStage(OnnxStageConfig(model=str(strided), size_hw=[256, 384])).decoder.size_hw == (256, 384)


def test_metadata_literals_are_parsed_never_evaluated(tmp_path):
    assert parse_metadata_value("{0: 'person', 1: 'car'}") == {0: "person", 1: "car"}
    assert parse_metadata_value("[320, 320]") == [320, 320] and parse_metadata_value("32") == 32
    assert parse_metadata_value("8.2.46") == "8.2.46"
    hostile = "{0: __import__('os').system('touch pwned')}"
    assert parse_metadata_value(hostile) == hostile
    model = colour_detector(tmp_path / "hostile.onnx", metadata={**ULTRALYTICS_METADATA, "names": hostile})
    with pytest.raises(ConfigError, match="metadata names must be a dict or a list"):
        OnnxStage(OnnxStageConfig(model=str(model)))


def test_channels_bgr_reverses_the_tensor_and_what_the_model_sees(yolo_file):
    red = image_with_square((255, 0, 0), RED_SQUARE)
    rgb = OnnxStage(OnnxStageConfig(model=str(yolo_file)))
    bgr = OnnxStage(OnnxStageConfig(model=str(yolo_file), channels="BGR"))
    rgb_tensor, _ = rgb.decoder.preprocess(red)
    bgr_tensor, _ = bgr.decoder.preprocess(red)
    np.testing.assert_array_equal(bgr_tensor, rgb_tensor[:, ::-1])
    centre = (slice(None), 90, 140)  # inside the square in the 320x240-letterboxed input
    assert rgb_tensor[0][centre].tolist() == [1.0, 0.0, 0.0]
    assert bgr_tensor[0][centre].tolist() == [0.0, 0.0, 1.0]
    (seen_rgb, seen_bgr), _ = bgr.predict([red, red[..., ::-1].copy()])
    assert seen_rgb.labels == ["blue"] and seen_bgr.labels == ["red"]


def test_agnostic_nms_suppresses_across_classes_class_aware_does_not(yolo_file):
    magenta = image_with_square((255, 0, 255), RED_SQUARE)  # red and blue boxes in the same place
    (aware,), _ = OnnxStage(OnnxStageConfig(model=str(yolo_file))).predict([magenta])
    (agnostic,), _ = OnnxStage(OnnxStageConfig(model=str(yolo_file), nms="agnostic")).predict([magenta])
    assert sorted(aware.labels) == ["blue", "red"]
    assert agnostic.labels == ["red"]  # equal scores: the first anchor wins
    np.testing.assert_allclose(agnostic.xyxy[0], RED_SQUARE, atol=2.5)


def decode(raw_anchors, **options) -> object:
    """Decode one [anchors, 4 + classes] array for a 64x64 image at input size 64 (no letterbox)."""
    decoder = build_decoder("yolov8", labels=["a", "b"], options={"size_hw": [64, 64], **options})
    _, meta = decoder.preprocess(np.zeros((64, 64, 3), np.uint8))
    return decoder.decode([np.asarray(raw_anchors, np.float32).T[None]], meta)


def test_a_score_exactly_at_the_threshold_survives_nms():
    # cx, cy, w, h, score a, score b
    kept = decode([[20, 20, 10, 10, 0.25, 0.0], [40, 40, 10, 10, 0.0, 0.2499]], confidence_threshold=0.25)
    assert kept.labels == ["a"] and kept.confidence.tolist() == [0.25]
    # 0.7 is not a float32; a float32 output of 0.7 is still "at" a configured 0.7.
    assert len(decode([[20, 20, 10, 10, 0.7, 0.0]], confidence_threshold=0.7)) == 1


def test_a_box_with_negative_coordinates_does_not_suppress_another_class():
    # Class b's box reaches far outside the image (xyxy -40..10); clipped it is 0..10, which
    # overlaps class a's box 0..40 little, and is of another class: both stay.
    detections = decode([[20, 20, 40, 40, 0.9, 0.0], [-15, -15, 50, 50, 0.0, 0.8]])
    assert detections.labels == ["a", "b"]
    np.testing.assert_allclose(detections.xyxy, [[0, 0, 40, 40], [0, 0, 10, 10]])
    agnostic = decode([[20, 20, 40, 40, 0.9, 0.0], [-15, -15, 50, 50, 0.0, 0.8]], nms="agnostic")
    assert agnostic.labels == ["a", "b"]  # IoU of the clipped boxes is 100 / 1600


def test_nms_and_channels_are_checked():
    with pytest.raises(ConfigError, match=r"nms must be one of \['class_aware', 'agnostic'\]"):
        build_decoder("yolov8", labels=[], options={"nms": "soft"})
    with pytest.raises(ConfigError, match=r"channels must be one of \['RGB', 'BGR', 'GRAY'\]"):
        build_decoder("classifier", labels=[], options={"channels": "rgb"})
    with pytest.raises(ConfigError, match=r"decoder 'classifier' takes no option \['nms'\]"):
        build_decoder("classifier", labels=[], options={"nms": "agnostic"})


def test_classifiers_are_inferred_from_a_1xC_output_or_the_classify_task(tmp_path):
    plain = OnnxStage(
        OnnxStageConfig(model=str(channel_means_classifier(tmp_path / "plain.onnx")), labels=list(COLOURS))
    )
    assert plain.decoder_name == "classifier" and plain.decoder.size_hw == (32, 32)
    assert plain.describe()["sources"]["decoder"] == "output shape [1, 3]"
    ultralytics = OnnxStage(
        OnnxStageConfig(
            model=str(
                channel_means_classifier(
                    tmp_path / "cls.onnx",
                    {"task": "classify", "imgsz": "[32, 32]", "names": "{0: 'red', 1: 'green', 2: 'blue'}"},
                )
            )
        )
    )
    assert ultralytics.decoder.outputs == "probabilities" and ultralytics.decoder.mean == [0.0, 0.0, 0.0]
    (detections,), _ = ultralytics.predict([np.full((40, 60, 3), (0, 255, 0), np.uint8)])
    assert detections.labels[0] == "green" and detections.confidence[0] == pytest.approx(1.0)


def test_a_fixed_batch_is_filled_and_trimmed(tmp_path):
    model = OnnxModel(channel_means_classifier(tmp_path / "batch2.onnx", batch=2))
    assert model.static_batch == 2 and model.max_batch_size == 2
    batch = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    (means,) = model.run(batch)
    np.testing.assert_allclose(means, batch.mean(axis=(2, 3)), rtol=1e-5)


def test_an_unsupported_task_or_an_unknown_layout_names_the_options(tmp_path, bare_file):
    segment = colour_detector(tmp_path / "seg.onnx", metadata={"task": "segment"})
    with pytest.raises(
        ConfigError, match=r"task 'segment' has no decoder here; supported tasks: \['classify'"
    ):
        OnnxStage(OnnxStageConfig(model=str(segment)))
    with pytest.raises(
        ConfigError,
        match=r"outputs are \['\[1, 7, 3\]'\] .* one of \['classifier', 'dbnet', 'yolov8'\]",
    ):
        OnnxStage(OnnxStageConfig(model=str(bare_file)))


def test_the_registry_is_lazy_and_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now fails as if not installed
    for module in ("cascades.decoders.yolo", "cascades.decoders.dbnet"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr("cascades.decoders._loaded", {})
    assert build_decoder("classifier", labels=["a"], options={}).labels == ("a",)
    with pytest.raises(ConfigError, match=r"decoder 'yolov8' needs the module 'cv2'.*'opencv-python"):
        build_decoder("yolov8", labels=[], options={})
    monkeypatch.setattr(
        "importlib.metadata.requires", lambda name: ['opencv-python-headless>=4.8; extra == "detect"']
    )
    assert install_hint("cv2") == (
        "install package 'opencv-python-headless' with: pip install 'visionroute[detect]'"
    )


def run_predict(capsys, *argv) -> tuple[int, list[dict], str]:
    code = visionroute_main(["predict", *map(str, argv)])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_predict_cli_on_a_bare_file_with_decoder_labels_and_size(bare_file, tmp_path, capsys):
    from PIL import Image

    image_path = tmp_path / "red.png"
    Image.fromarray(image_with_square((255, 0, 0), RED_SQUARE)).save(image_path)
    code, _, err = run_predict(capsys, image_path, "--model", bare_file)
    assert code == 2 and "set `decoder` (config) or --decoder" in err

    labels_path = tmp_path / "labels.txt"
    labels_path.write_text("rouge\nvert\nbleu\n")
    for labels in (labels_path, "rouge,vert,bleu"):
        code, lines, err = run_predict(
            capsys,
            image_path,
            "--model",
            bare_file,
            "--decoder",
            "yolov8",
            "--labels",
            labels,
            "--size",
            "320",
        )
        assert code == 0, err
        (result,) = lines
        assert [d["label"] for d in result["detections"]] == ["rouge"]
        np.testing.assert_allclose(result["detections"][0]["xyxy"], RED_SQUARE, atol=2.5)
        assert '"input_hw": [320, 320]' in err

    code, lines, _ = run_predict(
        capsys, image_path, "--model", bare_file, "--decoder", "yolov8", "--size", "256x384"
    )
    assert code == 0 and lines[0]["detections"][0]["class_id"] == 0


def test_predict_cli_reads_the_file_and_refuses_a_contradicting_size(yolo_file, tmp_path, capsys):
    from PIL import Image

    image_path = tmp_path / "blue.png"
    Image.fromarray(image_with_square((0, 0, 255), RED_SQUARE)).save(image_path)
    code, lines, err = run_predict(capsys, image_path, "--model", yolo_file)
    assert code == 0, err
    assert [d["label"] for d in lines[0]["detections"]] == ["blue"]
    code, _, err = run_predict(capsys, image_path, "--model", yolo_file, "--size", "640")
    assert code == 2 and "640x640" in err and "320x320" in err


# -- grayscale models -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """The cheap digits tier (a real model trained here on sklearn's digits): input [n, 1, 8, 8]."""
    from cascades.digits import export_onnx, load_split, train_tier

    split = load_split()
    path = tmp_path_factory.mktemp("digits") / "digits_cheap.onnx"
    return export_onnx(train_tier("cheap", split), path, tier="cheap", seed=0), split


def test_a_one_channel_model_gets_gray_input_and_answers_like_the_model_on_its_own_pixels(digits_model):
    path, split = digits_model
    # trained on pixels in [0, 1]: no standardisation (the classifier's default mean/std is 0.5)
    stage = OnnxStage(
        OnnxStageConfig(
            model=str(path), labels=[str(d) for d in range(10)], decoder_options={"mean": [0.0], "std": [1.0]}
        )
    )
    assert stage.settings.options["channels"] == "GRAY"
    assert "1 channel" in stage.settings.sources["channels"]
    direct = OnnxModel(path).run(split.images_pool[:40])[0].argmax(axis=1)
    agreed = 0
    for pixels, expected in zip(split.images_pool[:40], direct):
        grey = np.round(pixels[0] * 255).astype(np.uint8)
        rgb = np.repeat(np.kron(grey, np.ones((8, 8), np.uint8))[..., None], 3, axis=-1)  # 64x64, RGB
        detections, _ = stage.predict([rgb])
        agreed += detections[0].to_dicts()[0]["label"] == str(expected)
    assert agreed >= 36  # resizing 64 -> 8 px is not exactly the original grid; nearly every answer holds


@pytest.mark.parametrize("channels", ["RGB", "BGR"])
def test_a_colour_order_for_a_one_channel_model_is_a_config_error(digits_model, channels):
    with pytest.raises(ConfigError, match="takes 1 channel") as error:
        OnnxStage(OnnxStageConfig(model=str(digits_model[0]), channels=channels))
    assert error.value.field == "channels"


def test_gray_for_a_three_channel_model_is_a_config_error(yolo_file):
    with pytest.raises(ConfigError, match="takes 3 channels") as error:
        OnnxStage(OnnxStageConfig(model=str(yolo_file), channels="GRAY"))
    assert error.value.field == "channels"
