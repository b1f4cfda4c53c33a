"""``VectorIndex``: one replica of the search index, composed of the parts in this package.

The facade owns the lock and the order of things; each part has one job:
- ``snapshots.SnapshotDir``: the replica's directory (lock, snapshot files, manifest);
- ``faiss_index.FaissIndex``: the FAISS structure searched now (swapped whole by a rebuild);
- ``log_follower.LogFollower``: the applied seq, applying log entries, heartbeats;
- ``recovery``: loading the snapshot and replaying the log, or building from the items;
- ``rebuilder``: building from the store, and the background rebuild thread;
- ``searcher.search_replica``: answering one query (ANN or exact scan);
- ``shard_view``: what a shard reads of the shared store.
"""

from __future__ import annotations

import atexit
import logging
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path

import numpy as np

from retrieval import ann
from retrieval.config import IndexConfig
from retrieval.index.faiss_index import FaissIndex, check_unit_vectors
from retrieval.index.log_follower import FollowTimer, LogFollower, LogTruncated
from retrieval.index.rebuilder import BackgroundRebuild
from retrieval.index.recovery import load_snapshot, rebuild_from_items
from retrieval.index.searcher import SearchResult, search_replica
from retrieval.index.shard_view import ShardStore, check_shard, own_view
from retrieval.index.snapshots import Origin, SnapshotDir
from retrieval.schemas import ItemMetadata, SearchFilters, SearchParams
from retrieval.shards import ShardMap
from retrieval.store import Item, MetadataStore, Written
from visionroute.errors import ConfigError, InputError, NotFound
from visionroute.state import StateConfig

log = logging.getLogger(__name__)

# Every open index, so the interpreter's exit can stop their background threads first: a daemon
# thread still inside FAISS (OpenMP) while Python tears down its modules crashes the process.
_OPEN_INDEXES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_background_work(timeout_s: float = 30.0) -> None:
    """Stop followers and cancel rebuilds of indexes nobody closed (nothing is written)."""
    for index in list(_OPEN_INDEXES):
        if index._timer is not None:
            index._timer.stop()
        index._rebuild.cancel()  # a running rebuild stops at its next chunk
    for index in list(_OPEN_INDEXES):
        if index._timer is not None:
            index._timer.join(timeout_s)
        index._rebuild.join(timeout_s)


class VectorIndex:
    def __init__(
        self,
        index_dir: Path,
        dim: int,
        space: str,
        config: IndexConfig | None = None,
        state: StateConfig | None = None,
        *,
        name: str = "search",
        store_path: Path | None = None,
        replica_id: str | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        """Open (or create) a replica of the index for ``dim``-d vectors of embedding ``space``.

        ``index_dir`` is this replica's own directory (snapshot cache, lock). The store is the
        SQLite file ``store_path`` (default ``index_dir/items.sqlite``) or, with
        ``state.backend == "postgres"``, the schema ``<state.schema_prefix>_<name>``. Replicas
        share a store by sharing those; each needs its own ``index_dir``. ``replica_id`` (default
        host name and ``index_dir``) names the replica's row in the store's ``replicas`` table.
        ``shard=(s, n)`` (default ``(0, 1)``: everything) indexes only the vectors whose FAISS
        label ``% n == s``; the shards of an index share its store, each in its own ``index_dir``.

        ``space`` names the embedder (vectors of different embedders are not comparable); a
        saved index of another dimension or space is a ``ConfigError`` naming both.
        """
        self.dir = Path(index_dir)
        self.dim = int(dim)
        self.space = space
        self.config = config or IndexConfig()
        self.shard = check_shard(shard)
        self._snapshots = SnapshotDir(self.dir)  # Conflict when another process holds index_dir
        self.replica_id = replica_id or f"{socket.gethostname()}:{self.dir.resolve()}"
        self._lock = threading.RLock()
        self._faiss: FaissIndex | None = None
        self._timer: FollowTimer | None = None
        self.store: MetadataStore | None = None
        self._rebuild = BackgroundRebuild(
            dim=self.dim,
            lock=self._lock,
            source=lambda: self._own,
            snapshots=self._snapshots,
            swap=self._swap_in,
        )
        _OPEN_INDEXES.add(self)
        try:
            self.store = MetadataStore(store_path or self.dir / "items.sqlite", state, name)
            self._log = LogFollower(
                self.store,
                self.replica_id,
                self.config,
                holds=self._holds,
                log_floor=lambda: self._rebuild.log_floor,
            )
            self.store_id = _check_identity(self.store, self.dim, self.space)
            self._origin = Origin(self.dim, self.space, self.store_id, self.shard)
            self._load()
        except BaseException:
            self._abandon()  # e.g. the database went away mid-start: nothing half-open stays
            raise
        if self.config.follow_interval_s is not None:
            self._timer = FollowTimer(
                self._timed_catch_up,
                self.config.follow_interval_s,
                name=f"index-follow:{self.dir.name}",
                replica_id=self.replica_id,
            )

    # the parts, as callers and tests read them -------------------------------------------------
    @property
    def config(self) -> IndexConfig:
        return self._config

    @config.setter
    def config(self, config: IndexConfig) -> None:
        """A new config applies from the next catch-up, snapshot and rebuild on."""
        self._config = config
        if hasattr(self, "_log"):
            self._log.config = config

    @property
    def index(self):
        """The FAISS index searched now (``faiss.IndexIDMap2``)."""
        return None if self._faiss is None else self._faiss.index

    @property
    def kind(self) -> str:
        return self._faiss.kind

    @property
    def _tombstones(self) -> set[int]:
        return self._faiss.tombstones

    @property
    def _lock_file(self):
        """The directory lock's file (closing it is what a crashed process leaves)."""
        return self._snapshots.lock_file

    @property
    def _own(self) -> MetadataStore | ShardStore | None:
        """What this replica indexes: the store, or only its shard of it."""
        return own_view(self.store, self.shard)

    def _holds(self, label: int) -> bool:
        return ShardMap(self.shard[1]).shard_of(label) == self.shard[0]

    # start-up -------------------------------------------------------------------------------
    def _load(self) -> None:
        """Load the snapshot and replay the log after it, or rebuild from the items."""
        self._faiss = None
        self._log.applied_seq = 0
        loaded, rebuild_reason = load_snapshot(
            self._snapshots, self._origin, self.config, self._own, self._log, self.store.last_seq
        )
        if loaded is None:
            self._rebuild_from_items(rebuild_reason)
        else:
            self._faiss = loaded

    def _rebuild_from_items(self, reason: str) -> None:
        """Build in the calling thread from the items (start-up without a usable snapshot, or
        a replica whose log entries were truncated), follow the log from there, snapshot."""
        started = time.perf_counter()
        built = rebuild_from_items(
            self._own, self.store, self._log, self.dim, self.config, install=self._install
        )
        self.snapshot()
        log.info(
            "rebuilt %s index of %d items in %.1f s (%s)",
            built.kind,
            built.ntotal,
            time.perf_counter() - started,
            reason,
        )

    def _install(self, index: FaissIndex) -> None:
        self._faiss = index

    # following the log -----------------------------------------------------------------------
    def catch_up(self) -> int:
        """Apply the log entries written since the applied seq (by any replica); returns how
        many. A replica whose next entries were truncated rebuilds from the items first."""
        with self._lock:
            if self.store is None:
                return 0
            return self._catch_up_locked()

    def _timed_catch_up(self, stop: threading.Event) -> None:
        # Never blocks on the lock for good: close() may be waiting for this thread while its
        # caller holds the lock (a reload that fails closes the index).
        while not self._lock.acquire(timeout=0.1):
            if stop.is_set():
                return
        try:
            if not stop.is_set() and self.store is not None:
                self._catch_up_locked()
        finally:
            self._lock.release()

    def _catch_up_locked(self, after: bool = True) -> int:
        """``catch_up`` under the lock; ``after``: snapshot too when enough ops arrived."""
        started = time.monotonic()
        try:
            with self._own.consistent_view() as view:
                applied = self._log.apply_log(self._faiss, view)
        except LogTruncated as exc:
            log.warning(
                "replica %s missed truncated log entries (%s); rebuilding from the items",
                self.replica_id,
                exc,
            )
            before = self._log.applied_seq
            self._rebuild_from_items(reason="log truncated past this replica")
            applied = self._log.applied_seq - before
        self._log.caught_up_at = started
        self._log.heartbeat(force=applied > 0)
        if after:
            self._after_ops()
        return applied

    def _apply_written(self, written: Written) -> None:
        """Apply this replica's own committed write: directly when nothing came between it and
        what was applied, else by catching up (which reads it back in seq order)."""
        if not self._log.apply_written(self._faiss, written):
            self._catch_up_locked(after=False)

    def _after_ops(self) -> None:
        # While a rebuild runs, its swap is the next snapshot (the log keeps what it needs).
        if self._log.ops_since_snapshot >= self.config.snapshot_every_ops and not self.is_rebuilding():
            self.maintain()

    # snapshots and rebuilds ------------------------------------------------------------------
    def maintain(self) -> None:
        """Catch up and snapshot; when deletes piled up or the collection outgrew its kind,
        also start a background rebuild (the write that got here does not wait for it)."""
        with self._lock:
            self._catch_up_locked(after=False)
            n = self._own.count()  # a shard's kind fits its own share
            stored = max(1, self._faiss.ntotal)
            self.snapshot()
            if self.is_rebuilding():
                return
            tombstones = len(self._faiss.tombstones)
            if tombstones / stored > self.config.compact_tombstone_ratio:
                self.start_rebuild(reason=f"{tombstones} tombstones")
            elif ann.choose_kind(self.config, n) != self.kind:
                self.start_rebuild(reason=f"{n} items call for {ann.choose_kind(self.config, n)}")

    def compact(self, wait: bool = True) -> dict:
        """Rebuild from the store in the background: drops tombstones, re-chooses the kind,
        retrains IVF-PQ and re-tunes the search knobs. Writes and searches go on meanwhile;
        with ``wait`` this call returns once the new index is swapped in."""
        with self._lock:
            before = {
                "kind": self.kind,
                "stored_vectors": self._faiss.ntotal,
                "tombstones": len(self._faiss.tombstones),
            }
        self._rebuild.join()  # one already running started from less than was asked: run another
        self._rebuild.error = None
        self.start_rebuild(reason="compaction requested")
        if wait:
            self.wait_for_rebuild()
        return {"before": before, "after": self.stats()}

    def snapshot(self) -> None:
        """Save the in-memory index (through the applied seq) and truncate what it covers."""
        with self._lock:
            seq = self._log.applied_seq
            index_file = self._snapshots.write_index(self._faiss, self._snapshots.snapshot_name(seq))
            self._write_manifest(seq, index_file.name)
            self._log.ops_since_snapshot = 0

    def _write_manifest(self, seq: int, index_file: str) -> None:
        """Name ``index_file`` (holding every log entry through ``seq``), then drop what it covers."""
        self._snapshots.write_manifest(self._origin, self._faiss, seq, index_file)
        # Only now that the manifest covering them is durable may the log entries go; a running
        # rebuild still needs those after the seq it started from, and every live replica those
        # after its applied seq (the store takes the lowest of them).
        floor = self._rebuild.log_floor
        self._log.heartbeat(force=True)
        self.store.truncate_log(
            seq if floor is None else min(seq, floor), replica_timeout_s=self.config.replica_timeout_s
        )
        self._snapshots.remove_unnamed(index_file, keep_rebuilds=floor is not None)

    def _swap_in(
        self, new: FaissIndex, snapshot_seq: int, applied_seq: int, index_file: str, late_ops: int
    ) -> dict:
        """A background rebuild's index becomes this replica's (under the lock)."""
        before = {"kind": self.kind, "stored_vectors": self._faiss.ntotal}
        self._faiss = new
        self._log.applied_seq = applied_seq
        self._log.caught_up_at = time.monotonic()
        self._write_manifest(snapshot_seq, index_file)
        self._log.ops_since_snapshot = late_ops
        return before

    def is_rebuilding(self) -> bool:
        return self._rebuild.is_running()

    def start_rebuild(self, reason: str) -> bool:
        """Start a background rebuild; False when one is already running."""
        with self._lock:
            if self.is_rebuilding():
                return False
            return self._rebuild.start(
                reason, self.config, self.store.last_seq(), lambda: self._log.heartbeat(force=True)
            )

    def wait_for_rebuild(self, timeout: float | None = None) -> None:
        """Wait for a running background rebuild; re-raises what made it fail."""
        self._rebuild.wait(timeout)

    def reload(self) -> None:
        """Drop the in-memory index and load snapshot + log again (what a restart does); a
        background rebuild started before is dropped."""
        try:
            with self._lock:
                self._rebuild.cancel()
                self._load()
        except ConfigError:
            self.close()  # outside the lock: close() waits for threads that may want it
            raise

    # reporting -------------------------------------------------------------------------------
    def replica_stats(self) -> dict:
        """How far this replica is behind the log: entries (``lag_ops``) and seconds since it
        last reflected the whole log (``lag_s``; 0 when it does now)."""
        with self._lock:
            return self._log.stats()

    def stats(self) -> dict:
        with self._lock:
            items = self.store.count()
            return {
                "kind": self.kind,
                "items": items,  # the whole store, every shard's
                "shard": list(self.shard),
                "shard_items": items if self.shard[1] == 1 else self._own.count(),
                "stored_vectors": self._faiss.ntotal,
                "tombstones": len(self._faiss.tombstones),
                "dim": self.dim,
                "space": self.space,
                "index_bytes": self._faiss.nbytes(),
                "ops_since_snapshot": self._log.ops_since_snapshot,
                **self._log.stats(),
                "backend": self.store.backend,
                # The defaults every search uses unless it asks otherwise, and how they were chosen.
                "search_params": self._faiss.search_defaults(),
                "tuning": self._faiss.tuning,
                "rebuild": dict(self._rebuild.state),
            }

    # closing ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop following, drop a running rebuild, snapshot pending operations (a fast next
        start), then release the store and lock."""
        if self._timer is not None:
            self._timer.stop()
            self._timer.join()
        with self._lock:
            self._rebuild.cancel()
        self._rebuild.join()  # it stops at its next chunk, or at the swap it may no longer make
        with self._lock:
            if self._faiss is not None and self.store is not None and self._log.ops_since_snapshot:
                self.snapshot()
            if self.store is not None:
                self.store.close()
                self.store = None
            self._snapshots.release()

    def _abandon(self) -> None:
        """Release the store and the directory without a snapshot (a start that failed)."""
        if self.store is not None:
            self.store.close()
            self.store = None
        self._snapshots.release()

    # items ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return self.store.count()

    def upsert(
        self, vector: np.ndarray, metadata: ItemMetadata | None = None, item_id: int | None = None
    ) -> int:
        """Add an item (or replace item ``item_id``); returns its id once the write is durable."""
        vector = check_unit_vectors(vector, self.dim, "vector")[0]
        metadata = metadata or ItemMetadata()
        with self._lock:
            written = self.store.upsert_logged(item_id, vector, metadata)
            # Durable from here: a crash now is repaired by replaying the log on start.
            self._apply_written(written)
            self._after_ops()
        return written.item_id

    def upsert_many(
        self,
        vectors: np.ndarray,
        metadatas: list[ItemMetadata],
        item_ids: list[int | None],
    ) -> list[int]:
        """``upsert`` for many items in one durable write (one transaction); their ids in order."""
        vectors = check_unit_vectors(vectors, self.dim, "vector")
        if not (len(vectors) == len(metadatas) == len(item_ids)):
            raise InputError(
                f"got {len(vectors)} vectors, {len(metadatas)} metadata and {len(item_ids)} ids; they must match",
                field="vector",
            )
        with self._lock:
            written = self.store.upsert_many_logged(list(zip(item_ids, vectors, metadatas)))
            for one in written:  # durable from here, as upsert's
                self._apply_written(one)
            self._after_ops()
        return [one.item_id for one in written]

    def delete(self, item_id: int) -> None:
        with self._lock:
            written = self.store.delete_logged(int(item_id))
            if written is None:
                raise NotFound(f"no item with id {item_id} in the index", field="id")
            self._apply_written(written)
            self._after_ops()

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

    def find_images(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """The id stored for each (tenant, image_sha256) that has one (the lowest, as ``find``'s
        first), in one query: what an analysed batch replaces instead of doubling."""
        with self._lock:
            return self.store.ids_of_images(keys)

    # search ---------------------------------------------------------------------------------
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
        """The k best live items for one unit query vector, best first, satisfying ``filters``
        (``searcher.search_replica``). A replica whose last catch-up is older than ``max_staleness_s``
        catches up first."""
        k = self.check_k(k)
        query = check_unit_vectors(query, self.dim, "query")
        with self._lock:
            if self._log.is_stale():
                self._catch_up_locked()
            return search_replica(
                self._faiss,
                self._own,
                self.store.items_by_label,
                query,
                k,
                filters or SearchFilters(),
                params or SearchParams(),
                # Counts, scans and exclusions are this shard's: another's labels are never found here.
                frozenset(label for label in exclude_labels if self._holds(label)),
                exact_filter_max_items=self.config.exact_filter_max_items,
            )


def _check_identity(store: MetadataStore, dim: int, space: str) -> str:
    """The store's id. The first opener records what the store holds; "store_id" lets a local
    snapshot tell whether it was made from this store (a cache must not outlive a new database)."""
    saved = store.settings_once({"dim": str(dim), "space": space, "store_id": uuid.uuid4().hex})
    if int(saved["dim"]) != dim or saved["space"] != space:
        raise ConfigError(
            f"the index in {store.database.location} holds {saved['dim']}-d vectors from embedder "
            f"{saved['space']!r}, but the configured embedder {space!r} makes {dim}-d "
            "vectors; use another index_dir or re-index the images with this embedder",
            field="retrieval.embedder",
        )
    return saved["store_id"]
