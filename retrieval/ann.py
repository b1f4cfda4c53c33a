"""FAISS index construction and per-request search parameters (inner product, unit vectors).

Every index is an ``IndexIDMap2`` so results carry our external labels. Search parameters are
built per call as ``faiss.SearchParameters*`` objects: a request's efSearch / nprobe /
k_factor never touches the shared index (clip-retrieval's rule).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import faiss
import numpy as np

from retrieval.config import IndexConfig

log = logging.getLogger(__name__)

KINDS = ("exact", "hnsw", "ivfpq")


def choose_kind(config: IndexConfig, n_items: int) -> str:
    """The kind to build for ``n_items`` vectors: the configured one, or by size for "auto"."""
    if config.kind == "auto":
        if n_items < config.exact_max_items:
            return "exact"
        return "hnsw" if n_items < config.hnsw_max_items else "ivfpq"
    if config.kind == "ivfpq" and n_items < config.ivf_min_items:
        # IVF-PQ must be trained on the data; too few vectors would train poor centroids.
        return "exact"
    return config.kind


def ivf_nlist(config: IndexConfig, n_items: int) -> int:
    if config.ivf_nlist:
        return config.ivf_nlist
    # ~4*sqrt(n) lists (FAISS's guideline), rounded to a power of two, >= 39 points per list.
    target = max(16, 4 * math.sqrt(max(n_items, 1)))
    nlist = 2 ** round(math.log2(target))
    while nlist > 16 and nlist * 39 > n_items:
        nlist //= 2
    return nlist


def pq_m(config: IndexConfig, dim: int) -> int:
    m = config.pq_m or max(1, dim // 8)
    if dim % m:
        raise ValueError(f"pq_m={m} must divide the vector dimension {dim}")
    return m


def default_nprobe(config: IndexConfig, nlist: int) -> int:
    return config.ivf_nprobe or max(16, nlist // 64)


def default_params(index: faiss.Index, config: IndexConfig) -> RequestParams:
    """The config's search knobs for this index (nprobe follows the index's nlist)."""
    nlist = faiss.extract_index_ivf(index).nlist if kind_of(index) == "ivfpq" else 1
    return RequestParams(config.hnsw_ef_search, default_nprobe(config, nlist), config.refine_k_factor)


def build_index(
    kind: str, dim: int, config: IndexConfig, train_vectors: np.ndarray | None = None
) -> faiss.IndexIDMap2:
    """An empty (trained, for IVF-PQ) index of ``kind`` wrapped in IndexIDMap2."""
    metric = faiss.METRIC_INNER_PRODUCT
    if kind == "exact":
        base = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, config.hnsw_m, metric)
        base.hnsw.efConstruction = config.hnsw_ef_construction
        base.hnsw.efSearch = config.hnsw_ef_search
    elif kind == "ivfpq":
        if train_vectors is None or len(train_vectors) == 0:
            raise ValueError("IVF-PQ needs training vectors")
        nlist = ivf_nlist(config, len(train_vectors))
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m(config, dim), 8, metric)
        ivf.own_fields = True
        quantizer.this.disown()  # the IVF index owns and frees its quantizer
        ivf.nprobe = default_nprobe(config, nlist)
        ivf.train(np.ascontiguousarray(train_vectors, np.float32))
        # Exact re-ranking: IndexRefineFlat keeps the full vectors and re-scores the candidates.
        base = faiss.IndexRefineFlat(ivf)
        base.k_factor = config.refine_k_factor
        ivf.this.disown()
        base.own_fields = True
    else:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {list(KINDS)}")
    index = faiss.IndexIDMap2(base)
    base.this.disown()
    index.own_fields = True
    return index


def kind_of(index: faiss.Index) -> str:
    base = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap2) else index)
    if isinstance(base, faiss.IndexFlat):
        return "exact"
    if isinstance(base, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(base, faiss.IndexRefine):
        return "ivfpq"
    raise ValueError(f"unsupported FAISS index type {type(base).__name__}")


def supports_remove(kind: str) -> bool:
    # HNSW has no remove_ids; IndexRefine does not implement it either.
    return kind == "exact"


@dataclass
class RequestParams:
    """The effective ANN knobs of one request (config defaults overridden by the request)."""

    ef_search: int
    nprobe: int
    refine_k_factor: float


def search(
    index: faiss.IndexIDMap2,
    kind: str,
    queries: np.ndarray,
    k: int,
    params: RequestParams,
    selector: faiss.IDSelector | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels), each (nq, k); -1 labels pad rows with fewer than k results.

    ``selector`` selects external labels; it is translated to the wrapped index's internal
    ids here because IndexIDMap2 only translates a top-level selector, and IndexRefine reads
    its base index's selector from ``base_index_params``.
    """
    keep_alive = []
    translated = None
    if selector is not None:
        translated = faiss.IDSelectorTranslated(index.id_map, selector)
        keep_alive.append(translated)
    if kind == "exact":
        search_params = faiss.SearchParameters(sel=translated) if translated else None
    elif kind == "hnsw":
        search_params = faiss.SearchParametersHNSW(efSearch=max(params.ef_search, k))
        if translated:
            search_params.sel = translated
    elif kind == "ivfpq":
        ivf_params = faiss.SearchParametersIVF(nprobe=params.nprobe)
        if translated:
            ivf_params.sel = translated
        keep_alive.append(ivf_params)
        search_params = faiss.IndexRefineSearchParameters(
            k_factor=params.refine_k_factor, base_index_params=ivf_params
        )
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    scores, labels = index.search(np.ascontiguousarray(queries, np.float32), k, params=search_params)
    del keep_alive
    return scores, labels


def exact_search(
    vectors: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over an explicit set: (scores, labels) sorted best first, -1 padded."""
    nq = len(queries)
    out_scores = np.full((nq, k), -np.inf, np.float32)
    out_labels = np.full((nq, k), -1, np.int64)
    if len(vectors) == 0:
        return out_scores, out_labels
    scores, positions = faiss.knn(
        np.ascontiguousarray(queries, np.float32),
        np.ascontiguousarray(vectors, np.float32),
        min(k, len(vectors)),
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    found = positions >= 0
    out_scores[:, : scores.shape[1]] = np.where(found, scores, -np.inf)
    out_labels[:, : scores.shape[1]] = np.where(found, labels[np.clip(positions, 0, None)], -1)
    return out_scores, out_labels


def index_bytes(index: faiss.Index) -> int:
    """The serialised size: what the index holds in memory, give or take small buffers."""
    return int(faiss.serialize_index(index).size)
