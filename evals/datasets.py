"""A user's own labelled images: a folder plus a labels file, or class subfolders.

- ``images/`` + ``labels.csv`` with columns ``image,label`` and any further columns, which
  become per-item metadata for slicing (e.g. ``source``, ``lighting``);
- or ``images/<label>/*.jpg`` (the ImageFolder layout) when no labels file is given.
Labels must be names from the model's label set. Detection data comes as COCO JSON
(annotations plus a results file); see ``evals.detection.evaluate_coco_files``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visionroute.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str
    metadata: dict[str, Any] = field(default_factory=dict)


def folder_items(images_dir: str | Path, labels_file: str | Path | None = None) -> list[LabelledImage]:
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"images folder {str(images_dir)!r} does not exist", field="images")
    if labels_file is None:
        items = [
            LabelledImage(path, path.parent.name, {"folder": path.parent.name})
            for path in sorted(images_dir.glob("*/*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
    else:
        with Path(labels_file).open(newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
                raise InputError(
                    f"labels file {str(labels_file)!r} needs columns image,label; found {reader.fieldnames}",
                    field="labels",
                )
            items = [
                LabelledImage(
                    images_dir / row["image"],
                    row["label"],
                    {k: v for k, v in row.items() if k not in ("image", "label")},
                )
                for row in reader
            ]
        missing = [str(item.path) for item in items if not item.path.is_file()]
        if missing:
            raise InputError(
                f"{len(missing)} images in the labels file do not exist, e.g. {missing[:3]}", field="labels"
            )
    if not items:
        raise InputError(f"no labelled images found in {str(images_dir)!r}", field="images")
    return items


def classify(model: str, items: Sequence[LabelledImage], *, models_dir: Path | None = None):
    """Full class-probability vectors from the service's own ONNX stage, and label indices."""
    from cascades.images import decode_image
    from cascades.onnx_stage import OnnxStage, OnnxStageConfig

    stage = OnnxStage(
        OnnxStageConfig(model=model, decoder="classifier", decoder_options={"top_k": 1_000_000}),
        models_dir=models_dir,
    )
    class_names = tuple(stage.decoder.labels)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({item.label for item in items if item.label not in index})
    if unknown:
        raise InputError(
            f"labels {unknown[:5]} are not in model {model!r}'s label set (e.g. {list(class_names[:5])})",
            field="labels",
        )
    probabilities = np.zeros((len(items), len(class_names)))
    for row, item in enumerate(items):
        image = decode_image(item.path.read_bytes(), field=str(item.path))
        (detections,), _ = stage.predict([image.rgb])
        probabilities[row, detections.class_id] = detections.confidence
    labels = np.array([index[item.label] for item in items], np.int64)
    info = {"name": stage.name, "sha256": stage.model.sha256}
    return probabilities, labels, class_names, info


def folder_tier_data(
    images_dir, labels_file=None, *, model: str, strong_model: str | None = None, models_dir=None
):
    from evals.harness import TierData

    items = folder_items(images_dir, labels_file)
    cheap, labels, names, cheap_info = classify(model, items, models_dir=models_dir)
    strong, models = None, {"cheap": cheap_info}
    if strong_model:
        strong, _, strong_names, models["strong"] = classify(strong_model, items, models_dir=models_dir)
        if strong_names != names:
            raise InputError(
                "the strong model's label set differs from the cheap model's", field="strong_model"
            )
    return TierData(
        cheap, strong, labels, names, [item.metadata for item in items], Path(images_dir).name, models
    )
