"""The cheap tier: an ONNX model plus its decoder (plus, optionally, its calibrator)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cascades.decoders import Decoder, build_decoder
from cascades.onnx_runner import OnnxModel
from visionroute import paths
from visionroute.errors import ConfigError
from visionroute.records import Detections


class OnnxStageConfig(BaseModel):
    """One ONNX model as config names it.

    ``model`` is a file path, a name prepared under the models dir (``efficientnet_lite0``),
    or ``hf://owner/repo/file.onnx`` (downloaded with huggingface_hub on machines with a hub).
    Decoder, labels and preprocessing default to the model's sidecar/metadata; config wins.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    decoder: Literal["classifier", "yolov8", "dbnet"] | None = None
    labels: list[str] | None = None
    labels_file: str | None = Field(None, description="one label per line")
    decoder_options: dict[str, Any] = Field(default_factory=dict)
    providers: list[str] | None = None
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads per inference; 0 = one per core (Ray's OMP_NUM_THREADS does not apply)",
    )
    calibration: str | None = Field(None, description="path to a calibration artefact JSON")
    cost_units: float = Field(1.0, ge=0, description="cost of one inference in cost units")


def resolve_model_path(model: str, models_dir: Path | None = None) -> Path:
    if model.startswith("hf://"):
        repo_and_file = model.removeprefix("hf://").split("/")
        if len(repo_and_file) < 3:
            raise ConfigError(
                f"hub model must look like hf://owner/repo/file.onnx, got {model!r}", field="model"
            )
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download("/".join(repo_and_file[:2]), "/".join(repo_and_file[2:])))
        except Exception as exc:
            raise ConfigError(f"cannot fetch {model!r} from the hub: {exc}", field="model") from None
    path = Path(model).expanduser()
    if path.suffix == ".onnx" or path.is_absolute() or "/" in model:
        if not path.is_file():
            raise ConfigError(f"ONNX model file {model!r} does not exist", field="model")
        return path
    prepared = Path(models_dir or paths.models_dir()) / f"{model}.onnx"
    if not prepared.is_file():
        raise ConfigError(
            f"model {model!r} is not prepared in {prepared.parent}; run `visionroute models prepare`",
            field="model",
        )
    return prepared


class OnnxStage:
    """Runs images through one ONNX model and returns Detections per image."""

    def __init__(self, config: OnnxStageConfig, *, models_dir: Path | None = None) -> None:
        self.config = config
        self.model = OnnxModel(
            resolve_model_path(config.model, models_dir),
            providers=config.providers,
            intra_op_threads=config.intra_op_threads,
        )
        metadata = self.model.metadata
        decoder_name = config.decoder or metadata.get("decoder")
        if not decoder_name:
            raise ConfigError(
                f"model {config.model!r} names no decoder; set `decoder` in config", field="decoder"
            )
        labels = config.labels
        if labels is None and config.labels_file:
            labels = [
                line.strip() for line in Path(config.labels_file).read_text().splitlines() if line.strip()
            ]
        if labels is None:
            labels = metadata.get("labels") or []
        options = {**metadata.get("preprocess", {}), **config.decoder_options}
        self.decoder: Decoder = build_decoder(decoder_name, labels=labels, options=options)
        self.decoder_name = decoder_name
        self.name = metadata.get("name") or Path(config.model).stem
        self.calibrator = None
        if config.calibration:
            from cascades.calibration import load_calibration

            self.calibrator = load_calibration(config.calibration)

    @property
    def version(self) -> str:
        return f"{self.model.version};sha256:{self.model.sha256[:16]}"

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "model_version": self.version,
            "decoder": self.decoder_name,
            "providers": self.model.providers,
            # The artefact id and its risk certificate (alpha, delta, n, threshold, bound).
            "calibration": self.calibrator.trace_details() if self.calibrator is not None else None,
        }

    def predict(self, images_rgb: list[np.ndarray]) -> tuple[list[Detections], float]:
        """Detections for each image (same order) and the wall time in ms for the batch."""
        started = time.perf_counter()
        prepared = [self.decoder.preprocess(image) for image in images_rgb]
        results: list[Detections | None] = [None] * len(prepared)
        # Images whose tensors share a shape run together, up to the decoder's batch size.
        by_shape: dict[tuple, list[int]] = {}
        for index, (tensor, _) in enumerate(prepared):
            by_shape.setdefault(tensor.shape, []).append(index)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.decoder.max_batch_size):
                chunk = indices[start : start + self.decoder.max_batch_size]
                outputs = self.model.run(np.concatenate([prepared[i][0] for i in chunk]))
                for row, index in enumerate(chunk):
                    detections = self.decoder.decode(
                        [out[row : row + 1] for out in outputs], prepared[index][1]
                    )
                    if self.calibrator is not None:
                        detections = self.calibrator.apply(detections)
                    results[index] = detections
        return results, (time.perf_counter() - started) * 1000.0
