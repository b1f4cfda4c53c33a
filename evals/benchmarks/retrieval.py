"""``visionroute bench retrieval``: ANN kinds against exact search, embedding throughput, zero-shot.

Every figure is measured on this machine when the command runs; nothing is assumed.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from retrieval import ann
from retrieval.config import ConseConfig, IndexConfig, OpenClipConfig, RetrievalConfig

log = logging.getLogger(__name__)

ZERO_SHOT_QUERIES = {
    "a cup of coffee": "coffee",
    "a cat": "chelsea",
    "a horse": "horse",
    "a rocket": "rocket",
    "a man with a camera": "camera",
    "an astronaut": "astronaut",
    "a brick wall": "brick",
    "a clock": "clock",
    "coins": "coins",
    "a page of text": ("page", "text"),  # skimage's "text" is a photo of printed text too
}
BUNDLED_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "horse",
    "moon",
    "page",
    "rocket",
    "text",
)


def clustered(n: int, dim: int, n_clusters: int, seed: int, spread: float = 1.0) -> np.ndarray:
    """Unit vectors scattered around random centres (uniform random vectors make ANN recall meaningless)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):  # chunks keep the temporary arrays small
        m = min(100_000, n - start)
        noise = rng.standard_normal((m, dim)).astype(np.float32) * spread
        out[start : start + m] = centres[rng.integers(0, n_clusters, m)] + noise
    faiss.normalize_L2(out)
    return out


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = sum(len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth))
    return hits / (len(truth) * k)


def bench_ann(
    n: int, dim: int, n_queries: int, kinds: tuple[str, ...] = ann.KINDS, k: int = 10, seed: int = 0
) -> list[dict]:
    config = IndexConfig()
    data = clustered(n + n_queries, dim, n_clusters=max(10, n // 100), seed=seed)
    base, queries = data[:n], data[n:]
    labels = np.arange(n, dtype=np.int64)
    rows, truth, exact_qps = [], None, None
    for kind in ("exact", *[k_ for k_ in kinds if k_ != "exact"]):
        started = time.perf_counter()
        train = (
            base[np.random.default_rng(seed).choice(n, min(n, 65_536), replace=False)]
            if kind == "ivfpq"
            else None
        )
        index = ann.build_index(kind, dim, config, train)
        index.add_with_ids(base, labels)
        build_s = time.perf_counter() - started
        params = ann.default_params(index, config)
        variants = [("", params)]
        if kind == "ivfpq":  # the same index, a deeper probe asked for per request
            deeper = params.nprobe * 4
            variants.append(
                (f" nprobe={deeper}", ann.RequestParams(params.ef_search, deeper, params.refine_k_factor))
            )
            variants.append(
                (
                    f" nprobe={deeper} kf={params.refine_k_factor * 4:g}",
                    ann.RequestParams(params.ef_search, deeper, params.refine_k_factor * 4),
                )
            )
        for suffix, request in variants:
            ann.search(index, kind, queries[:10], k, request)  # warm-up
            started = time.perf_counter()
            _, found = ann.search(index, kind, queries, k, request)
            qps = n_queries / (time.perf_counter() - started)
            if kind == "exact":
                truth, exact_qps = found, qps
            rows.append(
                {
                    "kind": kind,
                    "label": ("ivfpq+refine" if kind == "ivfpq" else kind) + suffix,
                    "n": n,
                    "build_s": build_s,
                    "index_mb": ann.index_bytes(index) / 2**20,
                    "nprobe": request.nprobe if kind == "ivfpq" else None,
                    "recall_at_10": recall_at(found, truth, k),
                    "qps": qps,
                    "qps_vs_exact": qps / exact_qps,
                }
            )
            log.info("%s", rows[-1])
        del index
    return rows


def bench_embedding(
    model_name: str, pretrained: str | None, n_images: int, batch_size: int, rounds: int = 3
) -> dict:
    """Image-tower throughput of one open_clip model: PyTorch eager vs ONNX Runtime (CPU)."""
    import torch

    from cascades.onnx_runner import OnnxModel
    from retrieval.embedders.open_clip import OpenClipEmbedder

    embedder = OpenClipEmbedder(
        OpenClipConfig(model_name=model_name, pretrained=pretrained, device="cpu", batch_size=batch_size)
    )
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(n_images)]
    pixels = embedder.preprocess(images)  # identical input for both runtimes; preprocessing not timed
    with tempfile.TemporaryDirectory() as tmp:
        onnx = OnnxModel(
            embedder.export_image_onnx(Path(tmp) / "image_tower.onnx"), max_batch_size=batch_size
        )
        batches = [pixels[i : i + batch_size] for i in range(0, n_images, batch_size)]
        eager_rates, onnx_rates = [], []
        with torch.no_grad():
            embedder.model.encode_image(batches[0])  # warm-up
            onnx.run(batches[0].numpy())
            # Alternating rounds, median of each: a shared CPU's load swings would otherwise
            # favour whichever runtime happened to run in the quiet moment.
            for _ in range(rounds):
                started = time.perf_counter()
                eager = [embedder.model.encode_image(b).numpy() for b in batches]
                eager_rates.append(n_images / (time.perf_counter() - started))
                started = time.perf_counter()
                exported = [onnx.run(b.numpy())[0] for b in batches]
                onnx_rates.append(n_images / (time.perf_counter() - started))
    max_diff = float(np.abs(np.concatenate(eager) - np.concatenate(exported)).max())
    return {
        "model": model_name,
        "weights": pretrained or "random (speed does not depend on weight values)",
        "images": n_images,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
        "eager_images_per_s": float(np.median(eager_rates)),
        "onnx_images_per_s": float(np.median(onnx_rates)),
        "eager_range": (min(eager_rates), max(eager_rates)),
        "onnx_range": (min(onnx_rates), max(onnx_rates)),
        "max_abs_diff": max_diff,
    }


def bundled_photos() -> dict[str, np.ndarray]:
    from skimage import data

    photos = {}
    for name in BUNDLED_PHOTOS:
        image = np.asarray(getattr(data, name)())
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        photos[name] = np.ascontiguousarray(image[..., :3], np.uint8)
    return photos


def bench_zero_shot(models_dir: Path) -> tuple[list[dict], dict]:
    """Text->image top-1 with the offline ConSE embedder over the bundled photos."""
    from retrieval.service import SearchService

    classifier = models_dir / "efficientnet_lite0.onnx"
    if not classifier.is_file():
        from cascades.models import prepare_models

        prepare_models(models_dir, ["efficientnet_lite0"])
    photos = bundled_photos()
    with tempfile.TemporaryDirectory() as tmp:
        config = RetrievalConfig(index_dir=Path(tmp), embedder=ConseConfig(classifier_path=classifier))
        with SearchService(config) as service:
            started = time.perf_counter()
            service.index_images(list(photos.values()), [{"extra": {"name": n}} for n in photos])
            embed_s = time.perf_counter() - started
            rows = []
            for query, expected in ZERO_SHOT_QUERIES.items():
                hits = service.search_text(query, k=2).hits
                rows.append(
                    {
                        "query": query,
                        "expected": (expected,) if isinstance(expected, str) else expected,
                        "top1": hits[0].metadata.extra["name"],
                        "score": hits[0].score,
                        "runner_up": hits[1].metadata.extra["name"],
                    }
                )
    return rows, {"images": len(photos), "images_per_s": len(photos) / embed_s}


def print_ann(rows: list[dict], dim: int, n_queries: int) -> None:
    print(
        f"\nANN on {rows[0]['n']:,} clustered {dim}-d unit vectors, {n_queries} queries, k=10 (inner product)"
    )
    print(f"{'index':<28} {'build s':>8} {'memory MB':>10} {'recall@10':>10} {'QPS':>9} {'QPS/exact':>10}")
    for r in rows:
        print(
            f"{r['label']:<28} {r['build_s']:>8.1f} {r['index_mb']:>10.1f} {r['recall_at_10']:>10.3f} {r['qps']:>9.0f} {r['qps_vs_exact']:>9.1f}x"
        )


def run(args) -> int:
    config = IndexConfig()
    parts = set(args.parts.split(","))
    print(
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; HNSW M={config.hnsw_m} "
        f"efConstruction={config.hnsw_ef_construction} efSearch={config.hnsw_ef_search}; "
        f"IVF-PQ nlist~4*sqrt(n) nprobe=max(16, nlist/64) pq_m=dim/8 refine k_factor={config.refine_k_factor}"
    )
    if "ann" in parts:
        print_ann(bench_ann(args.n, args.dim, args.queries), args.dim, args.queries)
        if args.ivfpq_1m:
            print_ann(bench_ann(1_000_000, args.dim, args.queries, kinds=("ivfpq",)), args.dim, args.queries)
    if "embed" in parts:
        r = bench_embedding(args.clip_model, args.clip_pretrained, args.images, args.batch_size)
        print(
            f"\nImage embedding, open_clip {r['model']} image tower ({r['weights']}), {r['images']} images, "
            f"batch {r['batch_size']}, CPU, {r['torch_threads']} torch threads:"
        )
        print(
            f"  PyTorch eager : {r['eager_images_per_s']:.1f} images/s (median of {r['rounds']}; "
            f"{r['eager_range'][0]:.1f}-{r['eager_range'][1]:.1f})"
        )
        print(
            f"  ONNX Runtime  : {r['onnx_images_per_s']:.1f} images/s ({r['onnx_range'][0]:.1f}-{r['onnx_range'][1]:.1f}; "
            f"{r['onnx_images_per_s'] / r['eager_images_per_s']:.2f}x eager; max |diff| {r['max_abs_diff']:.1e})"
        )
    if "zeroshot" in parts:
        rows, speed = bench_zero_shot(Path(args.models_dir))
        correct = sum(r["top1"] in r["expected"] for r in rows)
        print(
            f"\nZero-shot text->image top-1, offline ConSE embedder, {speed['images']} bundled skimage photos "
            f"(embedded at {speed['images_per_s']:.1f} images/s): {correct}/{len(rows)}"
        )
        for r in rows:
            mark = "ok  " if r["top1"] in r["expected"] else "MISS"
            print(
                f"  {mark} {r['query']!r:<24} -> {r['top1']:<10} ({r['score']:.3f}; runner-up {r['runner_up']}; expected {'/'.join(r['expected'])})"
            )
    return 0
