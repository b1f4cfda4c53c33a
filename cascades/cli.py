"""``visionroute models prepare|list`` and ``visionroute predict``."""

from __future__ import annotations

import json
from pathlib import Path

from visionroute import paths


def _prepare(args) -> int:
    from cascades.models import prepare_models

    prepared = prepare_models(Path(args.dir), args.names or None, force=args.force)
    for name, path in prepared.items():
        sidecar = json.loads(path.with_suffix(".json").read_text())
        print(f"{name}: {path} ({sidecar['version']}, sha256 {sidecar['sha256'][:16]})")
    return 0


def _list(args) -> int:
    for sidecar in sorted(Path(args.dir).glob("*.json")):
        meta = json.loads(sidecar.read_text())
        if "sha256" in meta:
            print(
                f"{meta.get('name', sidecar.stem)}\t{meta.get('decoder')}\t{meta.get('version')}\t{meta['sha256'][:16]}"
            )
    return 0


def _predict(args) -> int:
    from cascades.images import decode_image
    from cascades.onnx_stage import OnnxStage, OnnxStageConfig

    stage = OnnxStage(OnnxStageConfig(model=args.model), models_dir=Path(args.dir))
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

    predict = subparsers.add_parser("predict", help="run one ONNX model on image files (no service)")
    predict.add_argument("images", nargs="+")
    predict.add_argument("--model", default="efficientnet_lite0", help="prepared name or .onnx path")
    predict.add_argument("--dir", default=str(paths.models_dir()))
    predict.add_argument("--top", type=int, default=5)
    predict.set_defaults(func=_predict)
