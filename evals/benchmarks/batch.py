"""``visionroute bench batch``: the batch job against raw ONNX Runtime on the same files, one run.

1. a folder of ``--images`` JPEG files (seeded crops of scikit-image's photos, 384x288), or
   ``--folder``;
2. raw: in this process, each file decoded as the service decodes it, then the classify stage
   (ONNX Runtime + pre/post-processing) over batches of ``max_batch_size``: images/s, one batch
   at a time and 4 batches at a time in threads; the faster is the baseline;
3. the batch job (router/batch/) over the same folder on a local Ray: the shipped serve
   config's classify cascade through the whole analyse pipeline, its thresholds set so every
   image is answered by the cheap tier (``--shipped-thresholds``: as shipped, review writes
   included), privacy ``keep`` (the detectors' cost is ``bench privacy``'s). Its images/s run
   from submitting the dataset to the last record written (actor start-up included; Ray's own
   start is not) and, beside it, from the first record on (the steady state);
4. the ratio job / raw (target >= 0.8).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "camera", "coins", "horse", "cat", "hubble_deep_field")
SIZE_WH = (384, 288)
TARGET_RATIO = 0.8


def generate_folder(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` different JPEG files: random crops of the bundled photos, resized to SIZE_WH."""
    from PIL import Image
    from skimage import data
    from skimage.util import img_as_ubyte

    sources = []
    for name in PHOTOS:
        image = img_as_ubyte(getattr(data, name)())
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        sources.append(Image.fromarray(np.ascontiguousarray(image[..., :3])))
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        photo = sources[n % len(sources)]
        width, height = photo.size
        scale = rng.uniform(0.6, 1.0)
        w, h = int(width * scale), int(height * scale)
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        path = folder / f"{n:05d}.jpg"
        photo.crop((x, y, x + w, y + h)).resize(SIZE_WH).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def measure_raw(
    stage: Any, files: list[Path], batch_size: int, limits: Any, threads: int = 4
) -> dict[str, float]:
    """Read + decode (as the service does) + ONNX Runtime over batches, in this process: one batch
    after another, then ``threads`` batches at a time (decoding beside inference, as the job's
    actor does; on a shared machine more runnable threads also get a larger share of the CPUs).
    The faster of the two is the baseline."""
    from concurrent.futures import ThreadPoolExecutor

    from cascades.images import decode_image

    def decoded(path: Path) -> np.ndarray:
        return decode_image(
            path.read_bytes(), max_bytes=limits.max_body_bytes, max_pixels=limits.max_pixels
        ).rgb

    def one_batch(chunk: list[Path]) -> None:
        stage.predict([decoded(path) for path in chunk])

    chunks = [files[start : start + batch_size] for start in range(0, len(files), batch_size)]
    one_batch(chunks[0])  # warm-up
    started = time.perf_counter()
    for chunk in chunks:
        one_batch(chunk)
    sequential_s = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:  # as the actor does: decode beside a running batch
        list(pool.map(one_batch, chunks))
    threaded_s = time.perf_counter() - started
    return {
        "images": len(files),
        "sequential_images_per_s": len(files) / sequential_s,
        "threaded_images_per_s": len(files) / threaded_s,
        "images_per_s": len(files) / min(sequential_s, threaded_s),  # the better one is the baseline
    }


def bench_config(config_path: Path, models_dir: Path, workdir: Path, shipped_thresholds: bool) -> Any:
    """The serve config's classify cascade, as the bench measures it (module docstring)."""
    from router.config import parse_app_config
    from router.serve_config import IMPORT_PATH, load_serve_document

    document = load_serve_document(config_path)
    app = next(a for a in document.get("applications", []) if a.get("import_path") == IMPORT_PATH)
    args = copy.deepcopy(app.get("args") or {})
    classify = args["cascades"]["classify"]
    classify.pop("vlm", None)
    if not shipped_thresholds:  # every image answered by the cheap tier
        classify["policy"] = {
            **classify.get("policy", {}),
            "accept_threshold": 0.0,
            "escalate_threshold": 0.0,
        }
        classify["policy"].pop("certificate", None)
    args["cascades"] = {"classify": classify}
    args["default_task"] = "classify"
    args["models_dir"] = str(models_dir)
    args["review"] = {**args.get("review", {}), "path": str(workdir / "review")}
    args["retrieval"] = {"enabled": False}
    policies = args.setdefault("policies", {})
    policies["privacy"] = {**policies.get("privacy", {}), "faces": "keep", "text": "keep"}
    return parse_app_config(args)


def _load() -> str:
    """The machine's load average: the figures of a shared machine are read beside it."""
    import os

    return "load average {:.1f} {:.1f} {:.1f}, {} CPUs".format(*os.getloadavg(), os.cpu_count())


def run(args) -> int:
    import ray

    from cascades.models import prepare_models
    from cascades.onnx_stage import OnnxStage
    from router.batch.job import run_batch

    models_dir = Path(args.models_dir)
    prepare_models(models_dir, ["efficientnet_lite0"])
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as temporary:
        workdir = Path(temporary)
        if args.folder:
            files = sorted(
                p for p in Path(args.folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
            )
            folder = Path(args.folder)
        else:
            folder = workdir / "images"
            files = generate_folder(folder, args.images)
        config = bench_config(Path(args.config), models_dir, workdir, args.shipped_thresholds)
        cascade = config.cascades["classify"]
        print(
            f"images: {len(files)} files in {folder} ({SIZE_WH[0]}x{SIZE_WH[1]} JPEG unless --folder); "
            f"model {cascade.tier.model}; batches of {cascade.max_batch_size}"
        )
        stage = OnnxStage(cascade.tier, models_dir=models_dir)
        raw = measure_raw(stage, files, cascade.max_batch_size, config.limits)
        del stage
        print(
            f"raw ONNX Runtime, batched x{cascade.max_batch_size}, read + decode included: "
            f"{raw['images_per_s']:.1f} images/s (one batch at a time {raw['sequential_images_per_s']:.1f}, "
            f"4 threads {raw['threaded_images_per_s']:.1f}; {_load()})"
        )
        ray.init(address="local", num_cpus=args.local_cpus, include_dashboard=False)
        try:
            summary = run_batch(
                config,
                folder,
                workdir / "out",
                actors=args.actors,
                num_cpus=args.num_cpus,
                batch_size=args.batch_size,
                progress=False,
            )
        finally:
            ray.shutdown()
    job = summary.images_per_s
    decisions = ", ".join(f"{k} {v}" for k, v in sorted(summary.decisions.items()))
    print(
        f"batch job (Ray Data, {args.actors} actor(s), the service's pipeline; {decisions}; "
        f"{summary.errors} errors): {job:.1f} images/s ({summary.seconds:.1f} s, the first records after "
        f"{summary.first_result_s or 0:.1f} s: actor start-up; {_load()})"
    )
    for where, reason in sorted(summary.first_errors.items()):
        print(f"  {summary.error_fields[where]} errors at {where}, the first: {reason}")
    ratio = job / raw["images_per_s"]
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"batch job / raw: {ratio:.2f}x (target >= {TARGET_RATIO}x: {verdict})")
    return 0


def register(bench) -> None:
    from visionroute import paths

    batch = bench.add_parser(
        "batch", help="the batch job's images/s on the cheap tier against raw ONNX Runtime on the same files"
    )
    batch.add_argument("--images", type=int, default=2000, help="generated JPEG files (default: %(default)s)")
    batch.add_argument("--folder", help="measure this folder instead of generated files")
    batch.add_argument(
        "--config",
        default=str(Path(__file__).resolve().parents[2] / "serve_config.yaml"),
        help="the serve config whose classify cascade runs (default: the shipped one)",
    )
    batch.add_argument("--models-dir", default=str(paths.models_dir()))
    batch.add_argument("--actors", type=int, default=1)
    batch.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per actor")
    batch.add_argument("--local-cpus", type=int, default=None, help="CPUs of the local Ray")
    batch.add_argument("--batch-size", type=int, default=64, help="items per Ray Data batch")
    batch.add_argument(
        "--shipped-thresholds",
        action="store_true",
        help="keep the config's thresholds (review writes included) instead of answering at the cheap tier",
    )
    batch.set_defaults(func=run)
