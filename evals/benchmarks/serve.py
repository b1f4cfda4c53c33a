"""``visionroute bench serve``: our service against a Ray Serve floor and raw ONNX Runtime.

One run, same images, same machine, one Ray cluster (``num_cpus=2``):
1. raw: the classify stage in this process (ONNX Runtime + pre/post-processing), one image
   at a time (p50/p95/p99) and in batches of 8 (images/s);
2. floor: a minimal Ray Serve app (one deployment, ``serve.batch``) that reads the JPEG body,
   decodes it the way the service does and makes the same ONNX Runtime call, nothing else (HTTP);
3. ours: the real app (``router.app:build_app``) for each classifier placement (inside the
   ingress, its own deployment) with search indexing off and on (the shipped config), over
   HTTP and gRPC: sequential p50 (the overhead targets), then p50/p95/p99 and throughput under
   ``clients`` concurrent clients, and a per-stage breakdown: the p50 of each trace step's
   ``latency_ms`` plus the measured remainder (transport: proxy, hops, parsing, the rest),
   so the parts sum to the total's p50;
4. the batch API (``batch_images`` > 0): POST /v1/analyze/batch with that many images per
   request from ``clients`` clients over HTTP, its images/s against the single-image API's
   requests/s measured just before on the same service (target >= 2x);
5. the learned router (``routers`` holds True, issue 22): the classify cascade served with a
   router artefact fitted for it (``classify_router``: every feature block, cached under the
   work dir), beside the same service without one; the ``router`` stage's p50 from the
   breakdown and the cheap path's p50 and throughput, off and on (target: the stage adds
   <= 2 ms at p50).
Every ratio is against figures measured in this run; the machine may be shared and noisy.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from evals.benchmarks.serve_median import shipped_key

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
APP_NAME = "bench"


def bench_photos() -> dict[str, bytes]:
    from PIL import Image
    from skimage import data

    photos = {}
    for name in PHOTOS:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        image = loader()
        if isinstance(image, tuple):
            continue
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        image = image[..., :3]
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=90)
        photos[name] = buffer.getvalue()
    return photos


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def summary(latencies_ms: list[float]) -> dict[str, float]:
    return {f"p{q}_ms": percentile(latencies_ms, q) for q in (50, 95, 99)}


def _min_size(stage, jpeg_at_model_size: bool = True) -> tuple[int, int] | None:
    """The size the floor and raw decode at: the model's input (a JPEG twice that or more is
    DCT-scaled, as the service does with ``limits.decode.jpeg_at_model_size``), or None: whole."""
    size_hw = stage.describe().get("input_hw")
    return (int(size_hw[1]), int(size_hw[0])) if size_hw and jpeg_at_model_size else None


def shipped_jpeg_at_model_size(redaction: bool = False) -> bool:
    """Whether the service DCT-scales the bench's JPEGs: ``limits.decode.jpeg_at_model_size`` as
    serve_config.yaml ships it (or its default), and not where its privacy rule redacts (bench
    ``redaction`` on: the policy as configured; off: faces and text kept)."""
    import yaml

    from cascades.decode_budget import DecodeBudgetConfig
    from policies.privacy import PrivacyPolicy

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    decode = DecodeBudgetConfig(**((args.get("limits") or {}).get("decode") or {}))
    privacy = PrivacyPolicy(**((args.get("policies") or {}).get("privacy") or {}))
    return decode.jpeg_at_model_size and not (redaction and privacy.for_tenant("default").redacts)


def measure_raw(
    stage, photos: dict[str, bytes], requests: int, batch_s: float, redaction: bool = False
) -> dict[str, float]:
    from cascades.images import decode_image

    min_size = _min_size(stage, shipped_jpeg_at_model_size(redaction))
    decoded = [decode_image(data, min_size=min_size).rgb for data in photos.values()]
    for image in decoded:  # warm-up
        stage.predict([image])
    onnx_ms = []
    for n in range(requests):
        started = time.perf_counter()
        stage.predict([decoded[n % len(decoded)]])
        onnx_ms.append((time.perf_counter() - started) * 1000)
    batch = (decoded * 2)[:8]
    started, images = time.perf_counter(), 0
    while time.perf_counter() - started < batch_s:
        stage.predict(batch)
        images += len(batch)
    return {**summary(onnx_ms), "batched_images_per_s": images / (time.perf_counter() - started)}


# -- the floor: the same ONNX Runtime call behind Ray Serve, nothing else ------------------------


# graceful_shutdown_wait_loop_s: the replica's idle check before it stops (2 s by default) is all
# the wait its delete has: every request has been answered by then.
@serve.deployment(
    name="Floor",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.5},
    graceful_shutdown_wait_loop_s=0.1,
)
class Floor:
    """Reads the JPEG body, decodes it as the service does, batches, runs the same stage."""

    def __init__(
        self,
        models_dir: str,
        max_batch_size: int,
        intra_op_threads: int,
        thread_spinning: bool,
        reduced_decode: bool = True,
    ) -> None:
        from cascades.onnx_stage import OnnxStage, OnnxStageConfig

        self.stage = OnnxStage(
            OnnxStageConfig(
                model="efficientnet_lite0", intra_op_threads=intra_op_threads, thread_spinning=thread_spinning
            ),
            models_dir=Path(models_dir),
        )
        self.min_size = _min_size(self.stage, reduced_decode)  # as the service decodes
        self.predict.set_max_batch_size(max_batch_size)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def predict(self, images: list[np.ndarray]) -> list[Any]:
        detections, _ = await asyncio.to_thread(self.stage.predict, images)
        return detections

    async def __call__(self, request) -> dict[str, Any]:
        from cascades.images import decode_image

        rgb = decode_image(await request.body(), min_size=self.min_size).rgb
        detections = await self.predict(rgb)
        return {"answer": detections.to_dicts()[:1]}


# -- clients ----------------------------------------------------------------------------------


def _steps_ms(body: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for step in (body.get("trace") or {}).get("steps", []):
        stage = "onnx" if step["stage"].startswith("onnx:") else step["stage"]
        out[stage] = out.get(stage, 0.0) + float(step.get("latency_ms") or 0.0)
    return out


class Face:
    """One way in (HTTP multipart, HTTP raw body for the floor, gRPC): ``call(image) -> (ms, body)``."""

    def __init__(self, kind: str, url: str, grpc_target: str | None = None) -> None:
        self.kind, self.url, self.grpc_target = kind, url, grpc_target
        self.local = threading.local()

    def _client(self):
        if not hasattr(self.local, "client"):
            if self.kind == "grpc":
                import grpc

                from router.grpc.ingress import visionroute_pb2_grpc

                channel = grpc.insecure_channel(self.grpc_target)
                grpc.channel_ready_future(channel).result(timeout=60)
                self.local.client = visionroute_pb2_grpc.VisionRouteStub(channel)
            else:
                import httpx

                self.local.client = httpx.Client(timeout=60, trust_env=False)
        return self.local.client

    def call(self, name: str, data: bytes) -> tuple[float, dict[str, Any]]:
        client = self._client()
        if self.kind == "grpc":
            from router.grpc.ingress import pb

            started = time.perf_counter()
            reply = client.Analyze(
                pb.AnalyzeRequest(image=data), metadata=[("application", APP_NAME)], timeout=60
            )
            elapsed = (time.perf_counter() - started) * 1000
            body = {
                "decision": reply.decision,
                "trace": json.loads(reply.trace_json) if reply.trace_json else {},
            }
            return elapsed, body
        started = time.perf_counter()
        if self.kind == "floor":
            response = client.post(self.url + "/", content=data, headers={"content-type": "image/jpeg"})
        else:
            response = client.post(
                self.url + "/v1/analyze", files={"image": (f"{name}.jpg", data, "image/jpeg")}
            )
        elapsed = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        body = response.json()
        server_ms = response.headers.get("server-timing", "")
        if "app;dur=" in server_ms:
            body["server_ms"] = float(server_ms.split("app;dur=")[1].split(",")[0])
        return elapsed, body


def measure_batch(
    url: str, photos: dict[str, bytes], requests: int, clients: int, batch_images: int
) -> dict[str, Any]:
    """Per-image throughput of POST /v1/analyze/batch: ``batch_images`` images per request from
    ``clients`` clients (one connection each), over at least ``requests`` images."""
    import httpx

    encoded = list(photos.items())
    local = threading.local()

    def one(n: int) -> tuple[float, int, int]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120, trust_env=False)
        files = [
            ("image", (f"{name}.jpg", data, "image/jpeg"))
            for name, data in (encoded[(n * batch_images + i) % len(encoded)] for i in range(batch_images))
        ]
        started = time.perf_counter()
        response = local.client.post(url + "/v1/analyze/batch", files=files)
        elapsed = (time.perf_counter() - started) * 1000
        response.raise_for_status()
        body = response.json()
        return elapsed, body["succeeded"], body["failed"]

    rounds = max(clients * 2, -(-requests // batch_images))
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))  # warm-up: open the connections
        started = time.perf_counter()
        done = list(pool.map(one, range(rounds)))
        elapsed = time.perf_counter() - started
    images = sum(ok + failed for _, ok, failed in done)
    return {
        "images_per_request": batch_images,
        "requests": rounds,
        "images_per_s": images / elapsed,
        "request_p50_ms": percentile([ms for ms, _, _ in done], 50),
        "failed_images": sum(failed for _, _, failed in done),
    }


def breakdown(samples: list[tuple[float, dict[str, Any]]]) -> dict[str, float]:
    """p50 of each trace step's latency; the remainder of the total's p50 is transport."""
    stages: dict[str, list[float]] = {}
    for _, body in samples:
        steps = _steps_ms(body)
        for stage, ms in steps.items():
            stages.setdefault(stage, []).append(ms)
        if "server_ms" in body:
            stages.setdefault("ingress other (parse, budget, trace, JSON)", []).append(
                max(0.0, body["server_ms"] - sum(steps.values()))
            )
    total = percentile([ms for ms, _ in samples], 50)
    parts = {stage: percentile(values, 50) for stage, values in stages.items()}
    parts["transport (proxy, hops, client; remainder)"] = total - sum(parts.values())
    return {"total_p50_ms": total, **parts}


def measure(
    face: Face, photos: dict[str, bytes], requests: int, clients: int, warmup: int | None = None
) -> dict[str, Any]:
    """``warmup``: requests before the measured ones (default: one per photo)."""
    encoded = list(photos.items())
    decisions: dict[str, int] = {}
    lock = threading.Lock()

    def one(n: int) -> tuple[float, dict[str, Any]]:
        name, data = encoded[n % len(encoded)]
        elapsed, body = face.call(name, data)
        with lock:
            decision = str(body.get("decision", "answered"))
            decisions[decision] = decisions.get(decision, 0) + 1
        return elapsed, body

    for n in range(len(encoded) if warmup is None else warmup):  # warm-up
        one(n)
    sequential = [one(n) for n in range(requests)]
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients * 2)))  # open the connections
        started = time.perf_counter()
        loaded = list(pool.map(one, range(max(requests, clients * 4))))
        elapsed = time.perf_counter() - started
    return {
        "sequential": summary([ms for ms, _ in sequential]),
        "loaded": summary([ms for ms, _ in loaded]),
        "requests_per_s": len(loaded) / elapsed,
        "breakdown": breakdown(sequential),
        "decisions": decisions,
        **cheap_path(sequential),
    }


def cheap_path(samples: list[tuple[float, dict[str, Any]]]) -> dict[str, Any]:
    """The accepted requests' p50 (the cheap path alone), and with a learned router the p50 of
    its features' own time (``pricing.features_ms``: the compute, without the thread hop the
    ``router`` step's latency also holds)."""
    accepted = [ms for ms, body in samples if body.get("decision") == "accept"]
    features_ms = [
        float(step["details"]["pricing"]["features_ms"])
        for _, body in samples
        for step in (body.get("trace") or {}).get("steps", [])
        if step.get("stage") == "router"
        and "features_ms" in ((step.get("details") or {}).get("pricing") or {})
    ]
    out: dict[str, Any] = {"accept_p50_ms": percentile(accepted, 50), "accepted": len(accepted)}
    if features_ms:
        out["router_features_p50_ms"] = percentile(features_ms, 50)
    cpu_ms = [  # the features' CPU time: their own work, without waits for a core (router_stage.scored)
        float(step["details"]["pricing"]["features_cpu_ms"])
        for _, body in samples
        for step in (body.get("trace") or {}).get("steps", [])
        if step.get("stage") == "router"
        and ((step.get("details") or {}).get("pricing") or {}).get("features_cpu_ms") is not None
    ]
    if cpu_ms:
        out["router_features_cpu_p50_ms"] = percentile(cpu_ms, 50)
    return out


# -- the learned router for the classify cascade (latency only) --------------------------------

ROUTER_ITEMS = 240


def _variants(photos: dict[str, bytes], n: int, seed: int) -> list[np.ndarray]:
    """``n`` uploads from the bench photos: random crops, flips and brightness (RGB uint8)."""
    from cascades.images import decode_image

    rng = np.random.default_rng(seed)
    decoded = [decode_image(data).rgb for data in photos.values()]
    images = []
    for k in range(n):
        image = decoded[k % len(decoded)]
        height, width = image.shape[:2]
        crop_h, crop_w = (int(d * rng.uniform(0.5, 1.0)) for d in (height, width))
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        crop = image[top : top + crop_h, left : left + crop_w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.clip(crop.astype(np.float32) * rng.uniform(0.6, 1.3), 0, 255).astype(np.uint8)
        images.append(np.ascontiguousarray(crop))
    return images


def classify_router(
    models_dir: Path, work_dir: Path, photos: dict[str, bytes], n: int = ROUTER_ITEMS, seed: int = 0
) -> tuple[Path, Path]:
    """(router artefact, tier calibration) for the shipped classify tier, fitted with
    ``calibrate_router`` and cached under ``work_dir``.

    For the stage's cost only: the skimage photos have no ImageNet labels, so the labels are
    the tier's own answers flipped more often where it is unsure and the VLM is simulated (right
    90% of the time), as tests/support/router_artefact.py does. Its features, learner and
    reference index are the served ones (output, input statistics, 64-d pixel neighbours of
    the fit share), which is what the stage's latency depends on; its plans certify nothing
    about these photos' real classes."""
    from scipy.special import softmax

    from cascades.onnx_stage import OnnxStage, OnnxStageConfig
    from cascades.router_calibration import RouterData, calibrate_router
    from cascades.router_features import EMBEDDING_VERSION, INPUT_VERSION
    from policies.certify import split_indices
    from policies.risk_control import TierCosts

    # the input block's definition is in the name: a router cached by an older build (input
    # version 1, the full-resolution statistics) would still serve, and time the old features
    tag = f"n{n}-s{seed}-a0.3-in{INPUT_VERSION}-emb{EMBEDDING_VERSION}"
    router_path = Path(work_dir) / f"classify-router-{tag}.json"
    calibration_path = Path(work_dir) / f"classify-calibration-{tag}.json"
    if router_path.is_file() and calibration_path.is_file():
        return router_path, calibration_path
    stage = OnnxStage(OnnxStageConfig(model="efficientnet_lite0"), models_dir=models_dir)
    labels = tuple(stage.decoder.labels)
    images = _variants(photos, n, seed)
    outputs = [
        np.asarray(
            stage.model.run(np.concatenate([stage.decoder.preprocess(image)[0] for image in chunk]))[0]
        )
        for chunk in (images[start : start + 16] for start in range(0, n, 16))
    ]
    scores = np.concatenate(outputs).astype(np.float64).reshape(n, len(labels))
    probabilities = softmax(scores, axis=1) if stage.decoder.outputs == "logits" else scores
    rng = np.random.default_rng(seed + 1)
    answers = probabilities.argmax(1)
    flipped = rng.random(n) < 0.05 + 0.8 * (1.0 - probabilities.max(1))
    truth = np.where(flipped, (answers + 1 + rng.integers(0, len(labels) - 1, n)) % len(labels), answers)
    vlm_right = rng.random(n) < 0.9
    vlm_answers = np.where(vlm_right, truth, (truth + 1) % len(labels))
    vlm_scores = np.clip(np.where(vlm_right, rng.beta(8, 2, n), rng.beta(2, 4, n)), 0, 1)
    data = RouterData(labels, probabilities, truth, vlm_answers, vlm_scores, images, "bench-serve-photos")
    splits = split_indices(n, seed=seed, calibration_fraction=0.5)
    result = calibrate_router(
        data,
        splits.fit,
        splits.certify,
        splits.test,
        alpha=0.3,  # a plan that accepts most of these photos: the cheap path, as without a router
        delta=0.1,
        costs=TierCosts(cheap=1, escalate=10, review=100),
        seed=seed,
    )
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    result.calibrator.save(calibration_path)
    result.artefact.save(router_path)
    return router_path, calibration_path


def _router_lines(results: dict[str, Any]) -> list[str]:
    """The router stage's p50 and the cheap path with the router off and on (same run)."""
    lines = []
    for key, entry in results["service"].items():
        if not key.endswith("/router on"):
            continue
        off = results["service"].get(key[: -len("/router on")], {})
        for face in ("http", "grpc"):
            if face not in entry:
                continue
            on_face = entry[face]
            stage_ms = on_face["breakdown"].get("router", float("nan"))
            text = f"  {key}, {face.upper()}: router stage p50 {stage_ms:.2f} ms (<= 2: " + (
                "met)" if stage_ms <= 2.0 else "NOT met)"
            )
            text += (
                f", its features' own time p50 {on_face.get('router_features_p50_ms', float('nan')):.2f} ms"
                f" (CPU {on_face.get('router_features_cpu_p50_ms', float('nan')):.2f} ms)"
            )
            if face in off:
                seq_off, seq_on = off[face]["accept_p50_ms"], on_face["accept_p50_ms"]
                text += (
                    f"; cheap path (accepted) p50 off/on {seq_off:.1f}/{seq_on:.1f} ms ({seq_on - seq_off:+.1f}; "
                    f"{off[face]['accepted']}/{on_face['accepted']} accepted), "
                    f"throughput off/on {off[face]['requests_per_s']:.1f}/{on_face['requests_per_s']:.1f} req/s"
                )
            lines.append(text + "; load average now {:.1f}, {:.1f}, {:.1f}".format(*os.getloadavg()))
    return lines


# -- the run ----------------------------------------------------------------------------------


def shipped_thread_spinning() -> bool:
    """The classify tier's ``thread_spinning`` as serve_config.yaml ships it (or its default)."""
    import yaml

    from cascades.onnx_stage import OnnxStageConfig

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "serve_config.yaml").read_text())
    return OnnxStageConfig(
        **config["applications"][0]["args"]["cascades"]["classify"]["tier"]
    ).thread_spinning


def service_args(
    models_dir: Path,
    workdir: Path,
    placement: str,
    indexing: bool,
    max_batch_size: int,
    intra_op_threads: int | None,
    redaction: bool = False,
    router: tuple[Path, Path] | None = None,
) -> dict[str, Any]:
    """The shipped serve_config.yaml's args with the bench's placement and indexing, and with
    ``router`` (artefact, tier calibration) the classify cascade's learned router.

    ``redaction`` False keeps faces and text in stored review images (privacy ``keep``): the
    targets are about the cheap path, and the face and text detectors on the review path are
    measured by ``visionroute bench privacy``."""
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    args["models_dir"] = str(models_dir)
    args["review"] = {**args.get("review", {}), "path": str(workdir / "review")}
    classify = args["cascades"]["classify"]
    classify.update(placement=placement, max_batch_size=max_batch_size)
    if intra_op_threads is not None:
        classify["tier"]["intra_op_threads"] = intra_op_threads
    if router is not None:  # the router was fitted on this calibration: the tier must serve it
        classify["router"] = {"path": str(router[0])}
        classify["tier"]["calibration"] = str(router[1])
    if not redaction:
        policies = args.setdefault("policies", {})
        policies["privacy"] = {**policies.get("privacy", {}), "faces": "keep", "text": "keep"}
    retrieval = args.setdefault("retrieval", {})
    retrieval["enabled"] = indexing
    retrieval["index_analysed"] = indexing
    if indexing:
        retrieval["index_dir"] = str(workdir / "search")
    return args


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _line(label: str, result: dict[str, Any], raw: dict[str, float], floor: dict[str, Any] | None) -> str:
    seq, loaded = result["sequential"], result["loaded"]
    text = (
        f"{label:<44} seq p50 {seq['p50_ms']:6.1f} ms (over raw {seq['p50_ms'] - raw['p50_ms']:+6.1f})"
        f" | loaded p50/p95/p99 {loaded['p50_ms']:6.1f}/{loaded['p95_ms']:6.1f}/{loaded['p99_ms']:6.1f} ms"
        f" | {result['requests_per_s']:6.1f} req/s ({result['requests_per_s'] / raw['batched_images_per_s']:.2f}x raw batched"
    )
    if floor is not None:
        text += (
            f", {result['requests_per_s'] / floor['requests_per_s']:.2f}x floor; p50 "
            f"{seq['p50_ms'] / floor['sequential']['p50_ms']:.2f}x floor"
        )
    return text + ")"


def _targets(results: dict[str, Any]) -> list[str]:
    raw, floor = results["raw"], results["floor"]
    lines = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for key, entry in results["service"].items():
        batch = entry.get("batch")
        if batch is not None:
            lines.append(
                f"  {key}: batch API per-image throughput / single-image API (HTTP) = {batch['vs_single']:.2f} "
                f"(>= 2: {verdict(batch['vs_single'] >= 2.0)})"
            )
        if key.endswith("indexing on"):  # the targets are the shipped config's (serve_median)
            label = f"{key} (shipped)" if key == shipped_key() else key
            for face in ("http", "grpc"):
                if face in entry:
                    p50_ratio = entry[face]["sequential"]["p50_ms"] / floor["sequential"]["p50_ms"]
                    tput_ratio = entry[face]["requests_per_s"] / floor["requests_per_s"]
                    lines.append(
                        f"  {label}, {face.upper()}: p50 / floor = {p50_ratio:.2f} (<= 1.2: "
                        f"{verdict(p50_ratio <= 1.2)}); throughput / floor = {tput_ratio:.2f} (>= 0.9: "
                        f"{verdict(tput_ratio >= 0.9)})"
                    )
    for placement, limit in (("ingress", 15.0), ("deployment", 20.0)):
        key = f"{placement}/indexing off"
        if key not in results["service"]:
            continue
        http = results["service"][key]["http"]
        over = http["sequential"]["p50_ms"] - raw["p50_ms"]
        p50_ratio = http["sequential"]["p50_ms"] / floor["sequential"]["p50_ms"]
        tput_ratio = http["requests_per_s"] / floor["requests_per_s"]
        lines.append(
            f"  {key}: HTTP p50 - raw p50 = {over:.1f} ms (<= {limit:g}: {verdict(over <= limit)}); "
            f"p50 / floor = {p50_ratio:.2f} (<= 1.3: {verdict(p50_ratio <= 1.3)}); "
            f"throughput / floor = {tput_ratio:.2f} (>= 0.8: {verdict(tput_ratio >= 0.8)})"
        )
        grpc = results["service"][key].get("grpc")
        if grpc is not None:
            grpc_over = grpc["sequential"]["p50_ms"] - raw["p50_ms"]
            lines.append(
                f"  {key}: gRPC p50 overhead {grpc_over:.1f} ms vs HTTP {over:.1f} ms "
                f"(no higher: {verdict(grpc_over <= over)})"
            )
    return lines


# ``quick`` (the smoke run the tests make): what each part is cut to. Every part still runs and
# every figure is still measured (two clients still overlap), on fewer requests, and the service
# is the classify cascade alone: the bench sends nothing else, so the other tasks' replicas
# would only add their start (a process, a model load and its warm-up) to a smoke run. The floor
# and the service start side by side (the floor on its own route prefix) instead of one after the
# other, so the floor is measured while the service may still be starting (quick figures are not
# comparable ones), each face is warmed up by one request, not one per photo, and the run's own
# Ray cluster goes with everything on it (no graceful stop of each app first).
QUICK = {"clients": 2, "batch_images": 4, "batch_s": 0.25, "warmup": 1}
FLOOR_APP, FLOOR_PREFIX = "floor", "/floor"  # quick mode: the floor beside the service


def run_bench(
    models_dir: Path,
    requests: int = 200,
    clients: int = 8,
    max_batch_size: int = 8,
    placements: tuple[str, ...] = ("ingress", "deployment"),
    indexing: tuple[bool, ...] = (False, True),
    faces: tuple[str, ...] = ("http", "grpc"),
    intra_op_threads: int | None = None,
    redaction: bool = False,
    quick: bool = False,
    json_path: Path | None = None,
    batch_images: int = 16,
    routers: tuple[bool, ...] = (False,),
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """``routers``: the classify cascade without (False) and with (True) a learned router, in
    turn; its artefact is cached under ``work_dir`` (default: a temporary folder)."""
    import logging

    import ray

    from cascades.models import prepare_models
    from cascades.onnx_stage import OnnxStage, OnnxStageConfig
    from router.app import build_app

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if quick:  # a smoke run: every part once, few requests (see QUICK)
        requests, placements, indexing = min(requests, 12), placements[:1], indexing[:1]
        clients, batch_images = min(clients, QUICK["clients"]), min(batch_images, QUICK["batch_images"])
    prepare_models(models_dir, ["efficientnet_lite0"] if quick else ["efficientnet_lite0", "ppocr_det"])
    photos = bench_photos()
    print(f"images: {len(photos)} skimage photos as JPEG; {requests} requests per phase, {clients} clients")
    print("all figures from this one run; ratios are the comparable part on a shared machine")
    print(
        "privacy redaction of stored review images: "
        + ("as configured" if redaction else "off (faces/text keep; its cost: `visionroute bench privacy`)")
    )
    # Raw, floor and service on the ONNX Runtime session options serve_config.yaml ships.
    spinning = shipped_thread_spinning()
    stage = OnnxStage(
        OnnxStageConfig(
            model="efficientnet_lite0", intra_op_threads=intra_op_threads or 0, thread_spinning=spinning
        ),
        models_dir=models_dir,
    )
    raw = measure_raw(stage, photos, requests, QUICK["batch_s"] if quick else 5.0, redaction)
    del stage
    print(
        f"raw ONNX Runtime (in-process): p50 {raw['p50_ms']:.1f} ms, p95 {raw['p95_ms']:.1f} ms, "
        f"p99 {raw['p99_ms']:.1f} ms; batched x8 {raw['batched_images_per_s']:.1f} images/s"
    )
    results: dict[str, Any] = {"raw": raw, "service": {}, "load_average": {"start": os.getloadavg()[0]}}
    router_files, scratch = None, None
    if True in routers:
        if work_dir is None:
            scratch = tempfile.TemporaryDirectory()
        started = time.perf_counter()
        router_files = classify_router(models_dir, Path(work_dir or scratch.name), photos)
        print(
            f"learned router for classify: {router_files[0]} ({time.perf_counter() - started:.1f} s; "
            "fitted for the stage's cost only, labels simulated: see classify_router)"
        )
    port, grpc_port = _free_port(), _free_port()
    phases = [(p, i, r) for p in placements for i in indexing for r in routers]
    warmup = QUICK["warmup"] if quick else None

    def service_app(phase: tuple[str, bool, bool], tmp: str):
        placement, index_on, router_on = phase
        args = service_args(
            models_dir,
            Path(tmp),
            placement,
            index_on,
            max_batch_size,
            intra_op_threads,
            redaction,
            router_files if router_on else None,
        )
        if quick:  # the bench only sends classify requests: no replica for the other tasks
            args["cascades"] = {"classify": args["cascades"]["classify"]}
        return build_app(args)

    early = None  # quick mode: the service app's temporary folder, started beside the floor
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            grpc_options={
                "port": grpc_port,
                "grpc_servicer_functions": ["router.grpc.ingress.add_VisionRouteServicer_to_server"],
            },
        )
        url = f"http://127.0.0.1:{port}"
        if quick:  # the (one) service app starts now, beside the floor; awaited before its phase
            early = tempfile.TemporaryDirectory()
            serve._run(service_app(phases[0], early.name), name=APP_NAME, route_prefix="/", _blocking=False)
        serve.run(
            Floor.bind(
                str(models_dir),
                max_batch_size,
                intra_op_threads or 0,
                spinning,
                shipped_jpeg_at_model_size(redaction),
            ),
            name=FLOOR_APP if quick else APP_NAME,
            route_prefix=FLOOR_PREFIX if quick else "/",
        )
        floor = measure(
            Face("floor", url + FLOOR_PREFIX if quick else url), photos, requests, clients, warmup
        )
        if not quick:  # quick: the floor stays beside the service and goes with serve.shutdown
            serve.delete(APP_NAME)
        results["floor"] = floor
        print(_line("floor: minimal Serve app, same ORT call (HTTP)", floor, raw, None))
        for placement, index_on, router_on in phases:
            key = f"{placement}/indexing {'on' if index_on else 'off'}" + ("/router on" if router_on else "")
            with tempfile.TemporaryDirectory() as tmp:
                if early is not None and (placement, index_on, router_on) == phases[0]:
                    serve.context._get_global_client()._wait_for_application_running(APP_NAME)
                else:
                    serve.run(
                        service_app((placement, index_on, router_on), tmp), name=APP_NAME, route_prefix="/"
                    )
                try:
                    entry = {}
                    for face in faces:
                        face_at = Face(face, url, f"127.0.0.1:{grpc_port}")
                        result = measure(face_at, photos, requests, clients, warmup)
                        entry[face] = result
                        print(_line(f"ours {key}, {face.upper()}", result, raw, floor))
                        parts = ", ".join(f"{k} {v:.1f}" for k, v in result["breakdown"].items())
                        print(f"    p50 breakdown (ms): {parts}; decisions {result['decisions']}")
                    if batch_images > 0 and "http" in entry:
                        batch = measure_batch(url, photos, requests, clients, batch_images)
                        batch["vs_single"] = batch["images_per_s"] / entry["http"]["requests_per_s"]
                        entry["batch"] = batch
                        print(
                            f"ours {key}, HTTP batch API ({batch_images} images/request, {clients} clients): "
                            f"{batch['images_per_s']:.1f} images/s = {batch['vs_single']:.2f}x the single-image "
                            f"API's {entry['http']['requests_per_s']:.1f}; request p50 "
                            f"{batch['request_p50_ms']:.0f} ms; failed images {batch['failed_images']}"
                        )
                    results["service"][key] = entry
                finally:
                    if (placement, index_on, router_on) != phases[-1]:
                        serve.delete(APP_NAME)  # the last one goes with the shutdown below, without a wait
    finally:
        if quick:  # the cluster is this run's own: ray.shutdown stops Serve with it, with no graceful stop
            serve.context._disconnect()
        else:
            serve.shutdown()
        ray.shutdown()
        if early is not None:
            early.cleanup()
        if scratch is not None:
            scratch.cleanup()
    results["targets"] = _targets(results) + _router_lines(results)
    # others' work on the machine moves every figure: the 1-minute load average, start and end
    results["load_average"]["end"] = os.getloadavg()[0]
    load = results["load_average"]
    print(f"load average (1 min) at start {load['start']:.1f}, at end {load['end']:.1f}")
    print("targets (sequential p50; throughput under load):")
    for line in results["targets"]:
        print(line)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(results, indent=2, default=str))
    return results
