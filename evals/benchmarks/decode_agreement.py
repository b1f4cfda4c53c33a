"""Does decoding a JPEG at the model's size (DCT scaling, PIL ``draft``) change the answer?

    python -m evals.benchmarks.decode_agreement [--models-dir DIR]

``limits.decode.jpeg_at_model_size`` (cascades/decode_budget.py) decodes a JPEG at 1/2, 1/4 or
1/8 scale when the cheap tier's input is at most half the image in both sides, so the model sees
other pixels than a full decode resized by its own preprocessing. This runs the shipped classify
tier (efficientnet_lite0) on each image both ways and reports how often the answers agree: the
top-1 class, the decision band under the shipped thresholds (accept >= 0.7, escalate < 0.3,
review between), and the top-1 score's difference; plus each way's decode + inference CPU.

Images: ``bench serve``'s photos (as sent, JPEG q90) and a generated set: every bundled
scikit-image / scikit-learn photo that loads offline, resized so its shorter side is 448, 600,
900 and 1400 px, encoded at JPEG quality 75 and 92 (a factor of 2 to 6 above the model's 224).
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

ACCEPT, ESCALATE = 0.7, 0.3  # serve_config.yaml's classify policy
SHORT_SIDES = (448, 600, 900, 1400)
QUALITIES = (75, 92)
SKIMAGE = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text",
    "hubble_deep_field", "immunohistochemistry", "colorwheel", "clock", "grass", "gravel", "brick",
    "cell", "retina", "skin", "logo", "horse", "kidney", "lily",
)  # fmt: skip


def _rgb(image: np.ndarray) -> np.ndarray | None:
    if image.dtype != np.uint8:
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        else:
            return None
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    if image.ndim != 3 or image.shape[2] < 3:
        return None
    return np.ascontiguousarray(image[..., :3])


def base_photos() -> dict[str, np.ndarray]:
    """Bundled photos that load without the network, as RGB uint8."""
    from skimage import data

    photos: dict[str, np.ndarray] = {}
    for name in SKIMAGE:
        try:
            image = getattr(data, name)()
        except Exception:  # fetched from the network, or absent in this version
            continue
        rgb = _rgb(np.asarray(image)) if not isinstance(image, tuple) else None
        if rgb is not None and min(rgb.shape[:2]) >= 64:
            photos[name] = rgb
    try:
        from sklearn.datasets import load_sample_images

        for name, image in zip(("china", "flower"), load_sample_images().images):
            photos[name] = np.ascontiguousarray(image)
    except Exception:
        pass
    return photos


def jpeg(rgb: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def generated_set() -> dict[str, bytes]:
    import cv2

    out: dict[str, bytes] = {}
    for name, rgb in base_photos().items():
        for side in SHORT_SIDES:
            scale = side / min(rgb.shape[:2])
            size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
            resized = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
            for quality in QUALITIES:
                out[f"{name}@{side}q{quality}"] = jpeg(resized, quality)
    return out


def _band(score: float) -> str:
    return "accept" if score >= ACCEPT else ("escalate" if score < ESCALATE else "review")


def compare(stage: Any, images: dict[str, bytes], min_size: tuple[int, int]) -> dict[str, Any]:
    from cascades.images import decode_image, reduction_factor

    rows, cpu = [], {"full": 0.0, "reduced": 0.0}
    for name, data in images.items():
        answers = {}
        for way, size in (("full", None), ("reduced", min_size)):
            started = time.thread_time()
            rgb = decode_image(data, min_size=size).rgb
            detections, _ = stage.predict([rgb])
            cpu[way] += time.thread_time() - started
            top = detections[0]
            answers[way] = (int(top.class_id[0]), float(top.confidence[0]), rgb.shape[1::-1])
        (full_class, full_score, full_size), (red_class, red_score, red_size) = (
            answers["full"],
            answers["reduced"],
        )
        rows.append(
            {
                "name": name,
                "reduced": red_size != full_size,
                "factor": reduction_factor(full_size, min_size),
                "same_class": full_class == red_class,
                "same_band": _band(full_score) == _band(red_score),
                "score_diff": abs(full_score - red_score),
                "full_accepts": full_score >= ACCEPT,
                "new_accept": red_score >= ACCEPT and full_score < ACCEPT,
                "same_accept": full_score >= ACCEPT and red_score >= ACCEPT and full_class == red_class,
            }
        )
    reduced = [r for r in rows if r["reduced"]]
    diffs = np.array([r["score_diff"] for r in reduced]) if reduced else np.zeros(1)
    return {
        "images": len(rows),
        "reduced": len(reduced),
        "same_class": sum(r["same_class"] for r in reduced),
        "same_band": sum(r["same_band"] for r in reduced),
        "full_accepts": sum(r["full_accepts"] for r in reduced),
        "same_accept": sum(r["same_accept"] for r in reduced),
        "new_accepts": sum(r["new_accept"] for r in reduced),
        "score_diff_median": float(np.median(diffs)),
        "score_diff_p95": float(np.percentile(diffs, 95)),
        "score_diff_max": float(diffs.max()),
        "cpu_ms_full": cpu["full"] * 1000 / len(rows),
        "cpu_ms_reduced": cpu["reduced"] * 1000 / len(rows),
        "disagreements": [r["name"] for r in reduced if not (r["same_class"] and r["same_band"])],
    }


def main(argv: list[str] | None = None) -> None:
    from cascades.onnx_stage import OnnxStage, OnnxStageConfig
    from evals.benchmarks.serve import _min_size, bench_photos
    from visionroute import paths

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default=str(paths.models_dir()))
    args = parser.parse_args(argv)
    stage = OnnxStage(
        OnnxStageConfig(model="efficientnet_lite0", intra_op_threads=1), models_dir=Path(args.models_dir)
    )
    min_size = _min_size(stage)
    for label, images in (("bench photos", bench_photos()), ("generated", generated_set())):
        result = compare(stage, images, min_size)
        print(
            f"{label}: {result['images']} images, {result['reduced']} decoded reduced; of those, same top-1 "
            f"class {result['same_class']}/{result['reduced']}, same decision band {result['same_band']}/"
            f"{result['reduced']}; of the full decode's accepts, the same accept {result['same_accept']}/"
            f"{result['full_accepts']}, accepts the full decode did not make {result['new_accepts']}; |top-1 score difference| median {result['score_diff_median']:.4f}, "
            f"p95 {result['score_diff_p95']:.4f}, max {result['score_diff_max']:.4f}; decode + inference CPU "
            f"per image {result['cpu_ms_full']:.1f} ms full, {result['cpu_ms_reduced']:.1f} ms reduced "
            f"(load {os.getloadavg()[0]:.1f})"
        )
        if result["disagreements"]:
            print(f"  differ: {', '.join(result['disagreements'])}")


if __name__ == "__main__":
    main()
