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


def heavy_tailed(n: int, dim: int, seed: int) -> np.ndarray:
    """A second distribution the defaults were never tuned on: cluster sizes drawn from a
    Pareto law (a few huge clusters, a long tail of tiny ones) and anisotropic noise (each
    cluster stretches each dimension by its own log-normal factor)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(10, n // 200)
    weights = rng.pareto(1.2, n_clusters) + 1e-3
    weights /= weights.sum()
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    scales = rng.lognormal(0.0, 0.75, (n_clusters, dim)).astype(np.float32)
    assignment = rng.choice(n_clusters, n, p=weights)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        part = assignment[start : start + 100_000]
        noise = rng.standard_normal((len(part), dim)).astype(np.float32) * scales[part]
        out[start : start + len(part)] = centres[part] + 0.9 * noise
    faiss.normalize_L2(out)
    return out


DISTRIBUTIONS = {
    "clustered": lambda n, dim, seed: clustered(n, dim, n_clusters=max(10, n // 100), seed=seed),
    "heavy-tailed": heavy_tailed,
}


def bench_ann(
    n: int,
    dim: int,
    n_queries: int,
    kinds: tuple[str, ...] = ann.KINDS,
    k: int = 10,
    seed: int = 0,
    distribution: str = "clustered",
) -> list[dict]:
    """Each kind built and tuned the way ``VectorIndex`` does (held-out vectors of the collection
    as the tuner's queries), then measured on other queries that are in neither."""
    config = IndexConfig()
    data = DISTRIBUTIONS[distribution](n + n_queries, dim, seed)
    base, queries = data[:n], data[n:]
    labels = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n_held = min(config.tune_queries, n // 10)
    held = np.zeros(n, bool)
    held[rng.choice(n, n_held, replace=False)] = True
    rows, truth, exact_qps, exact_mb = [], None, None, None
    for kind in ("exact", *[k_ for k_ in kinds if k_ != "exact"]):
        for store in ("sq8", "flat") if kind == "ivfpq" else ("",):
            kind_config = config.model_copy(update={"refine_store": store}) if store else config
            started = time.perf_counter()
            train = (
                base[~held][rng.choice(n - n_held, min(n - n_held, 65_536), replace=False)]
                if kind == "ivfpq"
                else None
            )
            index = ann.build_index(kind, dim, kind_config, train)
            index.add_with_ids(base[~held], labels[~held])
            build_s = time.perf_counter() - started
            started = time.perf_counter()
            held_truth = faiss.knn(base[held], base[~held], k, metric=faiss.METRIC_INNER_PRODUCT)[1]
            tuning = ann.tune(index, base[held], labels[~held][held_truth], kind_config, k=k)
            index.add_with_ids(base[held], labels[held])
            tune_s = time.perf_counter() - started
            request = ann.default_params(index, kind_config)
            ann.search(index, kind, queries[:10], k, request)  # warm-up
            qps = 0.0
            for _ in range(3):  # best of three: a shared machine's stalls are not the index's cost
                started = time.perf_counter()
                _, found = ann.search(index, kind, queries, k, request)
                qps = max(qps, n_queries / (time.perf_counter() - started))
            if kind == "exact":
                truth, exact_qps, exact_mb = found, qps, ann.index_bytes(index) / 2**20
            rows.append(
                {
                    "kind": kind,
                    "label": {"exact": "exact", "hnsw": "HNSW"}.get(kind, f"IVF-PQ+{store} refine"),
                    "n": n,
                    "distribution": distribution,
                    "build_s": build_s,
                    "tune_s": tune_s,
                    "index_mb": ann.index_bytes(index) / 2**20,
                    "memory_vs_exact": ann.index_bytes(index) / 2**20 / exact_mb,
                    "chosen": tuning.chosen,
                    "tuned_recall": tuning.recall_at_k,
                    "recall_at_10": recall_at(found, truth, k),
                    "qps": qps,
                    "qps_vs_exact": qps / exact_qps,
                }
            )
            log.info("%s", rows[-1])
            del index
    return rows


def bench_rebuild(n: int, dim: int, writes: int, kind: str = "hnsw", seed: int = 1) -> dict:
    """Write latency (one durable upsert each) before and during a background rebuild of ``n``
    vectors from exact to ``kind``, measured in the same run; every write is checked afterwards."""
    from retrieval.index import VectorIndex
    from retrieval.schemas import ItemMetadata
    from retrieval.store import MetadataStore

    data = heavy_tailed(n + 4 * writes, dim, seed)
    with tempfile.TemporaryDirectory() as tmp:
        store = MetadataStore(Path(tmp) / "items.sqlite")
        store.set_settings({"dim": str(dim), "space": "bench"})
        with store.database.read() as conn:  # bulk load only; measured writes are durable
            conn.execute("PRAGMA synchronous=OFF")
        for vector in data[:n]:
            store.upsert(None, vector, ItemMetadata())
        store.close()
        index = VectorIndex(Path(tmp), dim, "bench", IndexConfig(kind="exact", snapshot_every_ops=10**9))
        extra = iter(data[n:])

        def timed_writes(count: int, stop=lambda: False) -> tuple[list[float], list[int]]:
            latencies, ids = [], []
            for _ in range(count):
                if stop():
                    break
                started = time.perf_counter()
                ids.append(index.upsert(next(extra)))
                latencies.append((time.perf_counter() - started) * 1000)
            return latencies, ids

        normal, ids = timed_writes(writes)
        index.config = IndexConfig(kind=kind, snapshot_every_ops=10**9)
        started = time.perf_counter()
        index.start_rebuild(f"switch to {kind}")
        during, more = timed_writes(3 * writes, stop=lambda: not index.is_rebuilding())
        while index.is_rebuilding():  # the rebuild outlasted the writes: wait, writes measured
            time.sleep(0.05)
        index.wait_for_rebuild()
        rebuild_s = time.perf_counter() - started
        assert index.kind == kind
        missing = [i for i in ids + more if index.get(i) is None]
        stats = index.stats()
        index.close()

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    return {
        "n": n,
        "kind": kind,
        "rebuild_s": rebuild_s,
        "writes_normal": len(normal),
        "writes_during": len(during),
        "p50_normal_ms": pct(normal, 50),
        "p99_normal_ms": pct(normal, 99),
        "p50_during_ms": pct(during, 50),
        "p99_during_ms": pct(during, 99),
        "missing": len(missing),
        "rebuild": stats["rebuild"],
        "tuning": stats["tuning"],
    }


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
        f"\nANN on {rows[0]['n']:,} {rows[0]['distribution']} {dim}-d unit vectors, {n_queries} queries "
        "in neither the index nor the tuner's held-out sample, k=10 (inner product); "
        "ratios against exact from this run"
    )
    print(
        f"{'index':<22} {'build s':>8} {'tune s':>7} {'MB':>7} {'mem/exact':>9} {'recall@10':>10} "
        f"{'QPS':>9} {'QPS/exact':>10}  tuned (held-out recall)"
    )
    for r in rows:
        chosen = ",".join(f"{k}={v:g}" for k, v in r["chosen"].items()) or "-"
        print(
            f"{r['label']:<22} {r['build_s']:>8.1f} {r['tune_s']:>7.1f} {r['index_mb']:>7.1f} "
            f"{r['memory_vs_exact']:>8.2f}x {r['recall_at_10']:>10.3f} {r['qps']:>9.0f} "
            f"{r['qps_vs_exact']:>9.1f}x  {chosen} ({r['tuned_recall']})"
        )


def run(args) -> int:
    config = IndexConfig()
    parts = set(args.parts.split(","))
    args.dim2 = getattr(args, "dim2", 384)
    args.rebuild_n = getattr(args, "rebuild_n", args.n)
    args.writes = getattr(args, "writes", 300)
    print(
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; HNSW M={config.hnsw_m} "
        f"efConstruction={config.hnsw_ef_construction}; IVF-PQ nlist~4*sqrt(n) pq_m=dim/8, "
        f"{config.refine_store} re-ranking; efSearch/nprobe/k_factor tuned per index to recall@10 >= "
        f"{config.target_recall} (+{config.tune_margin} margin) on {config.tune_queries} held-out vectors"
    )
    if "ann" in parts:
        print_ann(bench_ann(args.n, args.dim, args.queries), args.dim, args.queries)
        print_ann(
            bench_ann(args.n, args.dim2, args.queries, seed=7, distribution="heavy-tailed"),
            args.dim2,
            args.queries,
        )
        if args.ivfpq_1m:
            print_ann(bench_ann(1_000_000, args.dim, args.queries, kinds=("ivfpq",)), args.dim, args.queries)
    if "rebuild" in parts:
        r = bench_rebuild(args.rebuild_n, args.dim2, args.writes)
        print(
            f"\nBackground rebuild exact -> {r['kind']} of {r['n']:,} heavy-tailed {args.dim2}-d vectors "
            f"({r['rebuild_s']:.1f} s; {r['rebuild']['ops_caught_up']} writes caught up, "
            f"{r['rebuild']['ops_under_lock']} under the lock; {r['missing']} acknowledged writes missing)"
        )
        print(
            f"  durable upsert latency, same run: normal p50 {r['p50_normal_ms']:.2f} ms p99 "
            f"{r['p99_normal_ms']:.2f} ms ({r['writes_normal']} writes); during the rebuild p50 "
            f"{r['p50_during_ms']:.2f} ms p99 {r['p99_during_ms']:.2f} ms ({r['writes_during']} writes); "
            f"p99 ratio {r['p99_during_ms'] / r['p99_normal_ms']:.2f}x"
        )
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
