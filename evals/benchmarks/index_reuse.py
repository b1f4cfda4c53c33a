"""What indexing an analysed image costs the search replica, in process: ``SearchService.
index_analyses`` per image with the classify tier's class probabilities reused (the shipped
config: the tier and ConSE run the same file the same way) against embedding the pixels again
(what every indexed image cost before, and still costs when the tier is another model):

    python -m evals.benchmarks.index_reuse [ROUNDS]

Each round indexes the bundled photos one at a time (a sequential client's batches) and eight at
a time (a loaded replica's); prints the median per image and the 1-minute load average.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "horse", "camera", "coins", "moon")


def photos() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in PHOTOS:
        image = getattr(data, name)()
        image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
        out.append(np.ascontiguousarray(image, np.uint8))
    return out


def run(rounds: int = 5) -> dict[str, float]:
    from cascades.onnx_stage import OnnxStage, OnnxStageConfig
    from retrieval.config import RetrievalConfig
    from retrieval.service import SearchService
    from visionroute.records import Analysis

    images = photos()
    answers, _ = OnnxStage(OnnxStageConfig(model="efficientnet_lite0")).predict(images)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        with SearchService(RetrievalConfig(index_dir=Path(tmp), index_analysed=True)) as service:
            for batch in (1, 8):
                for reuse in (True, False):
                    per_image = []
                    for round_ in range(rounds):
                        analyses = [
                            Analysis(
                                image_rgb=image,
                                image_sha256=hashlib.sha256(
                                    f"{i}:{batch}:{reuse}:{round_}".encode()
                                ).hexdigest(),
                                task="classify",
                                detections=found
                                if reuse
                                else dataclasses.replace(found, class_probabilities=None),
                            )
                            for i, (image, found) in enumerate(zip(images, answers))
                        ]
                        for start in range(0, len(analyses), batch):
                            started = time.perf_counter()
                            service.index_analyses(analyses[start : start + batch])
                            per_image.append((time.perf_counter() - started) * 1000.0 / batch)
                    key = f"batch {batch}, {'probabilities reused' if reuse else 'embedded from pixels'}"
                    results[key] = statistics.median(per_image)
                    print(f"{key}: median {results[key]:.2f} ms per image; load {os.getloadavg()[0]:.1f}")
    return results


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
