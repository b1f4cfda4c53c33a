"""``bench state`` search part: queries/s through read replicas and shards of one index.

Replicas: 1 index object answering 2 client threads vs 2 replicas (two index objects, two
folders, one shared store) answering one client thread each. Shards: the exact index whole vs
split in 2 by FAISS label, each query sent to both shards at once and the two top-k merged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

K = 10


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _qps(clients: list[Callable[[np.ndarray], Any]], queries: np.ndarray) -> float:
    """Queries/s with one thread per client, the queries split evenly between them."""
    parts = np.array_split(queries, len(clients))

    def run(client: Callable[[np.ndarray], Any], part: np.ndarray) -> None:
        for query in part:
            client(query)

    started = time.perf_counter()
    with ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(run, clients, parts))
    return len(queries) / (time.perf_counter() - started)


def measure_search(state: Any, root: Path, args: Any) -> dict[str, Any]:
    from retrieval.config import IndexConfig
    from retrieval.index import VectorIndex
    from retrieval.schemas import ItemMetadata
    from retrieval.shards import merge
    from retrieval.store import MetadataStore

    dim = 64
    config = IndexConfig(kind="exact", snapshot_every_ops=10**9, follow_interval_s=None)
    store = MetadataStore(root / "items.sqlite", state=state, name="bench_search")
    store.set_settings({"dim": str(dim), "space": "bench"})
    for vector in _vectors(args.vectors, dim, 0):
        store.upsert(None, vector, ItemMetadata())
    store.close()
    queries = _vectors(args.queries, dim, 1)

    def replica(name: str, **options: Any) -> VectorIndex:
        return VectorIndex(
            root / name,
            dim,
            "bench",
            config,
            state,
            name="bench_search",
            store_path=root / "items.sqlite",
            **options,
        )

    def searcher(index: VectorIndex) -> Callable[[np.ndarray], Any]:
        return lambda query: index.search(query, K)

    one, two = replica("r1"), replica("r2")
    replicas = {
        "1 replica, 2 clients": _qps([searcher(one)] * 2, queries),
        "2 replicas": _qps([searcher(one), searcher(two)], queries),
    }
    whole_qps = _qps([searcher(one)], queries)
    two.close()
    shards = [replica(f"s{s}", shard=(s, 2)) for s in range(2)]
    with ThreadPoolExecutor(2) as pool:

        def scattered(query: np.ndarray) -> Any:
            results = list(pool.map(lambda index: index.search(query, K), shards))
            per_shard = [
                (np.array([h.score for h in r.hits]), np.array([h.item.id for h in r.hits])) for r in results
            ]
            return merge(per_shard, K)

        sharded_qps = _qps([scattered], queries)
    for index in (one, *shards):
        index.close()
    lines = [
        f"search on {args.vectors} vectors (dim {dim}, exact, k={K}), queries/s:",
        f"  read replicas: 1 replica (2 clients) {replicas['1 replica, 2 clients']:8.0f}   "
        f"2 replicas {replicas['2 replicas']:8.0f}   ratio {replicas['2 replicas'] / replicas['1 replica, 2 clients']:.2f}x",
        f"  shards (1 client): 1 shard {whole_qps:8.0f}   2 shards {sharded_qps:8.0f}   "
        f"ratio {sharded_qps / whole_qps:.2f}x",
        "  why: one index object runs one search at a time (a lock keeps FAISS and its metadata",
        "  consistent with writes), so a second replica is a second search running at once (up to",
        "  the cores: 2 here). Shards split memory, not per-query work: every query runs on every",
        "  shard and each reads its hits' metadata from the store, so on one machine a query costs",
        "  more; shards pay off when one replica's index no longer fits a node (docs/operations.md).",
    ]
    return {
        "replicas_qps": replicas,
        "shards_qps": {"1 shard": whole_qps, "2 shards": sharded_qps},
        "vectors": args.vectors,
        "lines": lines,
    }
