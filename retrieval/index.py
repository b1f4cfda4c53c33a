"""``VectorIndex``: a FAISS index over external labels, its SQLite store and crash-safe snapshots.

Durability: a write is acknowledged once its SQLite transaction (item row + log entries) has
committed. FAISS lives in memory and is saved as an atomic snapshot (temp file, fsync, rename,
then a manifest naming it, renamed the same way) that records the last log entry it contains;
on start the snapshot is loaded and the log entries after it are replayed. A crash at any point
leaves either the old or the new manifest, and log entries are dropped only after the manifest
that covers them is durable.

One process writes one ``index_dir`` (an exclusive file lock says so). Calls are serialised
by a lock: FAISS searches are multi-threaded inside, and adds must not race them.

Rebuilds (compaction, a change of kind as the collection grows) run in a background thread and
never hold the lock while they build: the thread reads the live vectors in one read
transaction of its own SQLite connection (a consistent view at log entry ``seq``), builds and
tunes the new index, writes its snapshot file, then replays the log entries written meanwhile;
only the last few entries and the swap itself run under the lock. Writes go on into the old
index and the log (whose entries after ``seq`` are kept until the swap), so nothing
acknowledged meanwhile is lost, in memory or on disk.
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


class _Cancelled(Exception):
    """A background rebuild was overtaken by close() or reload()."""


@dataclass
class _Built:
    index: faiss.IndexIDMap2
    kind: str
    seq: int  # the last log entry the index contains
    tuning: ann.Tuning


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
        self._ops_since_snapshot = 0
        self._tuning: dict | None = None
        self._generation = 0  # bumped by reload()/close(): a rebuild started before is dropped
        self._rebuild_thread: threading.Thread | None = None
        self._rebuild_error: BaseException | None = None
        self._rebuild_state: dict = {"running": False}
        self._log_floor: int | None = None  # log entries after this stay while a rebuild runs
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
            self._tuning = manifest.get("tuning")
            for stale in self.dir.glob("rebuild-*.faiss"):
                if stale.name != index_path.name:
                    stale.unlink(missing_ok=True)  # a background rebuild that never swapped in
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

    @staticmethod
    def _apply_ops(index: faiss.IndexIDMap2, kind: str, ops) -> tuple[int, int]:
        """Replay log entries into a (new) index; removals from kinds that cannot remove are left
        to the tombstones derived at the swap. Returns (last seq applied or -1, count)."""
        last, count = -1, 0
        for op in ops:
            if op.op == "add":
                index.add_with_ids(op.vector[None, :], np.array([op.label], np.int64))
            elif ann.supports_remove(kind):
                index.remove_ids(np.array([op.label], np.int64))
            last, count = op.seq, count + 1
        return last, count

    # FAISS mutations (under the lock) ------------------------------------------------------
    def _faiss_add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), labels)

    def _faiss_remove(self, label: int) -> None:
        if ann.supports_remove(self.kind):
            self.index.remove_ids(np.array([label], np.int64))
        else:
            self._tombstones.add(int(label))

    def _build(self, store: MetadataStore, cancelled=lambda: False) -> _Built:
        """A new index of the right kind over ``store``'s live vectors, tuned, not yet shared.

        One read transaction makes the vectors and ``seq`` consistent. ``tune_queries`` live
        vectors (at most a tenth) are held out of the build: they are the tuner's queries, with
        exact top-10 ground truth over the rest, and are added once the knobs are chosen.
        """
        store.db.execute("BEGIN")
        try:
            seq, n = store.last_seq(), store.count()
            kind = ann.choose_kind(self.config, n)
            tuned = kind != "exact" and self.config.target_recall is not None
            n_held = min(self.config.tune_queries, n // 10) if tuned else 0
            if n_held < 10:
                n_held = 0
            held_positions = np.sort(np.random.default_rng(n).choice(n, n_held, replace=False))
            held_labels, held_vectors, train = [], [], []
            nlist = ann.ivf_nlist(self.config, n) if kind == "ivfpq" else 1
            every = max(1, n // min(n, max(64 * nlist, 65_536))) if n else 1
            offset = 0
            for labels, vectors in store.iter_vectors():  # pass 1: held-out queries, training sample
                held = np.isin(np.arange(offset, offset + len(labels)), held_positions)
                held_labels.append(labels[held])
                held_vectors.append(vectors[held])
                if kind == "ivfpq":
                    train.append(vectors[~held][::every])
                offset += len(labels)
                if cancelled():
                    raise _Cancelled
            held_labels = np.concatenate(held_labels) if held_labels else np.zeros(0, np.int64)
            held_vectors = (
                np.concatenate(held_vectors) if held_vectors else np.zeros((0, self.dim), np.float32)
            )
            index = ann.build_index(kind, self.dim, self.config, np.concatenate(train) if train else None)
            held_set = set(held_labels.tolist())

            def indexed_chunks():  # pass 2: add everything but the held-out vectors
                for labels, vectors in store.iter_vectors():
                    keep = ~np.isin(labels, held_labels) if held_set else slice(None)
                    index.add_with_ids(np.ascontiguousarray(vectors[keep]), labels[keep])
                    if cancelled():
                        raise _Cancelled
                    yield labels[keep], vectors[keep]

            k = min(10, max(1, n - n_held))
            if n_held:
                truth = ann.exact_top_k(indexed_chunks(), held_vectors, k)
            else:
                for _ in indexed_chunks():
                    pass
                truth = np.zeros((0, k), np.int64)
        finally:
            store.db.execute("COMMIT")
        tuning = ann.tune(index, held_vectors, truth, self.config, k=k)
        if n_held:
            index.add_with_ids(held_vectors, held_labels)
        log.info("built %s over %d items; tuning %s", kind, n, tuning.as_dict())
        return _Built(index, kind, seq, tuning)

    def _rebuild(self, reason: str) -> None:
        """Build in the calling thread (start-up: no snapshot, or an unusable one), then snapshot."""
        started = time.perf_counter()
        built = self._build(self.store)
        self.index, self.kind, self._tombstones = built.index, built.kind, set()
        self._default_params = ann.default_params(built.index, self.config)
        self._tuning = built.tuning.as_dict()
        self._replay(built.seq)  # nothing runs concurrently at start-up; kept for safety
        self.snapshot()
        log.info(
            "rebuilt %s index of %d items in %.1f s (%s)",
            built.kind,
            self.index.ntotal,
            time.perf_counter() - started,
            reason,
        )

    # background rebuild -------------------------------------------------------------------
    def is_rebuilding(self) -> bool:
        thread = self._rebuild_thread
        return thread is not None and thread.is_alive()

    def start_rebuild(self, reason: str) -> bool:
        """Start a background rebuild; False when one is already running."""
        with self._lock:
            if self.is_rebuilding():
                return False
            self._log_floor = self.store.last_seq()  # a lower bound of the rebuild's own seq
            self._rebuild_error = None
            self._rebuild_state = {"running": True, "reason": reason, "started_at": time.time()}
            thread = threading.Thread(
                target=self._rebuild_in_background,
                args=(reason, self._generation),
                name=f"index-rebuild:{self.dir.name}",
                daemon=True,
            )
            self._rebuild_thread = thread
            thread.start()
        return True

    def wait_for_rebuild(self, timeout: float | None = None) -> None:
        """Wait for a running background rebuild; re-raises what made it fail."""
        thread = self._rebuild_thread
        if thread is not None:
            thread.join(timeout)
        if self._rebuild_error is not None:
            error, self._rebuild_error = self._rebuild_error, None
            raise error

    def _rebuild_in_background(self, reason: str, generation: int) -> None:
        started = time.perf_counter()
        threads = self.config.rebuild_threads or max(1, faiss.omp_get_max_threads() - 1)
        faiss.omp_set_num_threads(threads)  # OpenMP settings are per thread: searches keep theirs
        store = MetadataStore(self.dir / "items.sqlite")  # this thread's own connection
        index_file = None
        try:
            built = self._build(store, cancelled=lambda: generation != self._generation)
            # Catch up with the log outside the lock, then write the snapshot file outside it too.
            last, caught_up = self._apply_ops(built.index, built.kind, store.ops_after(built.seq))
            seq = max(built.seq, last)
            index_file = self.dir / f"rebuild-{seq:012d}.faiss"
            _write_atomic(index_file, lambda tmp: faiss.write_index(built.index, str(tmp)))
            with self._lock:
                if generation != self._generation or self.store is None:
                    raise _Cancelled
                # The few entries written since the catch-up, then the swap.
                _, late = self._apply_ops(built.index, built.kind, self.store.ops_after(seq))
                stored = faiss.vector_to_array(built.index.id_map)
                tombstones = set(np.setdiff1d(stored, self.store.live_labels()).tolist())
                before = {"kind": self.kind, "stored_vectors": int(self.index.ntotal)}
                self.index, self.kind, self._tombstones = built.index, built.kind, tombstones
                self._default_params = ann.default_params(built.index, self.config)
                self._tuning = built.tuning.as_dict()
                self._write_manifest(seq, index_file.name)
                self._ops_since_snapshot = late
                index_file = None  # the manifest names it now
                self._rebuild_state = {
                    "running": False,
                    "reason": reason,
                    "before": before,
                    "kind": built.kind,
                    "seconds": round(time.perf_counter() - started, 3),
                    "ops_caught_up": caught_up + late,
                    "ops_under_lock": late,
                    "finished_at": time.time(),
                }
            log.info("background rebuild (%s) swapped in: %s", reason, self._rebuild_state)
        except _Cancelled:
            log.info("background rebuild (%s) dropped: the index was reloaded or closed", reason)
            self._rebuild_state = {"running": False, "reason": reason, "dropped": True}
        except BaseException as exc:  # reported by stats() and re-raised by wait_for_rebuild()
            log.exception("background rebuild (%s) failed; the current index stays", reason)
            self._rebuild_error = exc
            self._rebuild_state = {"running": False, "reason": reason, "error": repr(exc)}
        finally:
            store.close()
            if index_file is not None:
                index_file.unlink(missing_ok=True)
            with self._lock:
                self._log_floor = None

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
        # While a rebuild runs, its swap is the next snapshot (the log keeps what it needs).
        if self._ops_since_snapshot >= self.config.snapshot_every_ops and not self.is_rebuilding():
            self.maintain()

    def maintain(self) -> None:
        """Snapshot; when deletes piled up or the collection outgrew its kind, also start a
        background rebuild (the write that got here does not wait for it)."""
        with self._lock:
            n = self.store.count()
            stored = max(1, self.index.ntotal)
            self.snapshot()
            if self.is_rebuilding():
                return
            if len(self._tombstones) / stored > self.config.compact_tombstone_ratio:
                self.start_rebuild(reason=f"{len(self._tombstones)} tombstones")
            elif ann.choose_kind(self.config, n) != self.kind:
                self.start_rebuild(reason=f"{n} items call for {ann.choose_kind(self.config, n)}")

    def compact(self, wait: bool = True) -> dict:
        """Rebuild from the store in the background: drops tombstones, re-chooses the kind,
        retrains IVF-PQ and re-tunes the search knobs. Writes and searches go on meanwhile;
        with ``wait`` this call returns once the new index is swapped in."""
        with self._lock:
            before = {
                "kind": self.kind,
                "stored_vectors": int(self.index.ntotal),
                "tombstones": len(self._tombstones),
            }
        running = self._rebuild_thread
        if running is not None:
            running.join()  # one already running started from less than was asked: run another
        self._rebuild_error = None
        self.start_rebuild(reason="compaction requested")
        if wait:
            self.wait_for_rebuild()
        return {"before": before, "after": self.stats()}

    def snapshot(self) -> None:
        with self._lock:
            seq = self.store.last_seq()
            index_file = f"index-{seq:012d}.faiss"
            _write_atomic(self.dir / index_file, lambda tmp: faiss.write_index(self.index, str(tmp)))
            self._write_manifest(seq, index_file)
            self._ops_since_snapshot = 0

    def _write_manifest(self, seq: int, index_file: str) -> None:
        """Name ``index_file`` (holding every log entry through ``seq``), then drop what it covers."""
        manifest = {
            "format_version": FORMAT_VERSION,
            "applied_seq": seq,
            "index_file": index_file,
            "kind": self.kind,
            "dim": self.dim,
            "space": self.space,
            "stored_vectors": int(self.index.ntotal),
            "tuning": self._tuning,
            "saved_at": time.time(),
        }
        _write_atomic(self.dir / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        # Only now that the manifest covering them is durable may the log entries go; a running
        # rebuild still needs those after the seq it started from.
        floor = self._log_floor
        self.store.truncate_log(seq if floor is None else min(seq, floor))
        for old in [*self.dir.glob("index-*.faiss"), *self.dir.glob("rebuild-*.faiss")]:
            if old.name != index_file and (floor is None or old.name.startswith("index-")):
                old.unlink(missing_ok=True)

    def reload(self) -> None:
        """Drop the in-memory index and load snapshot + log again (what a restart does); a
        background rebuild started before is dropped."""
        with self._lock:
            self._generation += 1
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
                # The defaults every search uses unless it asks otherwise, and how they were chosen.
                "search_params": {
                    "ef_search": self._default_params.ef_search if self.kind == "hnsw" else None,
                    "nprobe": self._default_params.nprobe if self.kind == "ivfpq" else None,
                    "refine_k_factor": self._default_params.refine_k_factor if self.kind == "ivfpq" else None,
                },
                "tuning": self._tuning,
                "rebuild": dict(self._rebuild_state),
            }

    def close(self) -> None:
        """Drop a running rebuild, snapshot pending operations (a fast next start), then
        release the store and lock."""
        with self._lock:
            self._generation += 1
        thread = self._rebuild_thread
        if thread is not None:
            thread.join()  # it stops at its next chunk, or at the swap it may no longer make
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
