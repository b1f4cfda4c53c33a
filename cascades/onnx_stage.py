"""The cheap tier: an ONNX model plus its decoder (plus, optionally, its calibrator)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from cascades.decoders import DECODERS, Decoder, build_decoder, decoder_options
from cascades.onnx_runner import OnnxModel
from visionroute import paths
from visionroute.errors import ConfigError
from visionroute.records import Detections

# Ultralytics' metadata ``task`` -> the decoder for that head; other tasks have none here.
TASK_DECODERS = {"detect": "yolov8", "classify": "classifier"}
# What an Ultralytics classification export expects and returns (softmax inside the graph;
# ultralytics/data/augment.py classify_transforms: shorter side to size, centre crop, [0, 1]).
ULTRALYTICS_CLASSIFY_OPTIONS = {
    "outputs": "probabilities",
    "resize": "center_crop",
    "crop_fraction": 1.0,
    "mean": [0.0, 0.0, 0.0],
    "std": [1.0, 1.0, 1.0],
}


class OnnxStageConfig(BaseModel):
    """One ONNX model as config names it.

    ``model`` is a file path, a name prepared under the models dir (``efficientnet_lite0``),
    or ``hf://owner/repo/file.onnx`` (downloaded with huggingface_hub on machines with a hub).
    Decoder, labels, input size and preprocessing default to what the ONNX file states (its
    fixed input shape; Ultralytics metadata: imgsz, names, stride, task), then to the model's
    sidecar. A value set here that contradicts the file is a ConfigError naming both.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    decoder: Literal["classifier", "yolov8", "dbnet"] | None = None
    labels: list[str] | None = None
    labels_file: str | None = Field(None, description="one label per line")
    size_hw: PositiveInt | tuple[PositiveInt, PositiveInt] | None = Field(
        None,
        description="model input (height, width), or one int for a square; default: the file's fixed "
        "input shape, else its metadata imgsz, else the sidecar's or the decoder's default",
    )
    channels: Literal["RGB", "BGR", "GRAY"] | None = Field(
        None,
        description="channel order the model expects; default: GRAY for a file whose input has one "
        "channel, else the decoder's (dbnet: BGR, others: RGB)",
    )
    nms: Literal["class_aware", "agnostic"] | None = Field(
        None, description="yolov8 only: suppress overlaps within a class (default) or across classes"
    )
    decoder_options: dict[str, Any] = Field(default_factory=dict)
    providers: list[str] | None = None
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads per inference; 0 = one per core (Ray's OMP_NUM_THREADS does not apply)",
    )
    thread_spinning: bool = Field(
        False,
        description="ONNX Runtime's idle threads spin for work (ORT's own default) or sleep (ours). On the "
        "2-core build machine shared with other processes, 2 spinning threads took ~3x the CPU per "
        "inference and 3-10x the wall time (evals/benchmarks/ort_threads.py); on it quiet, spinning "
        "saved 3 ms raw and 6-8 ms per request at the same throughput (bench serve): turn it on "
        "only where the replica has its cores to itself",
    )
    calibration: str | None = Field(None, description="path to a calibration artefact JSON")
    cost_units: float = Field(1.0, ge=0, description="cost of one inference in cost units")

    @field_validator("size_hw")
    @classmethod
    def _square_from_int(cls, value):
        return (value, value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _one_source_of_labels(self):
        if self.labels is not None and self.labels_file is not None:
            raise ValueError("set labels or labels_file, not both")
        return self


def _hw(value: Any, what: str) -> tuple[int, int]:
    """320 or [320, 320] -> (320, 320); anything else is a ConfigError naming ``what``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ConfigError(f"{what} must be a positive int or [height, width], got {value!r}", field="size_hw")


def _names(value: Any) -> list[str]:
    """Ultralytics ``names`` ({0: 'person', ...}) or a list -> labels in class-id order."""
    if isinstance(value, dict):
        if sorted(value) != list(range(len(value))):
            raise ConfigError(
                f"model metadata names must have class ids 0..{len(value) - 1}, got {sorted(value)[:10]}",
                field="labels",
            )
        return [str(value[i]) for i in range(len(value))]
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    raise ConfigError(f"model metadata names must be a dict or a list, got {value!r}", field="labels")


def show_shape(shape: list) -> str:
    """[1, 22, 'a long symbolic dim'] -> '[1, 22, ?]': fixed dims, short names, '?' otherwise."""
    dims = [str(d) if isinstance(d, int) or (isinstance(d, str) and len(d) <= 12) else "?" for d in shape]
    return f"[{', '.join(dims)}]"


def _show_hw(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


@dataclass(frozen=True)
class FileFacts:
    """What an ONNX file states about itself: its fixed input shape and Ultralytics metadata."""

    input_hw: tuple[int, int] | None
    imgsz_hw: tuple[int, int] | None
    names: list[str] | None
    stride: int | None
    task: str | None
    output_shapes: list = field(default_factory=list)

    @classmethod
    def from_model(cls, model: OnnxModel) -> FileFacts:
        meta = model.file_metadata
        stride = meta.get("stride")
        if isinstance(stride, list | tuple):  # some exports write per-level strides; the largest
            stride = max(stride) if stride else None
        if stride is not None and not (isinstance(stride, int) and stride > 0):
            raise ConfigError(f"model metadata stride must be a positive int, got {stride!r}", field="model")
        return cls(
            input_hw=model.input_hw,
            imgsz_hw=_hw(meta["imgsz"], "model metadata imgsz") if "imgsz" in meta else None,
            names=_names(meta["names"]) if "names" in meta else None,
            stride=stride,
            task=str(meta["task"]) if "task" in meta else None,
            output_shapes=model.output_shapes,
        )

    def size_hw(self) -> tuple[tuple[int, int], str] | None:
        """The input size the file states and where, or None; a file that states two is an error."""
        if self.input_hw and self.imgsz_hw and self.input_hw != self.imgsz_hw:
            raise ConfigError(
                f"the model file contradicts itself: fixed input shape {_show_hw(self.input_hw)} "
                f"but metadata imgsz {_show_hw(self.imgsz_hw)}",
                field="size_hw",
            )
        if self.input_hw:
            return self.input_hw, "onnx input shape"
        if self.imgsz_hw:
            return self.imgsz_hw, "onnx metadata imgsz"
        return None


def infer_decoder(facts: FileFacts) -> tuple[str, str] | None:
    """A decoder from the file alone, where unambiguous: Ultralytics ``task``, or a [1, C] output."""
    if facts.task is not None:
        if facts.task not in TASK_DECODERS:
            raise ConfigError(
                f"model metadata task {facts.task!r} has no decoder here; supported tasks: "
                f"{sorted(TASK_DECODERS)} (decoders {sorted(DECODERS)})",
                field="decoder",
            )
        return TASK_DECODERS[facts.task], f"onnx metadata task={facts.task!r}"
    if len(facts.output_shapes) == 1 and len(facts.output_shapes[0]) == 2:
        return "classifier", f"output shape {show_shape(facts.output_shapes[0])}"
    return None


@dataclass
class StageSettings:
    """What the stage runs with, and where each value came from (config, file, sidecar, default)."""

    decoder: str
    labels: list[str]
    options: dict[str, Any]
    sources: dict[str, str]


def read_labels_file(path: str) -> list[str]:
    labels_path = Path(path).expanduser()
    if not labels_path.is_file():
        raise ConfigError(f"labels file {path!r} does not exist", field="labels_file")
    return [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]


def _check_labels(configured: list[str], names: list[str], source: str) -> None:
    if configured == names:
        return
    if len(configured) != len(names):
        detail = f"{len(configured)} labels configured, the file's {source} has {len(names)} classes"
    else:
        index = next(i for i, (a, b) in enumerate(zip(configured, names)) if a != b)
        detail = (
            f"class {index} is {configured[index]!r} in config but {names[index]!r} in the file's {source}"
        )
    raise ConfigError(
        f"configured labels conflict with the model file: {detail}; drop labels/labels_file to use "
        f"the file's names {names[:5]}{'...' if len(names) > 5 else ''}",
        field="labels",
    )


def resolve_settings(config: OnnxStageConfig, model: OnnxModel) -> StageSettings:
    """Decoder, labels and options: config, else the ONNX file, else the sidecar, else defaults.

    Config may fill in what the file does not state; where both state a value and the values
    differ, this raises a ConfigError naming both.
    """
    facts = FileFacts.from_model(model)
    sidecar = model.metadata  # the file's metadata with the sidecar's keys on top
    sources: dict[str, str] = {}

    # Explicit config: the top-level keys are shorthands for decoder_options entries.
    explicit = dict(config.decoder_options)
    for key in ("size_hw", "channels", "nms"):
        value = getattr(config, key)
        if value is None:
            continue
        if key in explicit:
            other = _hw(explicit[key], f"decoder_options.{key}") if key == "size_hw" else explicit[key]
            if other != value:
                raise ConfigError(
                    f"{key} is set twice, differently: {key}={value!r} and decoder_options.{key}={explicit[key]!r}",
                    field=key,
                )
        explicit[key] = value
    if "size_hw" in explicit:
        explicit["size_hw"] = _hw(explicit["size_hw"], "size_hw")

    # Input size: the file's, unless config states another, which is a conflict.
    file_size = facts.size_hw()
    if "size_hw" in explicit and file_size and explicit["size_hw"] != file_size[0]:
        raise ConfigError(
            f"configured size_hw {_show_hw(explicit['size_hw'])} conflicts with the model file's "
            f"{file_size[1]} {_show_hw(file_size[0])}; drop size_hw or set it to {list(file_size[0])}",
            field="size_hw",
        )
    if "size_hw" in explicit and facts.stride:
        height, width = explicit["size_hw"]
        if height % facts.stride or width % facts.stride:
            raise ConfigError(
                f"size_hw {_show_hw(explicit['size_hw'])} is not a multiple of the model's stride "
                f"{facts.stride} (onnx metadata)",
                field="size_hw",
            )

    # Labels: configured ones must match the file's names where the file has them.
    configured = config.labels
    if configured is None and config.labels_file:
        configured = read_labels_file(config.labels_file)
    if configured is not None and facts.names is not None:
        _check_labels(configured, facts.names, "metadata names")
    if configured is not None:
        labels, sources["labels"] = configured, "config"
    elif facts.names is not None:
        labels, sources["labels"] = facts.names, "onnx metadata names"
    elif sidecar.get("labels"):
        labels, sources["labels"] = list(sidecar["labels"]), "sidecar"
    else:
        labels = []

    # Decoder: config, else what the file's task or output layout says, else the sidecar.
    inferred = infer_decoder(facts)
    if config.decoder and inferred and facts.task is not None and config.decoder != inferred[0]:
        raise ConfigError(
            f"configured decoder {config.decoder!r} conflicts with the model file: {inferred[1]} "
            f"means decoder {inferred[0]!r}",
            field="decoder",
        )
    if config.decoder:
        decoder, sources["decoder"] = config.decoder, "config"
    elif facts.task is None and sidecar.get("decoder"):
        decoder, sources["decoder"] = str(sidecar["decoder"]), "sidecar"
    elif inferred:
        decoder, sources["decoder"] = inferred[0], inferred[1]
    else:
        raise ConfigError(
            f"cannot tell which decoder model {config.model!r} needs: its outputs are "
            f"{[show_shape(shape) for shape in facts.output_shapes]} and it names no task or decoder; set "
            f"`decoder` (config) or --decoder (visionroute predict) to one of {sorted(DECODERS)}",
            field="decoder",
        )

    # Options: decoder defaults < sidecar preprocessing < what the file states < config.
    options = dict(sidecar.get("preprocess", {}))
    sources.update(dict.fromkeys(options, "sidecar"))
    if facts.task == "classify":
        options.update(ULTRALYTICS_CLASSIFY_OPTIONS)
        sources.update(dict.fromkeys(ULTRALYTICS_CLASSIFY_OPTIONS, "onnx metadata task='classify'"))
    if file_size and "size_hw" in decoder_options(decoder):
        options["size_hw"], sources["size_hw"] = file_size
    _channels_from_file(model.input_channels, explicit, options, sources)
    options.update(explicit)
    sources.update(dict.fromkeys(explicit, "config"))
    if options.get("size_hw") is not None:
        options["size_hw"] = _hw(options["size_hw"], "size_hw")
    _check_class_count(decoder, labels, sources.get("labels", ""), facts.output_shapes)
    return StageSettings(decoder=decoder, labels=labels, options=options, sources=sources)


def _channels_from_file(
    file_channels: int | None, explicit: dict[str, Any], options: dict[str, Any], sources: dict[str, str]
) -> None:
    """A one-channel input means GRAY; a configured colour order for it (or GRAY for a 3-channel
    input) is the conflict rule's error, not a shape error at the first request."""
    configured = explicit.get("channels")
    if file_channels == 1:
        if configured not in (None, "GRAY"):
            raise ConfigError(
                f"configured channels {configured!r} conflicts with the model file's onnx input shape: "
                "it takes 1 channel; drop channels or set it to 'GRAY'",
                field="channels",
            )
        options["channels"], sources["channels"] = "GRAY", "onnx input shape (1 channel)"
    elif file_channels is not None and configured == "GRAY":
        raise ConfigError(
            f"configured channels 'GRAY' conflicts with the model file's onnx input shape: it takes "
            f"{file_channels} channels; drop channels or set it to 'RGB' or 'BGR'",
            field="channels",
        )


def _check_class_count(decoder: str, labels: list[str], labels_source: str, output_shapes: list) -> None:
    """Fail at load, not at the first request, when the output's fixed class count disagrees."""
    if not labels or not output_shapes:
        return
    shape = output_shapes[0]
    if decoder == "yolov8" and len(shape) == 3 and isinstance(shape[1], int):
        classes = shape[1] - 4
    elif decoder == "classifier" and len(shape) == 2 and isinstance(shape[1], int):
        classes = shape[1]
    else:
        return
    if classes != len(labels):
        raise ConfigError(
            f"model output {show_shape(shape)} has {classes} classes, {len(labels)} labels configured "
            f"(from {labels_source})",
            field="labels",
        )


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
            thread_spinning=config.thread_spinning,
        )
        self.settings = resolve_settings(config, self.model)
        self.decoder: Decoder = build_decoder(
            self.settings.decoder, labels=self.settings.labels, options=self.settings.options
        )
        self.decoder_name = self.settings.decoder
        self.name = self.model.metadata.get("name") or Path(config.model).stem
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
            "input_hw": list(getattr(self.decoder, "size_hw", ())) or None,
            "sources": self.settings.sources,
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
                    if detections.class_probabilities is not None:  # name the file that made them
                        made_by = replace(detections.class_probabilities, model_sha256=self.model.sha256)
                        detections = replace(detections, class_probabilities=made_by)
                    if self.calibrator is not None:
                        detections = self.calibrator.apply(detections)
                    results[index] = detections
        return results, (time.perf_counter() - started) * 1000.0
