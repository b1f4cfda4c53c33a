"""``visionroute bench privacy``: the face detector's recall and false positives, and what
redaction adds to a review enqueue.

1. Faces: scikit-image's ``lfw_subset`` (100 faces, then 100 non-faces, 25x25 grey crops)
   upscaled (bicubic) to each ``--sizes`` square. MTCNN is made for faces of 20 px and more
   (its P-Net scans 12 px windows over a pyramid that starts at 12/min_face_size) and
   facenet-pytorch crops aligned faces at 160x160, so 160 is the size reported first; 48 is
   the O-Net's own input. Found = at least one face at MTCNN probability >=
   ``--min-confidence``; a false positive = a face on a non-face crop.
2. The astronaut photo (one face): faces found, boxes, confidence.
3. Latency per image, in one run: the plain enqueue (what is stored when privacy keeps
   everything: the file as sent) against redact-then-enqueue with faces blurred, text
   blurred, and both; the median of ``--repeats`` over each bundled photo. Redaction runs
   only for stored images (review and audit items), never on the accept path.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

PHOTOS = ("astronaut", "coffee", "page")
POLICIES = {
    "plain (faces: keep, text: keep)": {"faces": "keep", "text": "keep"},
    "faces: blur": {"faces": "blur", "text": "keep"},
    "text: blur": {"faces": "keep", "text": "blur"},
    "faces + text: blur": {"faces": "blur", "text": "blur"},
}


def lfw_detection(sizes: list[int], min_confidence: float) -> list[dict[str, Any]]:
    import cv2
    from skimage import data

    from cascades.detectors_privacy import face_detector

    detector = face_detector("mtcnn", min_confidence=min_confidence)
    crops = (data.lfw_subset() * 255).round().astype(np.uint8)
    faces, non_faces = crops[:100], crops[100:]
    rows = []
    for size in sizes:
        started = time.perf_counter()
        found = []
        for crop in crops:
            rgb = cv2.resize(np.stack([crop] * 3, axis=-1), (size, size), interpolation=cv2.INTER_CUBIC)
            found.append(len(detector.detect(rgb)) > 0)
        found = np.array(found)
        rows.append(
            {
                "size": size,
                "faces_found": int(found[: len(faces)].sum()),
                "faces": len(faces),
                "false_positives": int(found[len(faces) :].sum()),
                "non_faces": len(non_faces),
                "ms_per_image": (time.perf_counter() - started) * 1000.0 / len(crops),
            }
        )
    return rows


def astronaut_faces(min_confidence: float) -> dict[str, Any]:
    from skimage import data

    from cascades.detectors_privacy import face_detector

    detector = face_detector("mtcnn", min_confidence=min_confidence)
    detections = detector.detect(data.astronaut())
    return {
        "faces": len(detections),
        "boxes_xyxy": np.round(detections.xyxy).astype(int).tolist(),
        "confidence": [round(float(c), 4) for c in detections.confidence],
        "detector_version": detector.version,
    }


def _png(name: str) -> bytes:
    import io

    from PIL import Image
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(image[..., :3]).save(buffer, format="PNG")
    return buffer.getvalue()


def enqueue_latency(models_dir: Path, repeats: int) -> list[dict[str, Any]]:
    from cascades.image_redaction import Redactor
    from cascades.images import decode_image
    from policies.privacy import PrivacyPolicy
    from policies.review_queue import ReviewQueue

    redactor = Redactor(models_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        queue = ReviewQueue(Path(tmp) / "review")
        for name in PHOTOS:
            data = _png(name)
            sha = hashlib.sha256(data).hexdigest()
            rgb = decode_image(data).rgb
            for label, rule in POLICIES.items():
                policy = PrivacyPolicy(**rule)
                redactor.prepare(data, rgb, policy, "bench")  # warm: detectors load once
                redact_ms, total_ms, regions = [], [], 0
                detect_ms: dict[str, list[float]] = {"faces": [], "text": []}
                for _ in range(repeats):
                    started = time.perf_counter()
                    stored = redactor.prepare(data, rgb, policy, "bench")
                    redacted = time.perf_counter()
                    queue.enqueue(
                        request_id=uuid.uuid4().hex,
                        image_bytes=stored.data,
                        image_sha256=sha,
                        tenant="bench",
                        task="classify",
                        reason="bench",
                        proposed=[],
                        trace={"steps": [stored.step.to_dict()]},
                    )
                    done = time.perf_counter()
                    redact_ms.append((redacted - started) * 1000.0)
                    total_ms.append((done - started) * 1000.0)
                    details = stored.step.details
                    regions = sum(details.get(kind, {}).get("count", 0) for kind in ("faces", "text"))
                    for kind in detect_ms:
                        detect_ms[kind].append(details.get(kind, {}).get("latency_ms", 0.0))
                rows.append(
                    {
                        "photo": name,
                        "policy": label,
                        "regions": regions,
                        "redact_ms": statistics.median(redact_ms),
                        "faces_detect_ms": statistics.median(detect_ms["faces"]),
                        "text_detect_ms": statistics.median(detect_ms["text"]),
                        "enqueue_total_ms": statistics.median(total_ms),
                        "stored_bytes": len(stored.data),
                        "file_bytes": len(data),
                    }
                )
        queue.close()
    return rows


def run(args) -> int:
    from cascades.models import TEXT_DETECTOR_NAME, prepare_models

    sizes = [int(s) for s in args.sizes.split(",")]
    lfw = lfw_detection(sizes, args.min_confidence)
    astronaut = astronaut_faces(args.min_confidence)
    models_dir = Path(args.models_dir).expanduser()
    prepare_models(models_dir, [TEXT_DETECTOR_NAME])  # a no-op when already prepared
    latency = enqueue_latency(models_dir, args.repeats)

    print(f"face detector: MTCNN ({astronaut['detector_version']}), probability >= {args.min_confidence}")
    print("lfw_subset (skimage): 100 faces + 100 non-faces, 25x25 grey, upscaled bicubic")
    print(f"{'size':>6} {'faces found':>12} {'false positives':>16} {'ms/image':>9}")
    for row in lfw:
        print(
            f"{row['size']:>4}px {row['faces_found']:>7}/{row['faces']:<4} {row['false_positives']:>10}/{row['non_faces']:<5}"
            f" {row['ms_per_image']:>9.1f}"
        )
    print(
        f"astronaut: {astronaut['faces']} face(s) {astronaut['boxes_xyxy']} confidence {astronaut['confidence']}"
    )
    print(f"\nredaction before a review enqueue (median of {args.repeats}; plain = the baseline, same run)")
    print(
        f"{'photo':<10} {'policy':<32} {'regions':>7} {'faces ms':>9} {'text ms':>8} {'redact ms':>10}"
        f" {'enqueue ms':>11} {'vs plain':>9} {'stored KB':>10}"
    )
    for photo in PHOTOS:
        rows = [r for r in latency if r["photo"] == photo]
        plain = rows[0]["enqueue_total_ms"]
        for row in rows:
            print(
                f"{photo:<10} {row['policy']:<32} {row['regions']:>7} {row['faces_detect_ms']:>9.1f}"
                f" {row['text_detect_ms']:>8.1f} {row['redact_ms']:>10.1f} {row['enqueue_total_ms']:>11.1f}"
                f" {row['enqueue_total_ms'] / plain:>8.1f}x {row['stored_bytes'] / 1024:>10.0f}"
            )
    print("redact ms = detectors + redaction + re-encoding (PNG); enqueue ms = redact + the durable enqueue")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"lfw": lfw, "astronaut": astronaut, "latency": latency}, indent=2)
        )
    return 0
