"""FAISS index construction and per-request search parameters (inner product, unit vectors).

Every index is an ``IndexIDMap2`` so results carry our external labels. Search parameters are
built per call as ``faiss.SearchParameters*`` objects: a request's efSearch / nprobe /
k_factor never touches the shared index (clip-retrieval's rule).

The index's own defaults are tuned once, while a new index is private to its builder
(``tune``): faiss's ``ParameterSpace`` enumerates and sets efSearch / nprobe / k_factor, and
``IntersectionCriterion`` measures recall@k on held-out vectors that are not in the index; the
cheapest setting that reaches the target stays in the index (and so in its snapshot).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

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


# Config fields that, when set explicitly, pin a knob (the tuner leaves it alone).
PINNED = {"hnsw_ef_search": "efSearch", "ivf_nprobe": "nprobe", "refine_k_factor": "k_factor_rf"}


def _base(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap2) else index)


def default_params(index: faiss.Index, config: IndexConfig) -> RequestParams:
    """The index's own (tuned, or built-from-config) knobs; explicitly configured ones win."""
    kind, base = kind_of(index), _base(index)
    ef_search, nprobe, k_factor = config.hnsw_ef_search, 1, config.refine_k_factor
    if kind == "hnsw":
        ef_search = int(base.hnsw.efSearch)
    elif kind == "ivfpq":
        nprobe, k_factor = int(faiss.extract_index_ivf(index).nprobe), float(base.k_factor)
    pinned = config.model_fields_set
    return RequestParams(
        ef_search=config.hnsw_ef_search if "hnsw_ef_search" in pinned else ef_search,
        nprobe=config.ivf_nprobe if "ivf_nprobe" in pinned and config.ivf_nprobe else nprobe,
        refine_k_factor=config.refine_k_factor if "refine_k_factor" in pinned else k_factor,
    )


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
        # Re-ranking: k_factor*k PQ candidates are re-scored from a second store: 8-bit scalar
        # quantized vectors (1 byte per dimension, a quarter of float32) or the full vectors.
        if config.refine_store == "sq8":
            store = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, metric)
            base = faiss.IndexRefine(ivf, store)
            base.train(np.ascontiguousarray(train_vectors, np.float32))  # SQ8's per-dimension ranges
            store.this.disown()
            base.own_refine_index = True
        else:
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


@dataclass
class Tuning:
    """What ``tune`` chose for one index, and the evidence (reported by ``/v1/search/stats``)."""

    kind: str
    target_recall: float | None
    recall_at_k: float | None  # measured on the held-out queries, at the chosen setting
    k: int
    held_out_queries: int
    reached: bool
    chosen: dict = field(default_factory=dict)  # faiss ParameterSpace names -> values
    settings_evaluated: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _cost(kind: str, values: dict[str, float], base: faiss.Index, k: int) -> float:
    """Work per query, in code bytes touched, to order settings from cheapest to dearest."""
    if kind == "hnsw":
        return values["efSearch"]
    ivf = faiss.extract_index_ivf(base)
    per_list = base.ntotal / max(1, ivf.nlist)
    scanned = values["nprobe"] * per_list * ivf.code_size
    refine_bytes = faiss.downcast_index(base.refine_index).code_size
    return scanned + values["k_factor_rf"] * k * refine_bytes


def _densified(values: list[float]) -> list[float]:
    """ParameterSpace steps by powers of two; a step of 1.5 between them lets the tuner stop
    nearer the target (efSearch 24 instead of 32 is about a quarter fewer distance calls)."""
    out = set(values)
    ordered = sorted(values)
    for low, high in zip(ordered, ordered[1:]):
        middle = round(low * 1.5)
        if low >= 2 and low < middle < high:
            out.add(float(middle))
    return sorted(out)


def tune(
    index: faiss.IndexIDMap2,
    queries: np.ndarray,
    truth_labels: np.ndarray,
    config: IndexConfig,
    k: int = 10,
) -> Tuning:
    """Set the cheapest efSearch / nprobe / k_factor whose recall@k on ``queries`` reaches the target.

    ``queries`` must not be in ``index`` (held-out vectors of the same collection) and
    ``truth_labels`` are their exact top-k labels. Settings are tried from the cheapest up; one
    dominated by a setting that already missed the target (every knob lower or equal) is
    skipped, since recall only grows with each knob. When none reaches the target, the setting
    with the best recall is kept and ``reached`` is False. Call only on an index nobody else
    searches yet: it sets the index's own parameters.
    """
    started = time.perf_counter()
    kind = kind_of(index)
    target = config.target_recall
    if kind == "exact" or target is None or len(queries) == 0:
        return Tuning(kind, target, 1.0 if kind == "exact" else None, k, len(queries), kind == "exact")
    base = _base(index)
    found = faiss.ParameterSpace()
    found.initialize(base)  # ParameterSpace does not look through IndexIDMap2
    pinned = {PINNED[name] for name in config.model_fields_set if name in PINNED}
    space = faiss.ParameterSpace()
    ranges: list[tuple[str, list[float]]] = []  # the same ranges, read back without SWIG proxies
    for i in range(found.parameter_ranges.size()):
        available = found.parameter_ranges.at(i)
        if available.name not in ("efSearch", "nprobe", "k_factor_rf"):
            continue  # e.g. IVF-PQ's polysemous "ht": not a knob we serve
        values = faiss.vector_to_array(available.values).tolist()
        if available.name in pinned:
            current = default_params(index, config)
            by_name = {
                "efSearch": current.ef_search,
                "nprobe": current.nprobe,
                "k_factor_rf": current.refine_k_factor,
            }
            values = [by_name[available.name]]
        elif available.name == "efSearch":
            values = sorted({max(k, int(v)) for v in _densified(values)} | {k})  # HNSW needs efSearch >= k
        else:
            values = _densified(values)
        chosen_range = space.add_range(available.name)
        for v in values:
            chosen_range.values.push_back(float(v))
        ranges.append((available.name, [float(v) for v in values]))

    def values_of(cno: int) -> dict[str, float]:
        # ParameterSpace numbers combinations with the first range varying fastest.
        out, rest = {}, cno
        for name, values in ranges:
            out[name] = values[rest % len(values)]
            rest //= len(values)
        return out

    combos = sorted(range(space.n_combinations()), key=lambda c: (_cost(kind, values_of(c), base, k), c))
    criterion = faiss.IntersectionCriterion(len(queries), k)
    criterion.set_groundtruth(None, np.ascontiguousarray(truth_labels[:, :k], np.int64))
    queries = np.ascontiguousarray(queries, np.float32)
    need = min(1.0, target + config.tune_margin)
    missed: list[int] = []
    best: tuple[float, int] | None = None
    evaluated = 0
    for cno in combos:
        if any(space.combination_ge(low, cno) for low in missed):
            continue
        space.set_index_parameters(index, space.combination_name(cno))
        scores, labels = index.search(queries, k)
        recall = criterion.evaluate(faiss.swig_ptr(scores), faiss.swig_ptr(labels))
        evaluated += 1
        if best is None or recall > best[0]:
            best = (recall, cno)
        if recall >= need:
            best = (recall, cno)
            break
        missed.append(cno)
    recall, cno = best
    space.set_index_parameters(index, space.combination_name(cno))
    return Tuning(
        kind=kind,
        target_recall=target,
        recall_at_k=round(float(recall), 4),
        k=k,
        held_out_queries=len(queries),
        reached=recall >= need,
        chosen={name: (int(v) if float(v).is_integer() else float(v)) for name, v in values_of(cno).items()},
        settings_evaluated=evaluated,
        seconds=round(time.perf_counter() - started, 3),
    )


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


def exact_top_k(chunks, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k labels of ``queries`` over (labels, vectors) ``chunks``, streamed (inner product)."""
    queries = np.ascontiguousarray(queries, np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for labels, vectors in chunks:
        if len(vectors) == 0:
            continue
        scores, positions = faiss.knn(
            queries,
            np.ascontiguousarray(vectors, np.float32),
            min(k, len(vectors)),
            metric=faiss.METRIC_INNER_PRODUCT,
        )
        heap.add_result(scores, np.where(positions >= 0, labels[np.clip(positions, 0, None)], -1))
    heap.finalize()
    return heap.I


def index_bytes(index: faiss.Index) -> int:
    """The serialised size: what the index holds in memory, give or take small buffers."""
    return int(faiss.serialize_index(index).size)
