"""``visionroute bench serve``: the HTTP path through Ray Serve against raw ONNX Runtime.

One run, same images, same machine:
1. raw: the classify stage in this process (ONNX Runtime + pre/post-processing), one image
   at a time (p50/p95) and in batches of 8 (images/s); also with PNG decoding included;
2. HTTP: the real app (``router.app:build_app``) on Ray Serve, for each tier placement (its own
   deployment, or inside the ingress), sequential requests (p50/p95)
   and 8 concurrent clients (requests/s), Serve batching the classifier.
Prints both and their ratios against the issue's targets.
"""

from __future__ import annotations

import io
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PHOTOS = (
    "coffee",
    "chelsea",
    "camera",
    "rocket",
    "astronaut",
    "immunohistochemistry",
    "motorcycle_left",
    "cat",
)


def bench_photos() -> dict[str, bytes]:
    from PIL import Image
    from skimage import data

    photos = {}
    for name in PHOTOS:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        image = loader()
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        image = image[..., :3]
        if isinstance(image, tuple):
            continue
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=90)
        photos[name] = buffer.getvalue()
    return photos


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure_raw(stage, photos: dict[str, bytes], requests: int) -> dict[str, float]:
    from cascades.images import decode_image

    decoded = [decode_image(data).rgb for data in photos.values()]
    encoded = list(photos.values())
    for image in decoded:  # warm-up
        stage.predict([image])
    onnx_ms, full_ms = [], []
    for n in range(requests):
        image_bytes = encoded[n % len(encoded)]
        started = time.perf_counter()
        rgb = decode_image(image_bytes).rgb
        after_decode = time.perf_counter()
        stage.predict([rgb])
        done = time.perf_counter()
        onnx_ms.append((done - after_decode) * 1000)
        full_ms.append((done - started) * 1000)
    batch = (decoded * 2)[:8]
    started, images = time.perf_counter(), 0
    while time.perf_counter() - started < 5.0:
        stage.predict(batch)
        images += len(batch)
    return {
        "onnx_p50_ms": percentile(onnx_ms, 50),
        "onnx_p95_ms": percentile(onnx_ms, 95),
        "decode_onnx_p50_ms": percentile(full_ms, 50),
        "batched_images_per_s": images / (time.perf_counter() - started),
    }


def measure_http(url: str, photos: dict[str, bytes], requests: int, clients: int) -> dict[str, float]:
    import httpx

    encoded = list(photos.items())
    decisions: dict[str, int] = {}
    lock = threading.Lock()

    def post(client: httpx.Client, n: int) -> float:
        name, data = encoded[n % len(encoded)]
        started = time.perf_counter()
        response = client.post(url + "/v1/analyze", files={"image": (f"{name}.jpg", data, "image/jpeg")})
        elapsed = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        with lock:
            decision = response.json()["decision"]
            decisions[decision] = decisions.get(decision, 0) + 1
        return elapsed

    with httpx.Client(timeout=60) as client:
        for n in range(len(encoded)):  # warm-up
            post(client, n)
        sequential = [post(client, n) for n in range(requests)]

    per_client = max(1, requests // clients) * 2
    local = threading.local()

    def worker(n: int) -> float:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=60)
        return post(local.client, n)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients * 2)))  # open the connections
        started = time.perf_counter()
        concurrent = list(pool.map(worker, range(per_client * clients)))
        elapsed = time.perf_counter() - started
    return {
        "http_p50_ms": percentile(sequential, 50),
        "http_p95_ms": percentile(sequential, 95),
        "concurrent_p50_ms": percentile(concurrent, 50),
        "concurrent_requests_per_s": len(concurrent) / elapsed,
        "decisions": decisions,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_bench(
    models_dir: Path,
    requests: int = 200,
    clients: int = 8,
    max_batch_size: int = 8,
    placements: tuple[str, ...] = ("deployment", "ingress"),
) -> dict:
    import ray
    from ray import serve

    from cascades.models import prepare_models
    from cascades.onnx_stage import OnnxStage, OnnxStageConfig
    from router.app import build_app

    prepare_models(models_dir, ["efficientnet_lite0", "ppocr_det"])
    photos = bench_photos()
    print(
        f"images: {len(photos)} skimage photos as JPEG ({', '.join(photos)}); {requests} requests per phase"
    )
    stage = OnnxStage(OnnxStageConfig(model="efficientnet_lite0"), models_dir=models_dir)
    raw = measure_raw(stage, photos, requests)
    del stage
    print(
        f"raw ONNX Runtime (in-process): p50 {raw['onnx_p50_ms']:.1f} ms, p95 {raw['onnx_p95_ms']:.1f} ms; "
        f"with JPEG decode p50 {raw['decode_onnx_p50_ms']:.1f} ms; batched x8 {raw['batched_images_per_s']:.1f} images/s"
    )
    results = {"raw": raw}
    for placement in placements:
        with tempfile.TemporaryDirectory() as tmp:
            port = _free_port()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                app = build_app(
                    {
                        "models_dir": str(models_dir),
                        "review": {"path": str(Path(tmp) / "review")},
                        "retrieval": {"enabled": False},  # search is measured by `bench retrieval`
                        "cascades": {
                            "classify": {
                                "tier": {"model": "efficientnet_lite0"},
                                "placement": placement,
                                "max_batch_size": max_batch_size,
                                "batch_wait_timeout_ms": 2,
                            }
                        },
                    }
                )
                serve.run(app, name="bench", route_prefix="/", blocking=False)
                http = measure_http(f"http://127.0.0.1:{port}", photos, requests, clients)
            finally:
                serve.shutdown()
                ray.shutdown()
        overhead = http["http_p50_ms"] - raw["onnx_p50_ms"]
        ratio = http["concurrent_requests_per_s"] / raw["batched_images_per_s"]
        print(
            f"HTTP via Ray Serve, tier placement {placement!r}: sequential p50 {http['http_p50_ms']:.1f} ms, "
            f"p95 {http['http_p95_ms']:.1f} ms; {clients} clients {http['concurrent_requests_per_s']:.1f} req/s "
            f"(p50 {http['concurrent_p50_ms']:.1f} ms); decisions {http['decisions']}"
        )
        print(
            f"  HTTP p50 - raw p50 = {overhead:.1f} ms (target <= 15 ms: {'met' if overhead <= 15 else 'NOT met'}); "
            f"{clients}-client throughput / raw batched = {ratio:.2f} (target >= 0.7: {'met' if ratio >= 0.7 else 'NOT met'})"
        )
        results[placement] = {"http": http, "overhead_ms": overhead, "throughput_ratio": ratio}
    return results
