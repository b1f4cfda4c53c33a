"""``FaissIndex``: one FAISS structure over external labels, and what a search needs to read it.

The structure is an ``IndexIDMap2`` (``retrieval.ann``) of one kind: exact, HNSW or IVF-PQ with
an exact refine. Kinds that cannot remove a vector (HNSW, IVF-PQ's refine) keep the removed
labels as tombstones, which searches exclude, until a rebuild drops them. The default search
knobs are the index's own (tuned when it was built, or from the config), with ``tuning`` the
evidence for them.

No locking, no I/O beyond reading and writing one file: the replica (``VectorIndex``)
serialises the calls, and a rebuild fills a new ``FaissIndex`` privately before swapping it in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import faiss
import numpy as np

from retrieval import ann
from retrieval.config import IndexConfig
from retrieval.schemas import SearchParams
from retrieval.store import Op
from visionroute.errors import InputError

NORM_TOLERANCE = 1e-3


def check_unit_vectors(vectors: np.ndarray, dim: int, field: str) -> np.ndarray:
    """``vectors`` as float32 rows of ``dim`` finite, L2-normalised values (one vector: one row);
    ``InputError`` naming ``field`` otherwise."""
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise InputError(f"expected {dim}-d vectors, got shape {vectors.shape}", field=field)
    if not np.isfinite(vectors).all():
        raise InputError("vector contains NaN or infinity", field=field)
    norms = np.linalg.norm(vectors, axis=1)
    if np.any(np.abs(norms - 1.0) > NORM_TOLERANCE):
        raise InputError(
            f"vectors must be L2-normalised; got norms {norms.round(4).tolist()[:5]}", field=field
        )
    return vectors


class FaissIndex:
    def __init__(
        self,
        index: faiss.IndexIDMap2,
        config: IndexConfig,
        *,
        kind: str | None = None,
        tuning: dict | None = None,
    ) -> None:
        self.index = index
        self.kind = kind or ann.kind_of(index)
        self.tuning = tuning
        self.tombstones: set[int] = set()
        self.default_params = ann.default_params(index, config)  # the config's pinned knobs win

    @classmethod
    def read(cls, path: Path, config: IndexConfig, *, tuning: dict | None = None) -> FaissIndex:
        """The index saved at ``path``; FAISS's ``RuntimeError`` when it cannot be read."""
        return cls(faiss.read_index(str(path)), config, tuning=tuning)

    def write(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        """Vectors stored, tombstoned ones included."""
        return int(self.index.ntotal)

    # mutations -------------------------------------------------------------------------------
    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), labels)

    def remove(self, label: int) -> None:
        if ann.supports_remove(self.kind):
            self.index.remove_ids(np.array([label], np.int64))
        else:
            self.tombstones.add(int(label))

    def apply(self, op: Op) -> None:
        """One log entry: an add of its vector, or a remove of its label."""
        if op.op == "add":
            self.add(np.array([op.label], np.int64), op.vector[None, :])
        else:
            self.remove(op.label)

    def replay(self, ops: Iterable[Op]) -> tuple[int, int]:
        """Apply log entries in order; returns (the last seq applied or -1, how many)."""
        last, count = -1, 0
        for op in ops:
            self.apply(op)
            last, count = op.seq, count + 1
        return last, count

    def stored_labels(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map)

    def reconcile(self, live_labels: np.ndarray) -> np.ndarray:
        """Tombstone every stored label that is not live; returns the live labels it lacks
        (none, unless the index is behind the store)."""
        stored = self.stored_labels()
        self.tombstones = set(np.setdiff1d(stored, live_labels).tolist())
        return np.setdiff1d(live_labels, stored)

    # search ----------------------------------------------------------------------------------
    def request_params(self, params: SearchParams) -> ann.RequestParams:
        """A request's knobs: what it asks for, else the index's defaults."""
        defaults = self.default_params
        return ann.RequestParams(
            ef_search=params.ef_search or defaults.ef_search,
            nprobe=params.nprobe or defaults.nprobe,
            refine_k_factor=params.refine_k_factor or defaults.refine_k_factor,
        )

    def searcher(
        self, query: np.ndarray, params: ann.RequestParams, allowed_labels: np.ndarray | None = None
    ) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        """``n -> (scores, labels)``: the ``n`` best stored vectors for one query, 1-D, ``-1``
        padded (what ``shards.search_with_ties`` calls, with growing ``n``).

        ``allowed_labels``: only those (a filter's matches); None: every label but the
        tombstones. Tombstones may still come back under a filter: callers drop them. The
        selector is built once; the function keeps it (and its inner one) alive.
        """
        inner = None
        if allowed_labels is not None:
            selector = faiss.IDSelectorBatch(allowed_labels)
        elif self.tombstones:
            inner = faiss.IDSelectorBatch(np.fromiter(self.tombstones, np.int64))
            selector = faiss.IDSelectorNot(inner)
        else:
            selector = None
        selectors = (selector, inner)  # an IDSelectorNot does not own its inner selector

        def search(n: int) -> tuple[np.ndarray, np.ndarray]:
            scores, labels = ann.search(self.index, self.kind, query, n, params, selectors[0])
            return scores[0], labels[0]

        return search

    # reporting -------------------------------------------------------------------------------
    def search_defaults(self) -> dict:
        """The knobs every search uses unless it asks otherwise (None where the kind has none)."""
        return {
            "ef_search": self.default_params.ef_search if self.kind == "hnsw" else None,
            "nprobe": self.default_params.nprobe if self.kind == "ivfpq" else None,
            "refine_k_factor": self.default_params.refine_k_factor if self.kind == "ivfpq" else None,
        }

    def nbytes(self) -> int:
        return ann.index_bytes(self.index)
