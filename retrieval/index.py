"""``VectorIndex``: a FAISS index over external labels, its SQLite store and crash-safe snapshots.

Durability: a write is acknowledged once its SQLite transaction (item row + log entries) has
committed. FAISS lives in memory and is saved as an atomic snapshot (temp file, fsync, rename,
then a manifest naming it, renamed the same way) that records the last log entry it contains;
on start the snapshot is loaded and the log entries after it are replayed. A crash at any point
leaves either the old or the new manifest, and log entries are dropped only after the manifest
that covers them is durable.

One process writes one ``index_dir`` (an exclusive file lock says so). Calls are serialised
by a lock: FAISS searches are multi-threaded inside, and adds must not race them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retrieval import ann
from retrieval.config import IndexConfig
from retrieval.schemas import ItemMetadata, SearchFilters, SearchParams
from retrieval.store import Item, MetadataStore
from visionroute.errors import ConfigError, Conflict, InputError, NotFound

log = logging.getLogger(__name__)

MANIFEST = "snapshot.json"
FORMAT_VERSION = 1
NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ScoredItem:
    item: Item
    score: float


@dataclass(frozen=True)
class SearchResult:
    hits: list[ScoredItem]  # best first, never padding, at most k
    exact: bool


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class VectorIndex:
    def __init__(self, index_dir: Path, dim: int, space: str, config: IndexConfig | None = None) -> None:
        """Open (or create) the index in ``index_dir`` for ``dim``-d vectors of embedding ``space``.

        ``space`` names the embedder (vectors of different embedders are not comparable); a
        saved index of another dimension or space is a ``ConfigError`` naming both.
        """
        self.dir = Path(index_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dim = int(dim)
        self.space = space
        self.config = config or IndexConfig()
        self._lock = threading.RLock()
        self._lock_file = open(self.dir / "writer.lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise Conflict(
                f"index {str(self.dir)!r} is open for writing in another process; one writer per index_dir",
                field="index_dir",
            ) from None
        self.store = MetadataStore(self.dir / "items.sqlite")
        self._check_identity()
        self._ops_since_snapshot = 0
        self._load()

    # start-up -------------------------------------------------------------------------------
    def _check_identity(self) -> None:
        saved_dim, saved_space = self.store.get_setting("dim"), self.store.get_setting("space")
        if saved_dim is None:
            self.store.set_settings({"dim": str(self.dim), "space": self.space})
            return
        if int(saved_dim) != self.dim or saved_space != self.space:
            self.close()
            raise ConfigError(
                f"the index in {str(self.dir)!r} holds {saved_dim}-d vectors from embedder "
                f"{saved_space!r}, but the configured embedder {self.space!r} makes {self.dim}-d "
                "vectors; use another index_dir or re-index the images with this embedder",
                field="retrieval.embedder",
            )

    def _load(self) -> None:
        manifest_path = self.dir / MANIFEST
        self.index: faiss.IndexIDMap2 | None = None
        self._tombstones: set[int] = set()
        for leftover in self.dir.glob("*.tmp"):
            leftover.unlink()  # a snapshot interrupted by a crash; the manifest never named it
        applied_seq = 0
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            index_path = self.dir / manifest["index_file"]
            try:
                self.index = faiss.read_index(str(index_path))
            except RuntimeError as exc:
                log.error("cannot read snapshot %s (%s); rebuilding from the store", index_path, exc)
                self._rebuild(reason="unreadable snapshot")
                return
            if self.index.d != self.dim:
                saved_dim, self.index = self.index.d, None
                self.close()
                raise ConfigError(
                    f"snapshot {index_path.name} holds {saved_dim}-d vectors, the embedder {self.space!r} makes {self.dim}-d",
                    field="retrieval.embedder",
                )
            applied_seq = int(manifest["applied_seq"])
            self.kind = ann.kind_of(self.index)
            self._default_params = ann.default_params(self.index, self.config)
            replayed = self._replay(applied_seq)
            log.info("loaded %s snapshot at seq %d, replayed %d ops", self.kind, applied_seq, replayed)
        live = self.store.live_labels()
        if self.index is None:
            self._rebuild(reason="no snapshot")
            return
        stored = faiss.vector_to_array(self.index.id_map)
        self._tombstones = set(np.setdiff1d(stored, live).tolist())
        missing = np.setdiff1d(live, stored)
        if len(missing):
            # The log should make this impossible; rebuilding from the store is always right.
            log.warning("snapshot lacks %d live items; rebuilding from the store", len(missing))
            self._rebuild(reason="snapshot behind the store")

    def _replay(self, after_seq: int) -> int:
        count = 0
        for op in self.store.ops_after(after_seq):
            if op.op == "add":
                self._faiss_add(np.array([op.label], np.int64), op.vector[None, :])
            else:
                self._faiss_remove(op.label)
            count += 1
        self._ops_since_snapshot = count
        return count

    # FAISS mutations (under the lock) ------------------------------------------------------
    def _faiss_add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), labels)

    def _faiss_remove(self, label: int) -> None:
        if ann.supports_remove(self.kind):
            self.index.remove_ids(np.array([label], np.int64))
        else:
            self._tombstones.add(int(label))

    def _rebuild(self, reason: str) -> None:
        """Build a fresh index of the right kind from the store's live vectors, then snapshot."""
        started = time.perf_counter()
        n = self.store.count()
        kind = ann.choose_kind(self.config, n)
        train = None
        if kind == "ivfpq":
            train = self._training_sample(n)
        index = ann.build_index(kind, self.dim, self.config, train)
        for labels, vectors in self.store.iter_vectors():
            index.add_with_ids(vectors, labels)
        self.index, self.kind, self._tombstones = index, kind, set()
        self._default_params = ann.default_params(index, self.config)
        self.snapshot()
        log.info(
            "rebuilt %s index of %d items in %.1f s (%s)", kind, n, time.perf_counter() - started, reason
        )

    def _training_sample(self, n: int) -> np.ndarray:
        nlist = ann.ivf_nlist(self.config, n)
        want = min(n, max(64 * nlist, 65_536))
        every = max(1, n // want)
        chunks = [v[::every] for _, v in self.store.iter_vectors()]
        return np.concatenate(chunks)[:want]

    # public API -----------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return self.store.count()

    def _check_vectors(self, vectors: np.ndarray, field: str) -> np.ndarray:
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise InputError(f"expected {self.dim}-d vectors, got shape {vectors.shape}", field=field)
        if not np.isfinite(vectors).all():
            raise InputError("vector contains NaN or infinity", field=field)
        norms = np.linalg.norm(vectors, axis=1)
        if np.any(np.abs(norms - 1.0) > NORM_TOLERANCE):
            raise InputError(
                f"vectors must be L2-normalised; got norms {norms.round(4).tolist()[:5]}", field=field
            )
        return vectors

    def upsert(
        self, vector: np.ndarray, metadata: ItemMetadata | None = None, item_id: int | None = None
    ) -> int:
        """Add an item (or replace item ``item_id``); returns its id once the write is durable."""
        vector = self._check_vectors(vector, "vector")[0]
        metadata = metadata or ItemMetadata()
        with self._lock:
            item_id, label, old_label = self.store.upsert(item_id, vector, metadata)
            # Durable from here: a crash now is repaired by replaying the log on start.
            if old_label is not None:
                self._faiss_remove(old_label)
            self._faiss_add(np.array([label], np.int64), vector[None, :])
            self._after_write(2 if old_label is not None else 1)
        return item_id

    def delete(self, item_id: int) -> None:
        with self._lock:
            label = self.store.delete(int(item_id))
            if label is None:
                raise NotFound(f"no item with id {item_id} in the index", field="id")
            self._faiss_remove(label)
            self._after_write(1)

    def get(self, item_id: int) -> tuple[Item, np.ndarray]:
        with self._lock:
            found = self.store.get(int(item_id))
        if found is None:
            raise NotFound(f"no item with id {item_id} in the index", field="id")
        return found

    def find(self, filters: SearchFilters) -> list[int]:
        """Ids of the items matching ``filters`` (no ranking)."""
        with self._lock:
            return self.store.item_ids(filters)

    def _after_write(self, ops: int) -> None:
        self._ops_since_snapshot += ops
        if self._ops_since_snapshot >= self.config.snapshot_every_ops:
            self.maintain()

    def maintain(self) -> None:
        """Snapshot, or rebuild when deletes piled up or the collection outgrew its kind."""
        with self._lock:
            n = self.store.count()
            stored = max(1, self.index.ntotal)
            if len(self._tombstones) / stored > self.config.compact_tombstone_ratio:
                self._rebuild(reason=f"{len(self._tombstones)} tombstones")
            elif ann.choose_kind(self.config, n) != self.kind:
                self._rebuild(reason=f"{n} items call for {ann.choose_kind(self.config, n)}")
            else:
                self.snapshot()

    def compact(self) -> dict:
        """Rebuild from the store: drops tombstones, re-chooses the kind, retrains IVF-PQ."""
        with self._lock:
            before = {
                "kind": self.kind,
                "stored_vectors": int(self.index.ntotal),
                "tombstones": len(self._tombstones),
            }
            self._rebuild(reason="compaction requested")
            return {"before": before, "after": self.stats()}

    def snapshot(self) -> None:
        with self._lock:
            seq = self.store.last_seq()
            index_file = f"index-{seq:012d}.faiss"
            _write_atomic(self.dir / index_file, lambda tmp: faiss.write_index(self.index, str(tmp)))
            manifest = {
                "format_version": FORMAT_VERSION,
                "applied_seq": seq,
                "index_file": index_file,
                "kind": self.kind,
                "dim": self.dim,
                "space": self.space,
                "stored_vectors": int(self.index.ntotal),
                "saved_at": time.time(),
            }
            _write_atomic(self.dir / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
            # Only now that the manifest covering them is durable may the log entries go.
            self.store.truncate_log(seq)
            for old in self.dir.glob("index-*.faiss"):
                if old.name != index_file:
                    old.unlink(missing_ok=True)
            self._ops_since_snapshot = 0

    def reload(self) -> None:
        """Drop the in-memory index and load snapshot + log again (what a restart does)."""
        with self._lock:
            self._load()

    def stats(self) -> dict:
        with self._lock:
            return {
                "kind": self.kind,
                "items": self.store.count(),
                "stored_vectors": int(self.index.ntotal),
                "tombstones": len(self._tombstones),
                "dim": self.dim,
                "space": self.space,
                "index_bytes": ann.index_bytes(self.index),
                "ops_since_snapshot": self._ops_since_snapshot,
            }

    def close(self) -> None:
        """Snapshot pending operations (a fast next start), then release the store and lock."""
        with self._lock:
            if (
                getattr(self, "index", None) is not None
                and self.store is not None
                and self._ops_since_snapshot
            ):
                self.snapshot()
            if getattr(self, "store", None) is not None:
                self.store.close()
                self.store = None
            if not self._lock_file.closed:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                self._lock_file.close()

    # search ---------------------------------------------------------------------------------
    def _request_params(self, params: SearchParams) -> ann.RequestParams:
        defaults = self._default_params
        return ann.RequestParams(
            ef_search=params.ef_search or defaults.ef_search,
            nprobe=params.nprobe or defaults.nprobe,
            refine_k_factor=params.refine_k_factor or defaults.refine_k_factor,
        )

    def check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.config.max_k:
            raise InputError(f"k must be an integer in [1, {self.config.max_k}], got {k!r}", field="k")
        return int(k)

    def search(
        self,
        query: np.ndarray,
        k: int,
        filters: SearchFilters | None = None,
        params: SearchParams | None = None,
        exclude_labels: frozenset[int] = frozenset(),
    ) -> SearchResult:
        """The k best live items for one unit query vector, best first, satisfying ``filters``.

        Filters matching few items are answered by an exact scan over those items' vectors;
        otherwise the ANN search runs with a selector, and if the selector starved it (HNSW or
        IVF may return fewer than k under a selective filter) the exact scan answers instead,
        so a filter with at least k matches always yields k results.
        """
        k = self.check_k(k)
        query = self._check_vectors(query, "query")
        filters = filters or SearchFilters()
        params = params or SearchParams()
        with self._lock:
            want = k + len(exclude_labels)
            if filters.is_empty():
                n_allowed = self.store.count()
                allowed = None
            else:
                n_allowed = self.store.count_matching(filters)
                allowed = True
            expected = min(k, max(0, n_allowed - len(exclude_labels)))
            if n_allowed == 0:
                return SearchResult([], exact=False)
            exact = params.exact or (allowed is not None and n_allowed <= self.config.exact_filter_max_items)
            if not exact:
                inner = None  # a selector's inner selector must outlive the search
                if allowed is not None:
                    labels, _ = self.store.matching(filters, with_vectors=False)
                    selector = faiss.IDSelectorBatch(labels)
                elif self._tombstones:
                    inner = faiss.IDSelectorBatch(np.fromiter(self._tombstones, np.int64))
                    selector = faiss.IDSelectorNot(inner)
                else:
                    selector = None
                n_search = min(want, max(1, self.index.ntotal))
                scores, labels = ann.search(
                    self.index, self.kind, query, n_search, self._request_params(params), selector
                )
                del selector, inner
                hits = self._hits(scores[0], labels[0], exclude_labels, k)
                if len(hits) >= expected:
                    return SearchResult(hits, exact=False)
                log.debug("ANN returned %d of %d under filters; exact scan", len(hits), expected)
            labels, vectors = self.store.matching(filters, with_vectors=True)
            if vectors is None:
                vectors = np.zeros((0, self.dim), np.float32)
            scores, found = ann.exact_search(vectors, labels, query, want)
            return SearchResult(self._hits(scores[0], found[0], exclude_labels, k), exact=True)

    def _hits(
        self, scores: np.ndarray, labels: np.ndarray, exclude: frozenset[int], k: int
    ) -> list[ScoredItem]:
        # -1 is FAISS's padding when fewer than k results exist; tombstones are deleted items.
        keep = [
            (float(score), int(label))
            for score, label in zip(scores, labels)
            if label >= 0 and int(label) not in exclude and int(label) not in self._tombstones
        ]
        keep.sort(key=lambda pair: -pair[0])  # already sorted by FAISS; made explicit for ties
        items = self.store.items_by_label([label for _, label in keep[:k]])
        return [ScoredItem(items[label], score) for score, label in keep[:k] if label in items]
