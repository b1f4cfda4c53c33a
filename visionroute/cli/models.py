"""``visionroute models prepare|list`` and ``visionroute predict``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from visionroute import paths


def _prepare(args) -> int:
    from cascades.models import prepare_models

    prepared = prepare_models(Path(args.dir), args.names or None, force=args.force)
    for name, path in prepared.items():
        sidecar = json.loads(path.with_suffix(".json").read_text())
        print(f"{name}: {path} ({sidecar['version']}, sha256 {sidecar['sha256'][:16]})")
    return 0


def _list(args) -> int:
    """Prepared models with version and checksum, then every packaged model still missing."""
    from cascades.models import PACKAGED_MODELS, prepared_status

    models_dir = Path(args.dir).expanduser()
    print(f"models directory: {models_dir}" + ("" if models_dir.is_dir() else " (does not exist yet)"))
    listed = set()
    for sidecar in sorted(models_dir.glob("*.json")) if models_dir.is_dir() else []:
        try:
            meta = json.loads(sidecar.read_text())
        except ValueError:
            continue
        if "sha256" in meta:
            name = meta.get("name", sidecar.stem)
            problem = prepared_status(models_dir, sidecar.stem)
            listed.add(sidecar.stem)
            print(
                f"{name}\t{meta.get('decoder')}\t{meta.get('version')}\t{meta['sha256'][:16]}"
                + (f"\t{problem}" if problem else "")
            )
    missing = [name for name in PACKAGED_MODELS if name not in listed]
    for name in missing:
        print(f"{name}\tnot prepared ({PACKAGED_MODELS[name]})")
    if missing:
        print(f"prepare with: visionroute models prepare --dir {models_dir}")
    return 0


def parse_size(text: str) -> tuple[int, int]:
    """'320' -> (320, 320); '384x640' or '384,640' -> (384, 640) as (height, width)."""
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"size must be N or HxW (positive ints), got {text!r}")
    return (values[0], values[-1])


def parse_labels(text: str) -> dict[str, Any]:
    """A text file (one label per line) when the path exists, else a comma-separated list."""
    if Path(text).expanduser().is_file():
        return {"labels_file": text}
    if "," not in text and text.endswith((".txt", ".names", ".labels")):
        raise argparse.ArgumentTypeError(f"labels file {text!r} does not exist")
    return {"labels": [label.strip() for label in text.split(",") if label.strip()]}


def _predict(args) -> int:
    from pydantic import ValidationError

    from cascades.images import decode_image
    from cascades.onnx_stage import OnnxStage, OnnxStageConfig
    from visionroute.errors import ConfigError

    chosen = {
        "decoder": args.decoder,
        "size_hw": args.size,
        "channels": args.channels,
        "nms": args.nms,
        **(args.labels or {}),
    }
    try:
        config = OnnxStageConfig(model=args.model, **{k: v for k, v in chosen.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(str(exc), field="predict") from None
    stage = OnnxStage(config, models_dir=Path(args.dir))
    info = stage.describe()
    # What the model runs with and where each value came from; stdout stays one JSON per image.
    print(
        json.dumps(
            {
                "model": info["model"],
                "decoder": info["decoder"],
                "input_hw": info["input_hw"],
                "labels": len(stage.decoder.labels),
                "sources": info["sources"],
            }
        ),
        file=sys.stderr,
    )
    for image_path in args.images:
        image = decode_image(Path(image_path).read_bytes(), field=image_path)
        (detections,), latency_ms = stage.predict([image.rgb])
        print(
            json.dumps(
                {
                    "image": image_path,
                    "latency_ms": round(latency_ms, 2),
                    "detections": detections.to_dicts()[: args.top],
                }
            )
        )
    return 0


def register(subparsers, bench) -> None:
    from cascades.decoders import DECODERS  # names only: no decoder module is imported

    models = subparsers.add_parser("models", help="prepare and list the ONNX models")
    actions = models.add_subparsers(dest="action", required=True)
    prepare = actions.add_parser("prepare", help="build the embedded default models from packaged weights")
    prepare.add_argument("names", nargs="*", help="models to prepare (default: all)")
    prepare.add_argument(
        "--dir", default=str(paths.models_dir()), help="models directory (default: %(default)s)"
    )
    prepare.add_argument("--force", action="store_true", help="rebuild even when already prepared")
    prepare.set_defaults(func=_prepare)
    listing = actions.add_parser("list", help="list prepared models with version and checksum")
    listing.add_argument("--dir", default=str(paths.models_dir()))
    listing.set_defaults(func=_list)

    predict = subparsers.add_parser(
        "predict",
        help="run one ONNX model on image files (no service)",
        description="Run one ONNX model on image files. Unset flags come from the ONNX file (fixed input "
        "shape; Ultralytics metadata imgsz, names, task), then the model's sidecar; a flag that "
        "contradicts the file is an error. See docs/byom.md.",
    )
    predict.add_argument("images", nargs="+")
    predict.add_argument(
        "--model", default="efficientnet_lite0", help="prepared name, .onnx path or hf://owner/repo/file.onnx"
    )
    predict.add_argument(
        "--decoder",
        choices=sorted(DECODERS),
        help="output layout (default: inferred from metadata task or a [1, C] output)",
    )
    predict.add_argument(
        "--labels",
        type=parse_labels,
        metavar="FILE|A,B,...",
        help="class names: a text file with one per line, or a comma-separated list",
    )
    predict.add_argument(
        "--size", type=parse_size, metavar="N|HxW", help="model input size (default: from the file)"
    )
    predict.add_argument("--channels", choices=["RGB", "BGR"], help="channel order the model expects")
    predict.add_argument("--nms", choices=["class_aware", "agnostic"], help="yolov8 NMS mode")
    predict.add_argument("--dir", default=str(paths.models_dir()))
    predict.add_argument("--top", type=int, default=5)
    predict.set_defaults(func=_predict)
