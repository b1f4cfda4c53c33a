"""``VectorIndex``: a FAISS index over external labels, kept by a replica that follows the log.

The state of record is the store (``retrieval.store``: items with their vectors, and the log of
index operations), in a SQLite file or a PostgreSQL schema. A ``VectorIndex`` is one replica of
it: a FAISS index in memory plus a local snapshot (a cache) in its own ``index_dir``, and the
log seq it has applied. Any number of replicas, on any nodes, may share one store (PostgreSQL,
or one SQLite file on one node): each can write, and each follows the writes of the others.

Durability: a write is acknowledged once its transaction (item row + log entries) has
committed. FAISS is saved as an atomic snapshot (temp file, fsync, rename, then a manifest
naming it, renamed the same way) that records the last log entry it contains; on start the
snapshot is loaded and the entries after it are replayed. With no usable snapshot (none yet, a
new node, another store's) the replica builds from ``items``, which hold every live vector.

Following: ``catch_up()`` applies the entries after the replica's applied seq. It runs before a
search when the last catch-up is older than ``max_staleness_s``, on a timer every
``follow_interval_s``, and after a write that another replica's write preceded. Each replica
records its applied seq and a heartbeat in the store's ``replicas`` table; the log is
truncated (at snapshots) only through the lowest applied seq of replicas whose heartbeat is
younger than ``replica_timeout_s``. A replica that was away longer finds its next entries gone
(below the store's ``truncated_through``) and rebuilds from ``items``: no replica ever skips an
operation.

One process uses one ``index_dir`` (an exclusive file lock says so). Calls are serialised
by a lock: FAISS searches are multi-threaded inside, and adds must not race them.

Shards: ``shard=(s, n)`` makes a replica hold only shard ``s`` of ``n`` (``retrieval.shards``).
All shards share the store and the log; a shard reads both through ``_ShardStore``, which keeps
only the items and log entries whose FAISS label ``% n == s``, so its builds, replays, counts
and exact scans see its own vectors alone. Writes, ``get`` and ``find`` stay store-level (any
shard takes them; the shard owning the new label applies it when it catches up). Every vector
is indexed by exactly one shard, so the shards' top-k lists merge (``shards.merge_hits``)
into one index's answer.

Rebuilds (compaction, a change of kind as the collection grows) run in a background thread and
never hold the lock while they build: the thread reads the live vectors in one consistent view
of the store (at log entry ``seq``), builds and tunes the new index, writes its snapshot file,
then replays the log entries written meanwhile; only the last few entries and the swap itself
run under the lock. Writes go on into the old index and the log (whose entries after ``seq``
are kept until the swap), so nothing acknowledged meanwhile is lost, in memory or on disk.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retrieval import ann
from retrieval.config import IndexConfig
from retrieval.schemas import ItemMetadata, SearchFilters, SearchParams
from retrieval.shards import ShardMap, search_with_ties
from retrieval.store import BATCH, Item, MetadataStore, Op, StoreReader, Written
from visionroute.errors import ConfigError, Conflict, InputError, NotFound
from visionroute.state import StateConfig

log = logging.getLogger(__name__)

# Every open index, so the interpreter's exit can stop their background threads first: a daemon
# thread still inside FAISS (OpenMP) while Python tears down its modules crashes the process.
_OPEN_INDEXES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_background_work(timeout_s: float = 30.0) -> None:
    """Stop followers and cancel rebuilds of indexes nobody closed (nothing is written)."""
    for index in list(_OPEN_INDEXES):
        index._stop_following.set()
        index._generation += 1  # a running rebuild stops at its next chunk
    for index in list(_OPEN_INDEXES):
        for thread in (getattr(index, "_follower", None), getattr(index, "_rebuild_thread", None)):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout_s)


MANIFEST = "snapshot.json"
FORMAT_VERSION = 1
NORM_TOLERANCE = 1e-3
REBUILD_ATTEMPTS = 3


class _Cancelled(Exception):
    """A background rebuild was overtaken by close() or reload()."""


class _LogTruncated(Exception):
    """The log no longer holds the entries after the seq a replica has applied."""


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
    hits: list[ScoredItem]  # best first (ties: lower item id first), never padding, at most k
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


def _lower_thread_priority(nice: int) -> None:
    """Linux applies setpriority to one thread when given its id: the rebuild yields the cores
    to the request threads (and its OpenMP workers, started from it, inherit the value)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        thread = threading.get_native_id()
        # relative to what the thread has (Ray's workers already run niced): never raised
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))
    except OSError as exc:  # a container may forbid it: the rebuild still runs, unniced
        log.info("could not lower the rebuild thread's priority: %s", exc)


def _ops_after(view: StoreReader, seq: int):
    """The log entries after ``seq`` in ``view``; ``_LogTruncated`` when some are gone."""
    if view.truncated_through() > seq:
        raise _LogTruncated(f"the log is truncated through {view.truncated_through()}, past seq {seq}")
    return view.ops_after(seq)


def _follow(index_ref: weakref.ref, stop: threading.Event, interval_s: float) -> None:
    """The follower timer: a weak reference, so an index dropped without close() is collected."""
    while not stop.wait(interval_s):
        index = index_ref()
        if index is None:
            return
        try:
            index._timed_catch_up(stop)
        except Exception as exc:  # e.g. the database is down: the next tick tries again
            log.warning("replica %s could not catch up: %r", index.replica_id, exc)
        del index


class _ShardReader(StoreReader):
    """The store's reads as shard ``shard`` of ``shards`` sees them: only items and log entries
    whose label it holds. Everything else (log bounds, items by label, settings) is inherited
    unchanged, store-level."""

    def __init__(self, conn, shards: ShardMap, shard: int) -> None:
        super().__init__(conn)
        self.shards, self.shard = shards, shard

    def count(self) -> int:
        # In SQL: a search counts on every call, and the count needs no rows.
        return int(
            self.conn.execute(
                "SELECT COUNT(*) FROM items WHERE label % ? = ?", (self.shards.n_shards, self.shard)
            ).fetchone()[0]
        )

    def live_labels(self) -> np.ndarray:
        labels = super().live_labels()
        return labels[self.shards.holds(labels, self.shard)]

    def iter_vectors(self, batch: int = BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for labels, vectors in super().iter_vectors(batch):
            mine = self.shards.holds(labels, self.shard)
            if mine.any():
                yield labels[mine], vectors[mine]

    def ops_after(self, seq: int, batch: int = 1000) -> Iterator[Op]:
        # A remove names the label its add gave, so both entries of a vector reach one shard.
        for op in super().ops_after(seq, batch):
            if self.shards.shard_of(op.label) == self.shard:
                yield op

    def matching(self, filters: SearchFilters, *, with_vectors: bool) -> tuple[np.ndarray, np.ndarray | None]:
        labels, vectors = super().matching(filters, with_vectors=with_vectors)
        mine = self.shards.holds(labels, self.shard)
        if vectors is not None:
            vectors = vectors[mine] if mine.any() else None  # None when none, like the store
        return labels[mine], vectors

    def count_matching(self, filters: SearchFilters) -> int:
        return len(self.matching(filters, with_vectors=False)[0])


class _ShardStore:
    """The read-only face of a shared ``MetadataStore`` that one shard builds, replays and
    scans through (what ``VectorIndex`` reads from ``self.store`` for its own vectors)."""

    def __init__(self, store: MetadataStore, shard: tuple[int, int]) -> None:
        self.store = store
        self.shards, self.shard = ShardMap(shard[1]), shard[0]

    @contextmanager
    def consistent_view(self) -> Iterator[_ShardReader]:
        with self.store.consistent_view() as view:
            yield _ShardReader(view.conn, self.shards, self.shard)

    @contextmanager
    def _reader(self) -> Iterator[_ShardReader]:
        with self.store.database.read() as conn:
            yield _ShardReader(conn, self.shards, self.shard)

    def count(self) -> int:
        with self._reader() as reader:
            return reader.count()

    def count_matching(self, filters: SearchFilters) -> int:
        with self._reader() as reader:
            return reader.count_matching(filters)

    def matching(self, filters: SearchFilters, *, with_vectors: bool) -> tuple[np.ndarray, np.ndarray | None]:
        with self._reader() as reader:
            return reader.matching(filters, with_vectors=with_vectors)


def _check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    valid = (
        isinstance(shard, (tuple, list))
        and len(shard) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shard)
        and shard[1] >= 1
        and 0 <= shard[0] < shard[1]
    )
    if not valid:
        raise ConfigError(
            f"shard must be (index, count) with 0 <= index < count, got {shard!r}", field="shard"
        )
    return int(shard[0]), int(shard[1])


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
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dim = int(dim)
        self.space = space
        self.config = config or IndexConfig()
        self.shard = _check_shard(shard)
        self.replica_id = replica_id or f"{socket.gethostname()}:{self.dir.resolve()}"
        self._lock = threading.RLock()
        self._ops_since_snapshot = 0
        self._tuning: dict | None = None
        self._generation = 0  # bumped by reload()/close(): a rebuild started before is dropped
        self._rebuild_thread: threading.Thread | None = None
        self._rebuild_error: BaseException | None = None
        self._rebuild_state: dict = {"running": False}
        self._log_floor: int | None = None  # log entries after this stay while a rebuild runs
        self._applied_seq = 0  # the last log entry the in-memory index reflects
        self._rebuilds_from_items = 0  # start-ups without a usable snapshot, falls off the log
        self._caught_up_at = time.monotonic()  # when the index last reflected the whole log
        self._heartbeat_at = float("-inf")
        self._stop_following = threading.Event()
        self._follower: threading.Thread | None = None
        _OPEN_INDEXES.add(self)
        self.store: MetadataStore | None = None
        self._lock_file = open(self.dir / "writer.lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise Conflict(
                f"index_dir {str(self.dir)!r} is open in another process; each replica needs its own index_dir",
                field="index_dir",
            ) from None
        try:
            self.store = MetadataStore(store_path or self.dir / "items.sqlite", state, name)
            self._check_identity()
            self._load()
        except BaseException:
            self._abandon()  # e.g. the database went away mid-start: nothing half-open stays
            raise
        self._start_following()

    @property
    def _own(self) -> MetadataStore | _ShardStore:
        """What this replica indexes: the store, or only its shard of it."""
        if self.shard[1] == 1 or self.store is None:
            return self.store
        return _ShardStore(self.store, self.shard)

    def _holds(self, label: int) -> bool:
        return ShardMap(self.shard[1]).shard_of(label) == self.shard[0]

    # start-up -------------------------------------------------------------------------------
    def _check_identity(self) -> None:
        # The first opener records what the store holds; "store_id" lets a local snapshot tell
        # whether it was made from this store (a cache must not outlive a new database).
        saved = self.store.settings_once(
            {"dim": str(self.dim), "space": self.space, "store_id": uuid.uuid4().hex}
        )
        self.store_id = saved["store_id"]
        if int(saved["dim"]) != self.dim or saved["space"] != self.space:
            raise ConfigError(
                f"the index in {self.store.database.location} holds {saved['dim']}-d vectors from embedder "
                f"{saved['space']!r}, but the configured embedder {self.space!r} makes {self.dim}-d "
                "vectors; use another index_dir or re-index the images with this embedder",
                field="retrieval.embedder",
            )

    def _usable_manifest(self) -> dict | None:
        """The local snapshot's manifest, unless it belongs to another store or is ahead of it."""
        manifest_path = self.dir / MANIFEST
        if not manifest_path.is_file():
            return None
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("store_id", self.store_id) != self.store_id:
            log.warning("snapshot in %s was made from another store; rebuilding from this one", self.dir)
            return None
        if tuple(manifest.get("shard", (0, 1))) != self.shard:
            log.warning(
                "snapshot in %s holds shard %s, this replica is shard %s; rebuilding from the store",
                self.dir,
                manifest.get("shard", [0, 1]),
                list(self.shard),
            )
            return None
        if int(manifest["applied_seq"]) > self.store.last_seq():
            log.warning("snapshot in %s is ahead of the store's log; rebuilding from the store", self.dir)
            return None
        return manifest

    def _load(self) -> None:
        self.index: faiss.IndexIDMap2 | None = None
        self._tombstones: set[int] = set()
        self._applied_seq = 0
        for leftover in self.dir.glob("*.tmp"):
            leftover.unlink()  # a snapshot interrupted by a crash; the manifest never named it
        manifest = self._usable_manifest()
        if manifest is None:
            self._rebuild(reason="no snapshot")
            return
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
            raise ConfigError(
                f"snapshot {index_path.name} holds {saved_dim}-d vectors, the embedder {self.space!r} makes {self.dim}-d",
                field="retrieval.embedder",
            )
        snapshot_seq = int(manifest["applied_seq"])
        self._applied_seq = snapshot_seq
        self.kind = ann.kind_of(self.index)
        self._default_params = ann.default_params(self.index, self.config)
        self._heartbeat(force=True)  # from now on the log keeps what this replica needs
        try:
            # Replay and the live set from one view: other replicas may write meanwhile.
            with self._own.consistent_view() as view:
                replayed = self._apply_log(view)
                live = view.live_labels()
        except _LogTruncated:
            self._rebuild(reason="the log no longer holds the entries after the snapshot")
            return
        self._ops_since_snapshot = replayed
        log.info("loaded %s snapshot at seq %d, replayed %d ops", self.kind, snapshot_seq, replayed)
        stored = faiss.vector_to_array(self.index.id_map)
        self._tombstones = set(np.setdiff1d(stored, live).tolist())
        missing = np.setdiff1d(live, stored)
        if len(missing):
            # The log should make this impossible; rebuilding from the store is always right.
            log.warning("snapshot lacks %d live items; rebuilding from the store", len(missing))
            self._rebuild(reason="snapshot behind the store")

    # following the log (under the lock) ----------------------------------------------------
    def _apply_op(self, op: Op) -> None:
        # The shard's views hold only its entries, but this replica's own writes do not: another
        # shard's entry only moves the applied seq on.
        if self._holds(op.label):
            if op.op == "add":
                self._faiss_add(np.array([op.label], np.int64), op.vector[None, :])
            else:
                self._faiss_remove(op.label)
            self._ops_since_snapshot += 1
        self._applied_seq = op.seq

    def _apply_log(self, view: StoreReader) -> int:
        """Apply every entry after the applied seq that ``view`` holds; returns how many."""
        newest = view.last_seq()
        count = 0
        for op in _ops_after(view, self._applied_seq):
            self._apply_op(op)
            count += 1
        # Everything through ``newest`` is applied now (sequence gaps on PostgreSQL included).
        self._applied_seq = max(self._applied_seq, newest)
        return count

    def _apply_written(self, written: Written) -> None:
        """Apply this replica's own committed write: directly when nothing came between it and
        what was applied, else by catching up (which reads it back in seq order)."""
        if written.previous_seq == self._applied_seq:
            for op in written.ops:
                self._apply_op(op)
            self._caught_up_at = time.monotonic()
        else:
            self._catch_up_locked(after=False)

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
                applied = self._apply_log(view)
        except _LogTruncated as exc:
            log.warning(
                "replica %s missed truncated log entries (%s); rebuilding from the items",
                self.replica_id,
                exc,
            )
            before = self._applied_seq
            self._rebuild(reason="log truncated past this replica")
            applied = self._applied_seq - before
        self._caught_up_at = started
        self._heartbeat(force=applied > 0)
        if after:
            self._after_ops()
        return applied

    def _maybe_catch_up(self) -> None:
        if time.monotonic() - self._caught_up_at > self.config.max_staleness_s:
            self._catch_up_locked()

    def _needed_seq(self) -> int:
        """The seq after which this replica needs the log: its applied seq, or a running
        rebuild's starting point when lower."""
        floor = self._log_floor
        return self._applied_seq if floor is None else min(self._applied_seq, floor)

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._heartbeat_at >= self.config.replica_timeout_s / 4:
            self.store.heartbeat(self.replica_id, self._needed_seq())
            self._heartbeat_at = now

    def _start_following(self) -> None:
        interval = self.config.follow_interval_s
        if interval is None:
            return
        self._follower = threading.Thread(
            target=_follow,
            args=(weakref.ref(self), self._stop_following, interval),
            name=f"index-follow:{self.dir.name}",
            daemon=True,
        )
        self._follower.start()

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

    def _build(self, store: MetadataStore | _ShardStore, cancelled=lambda: False) -> _Built:
        """A new index of the right kind over ``store``'s live vectors, tuned, not yet shared.

        One consistent view makes the vectors and ``seq`` agree. ``tune_queries`` live
        vectors (at most a tenth) are held out of the build: they are the tuner's queries, with
        exact top-10 ground truth over the rest, and are added once the knobs are chosen.
        """
        with store.consistent_view() as view:
            seq, n = view.last_seq(), view.count()
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
            for labels, vectors in view.iter_vectors():  # pass 1: held-out queries, training sample
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
                for labels, vectors in view.iter_vectors():
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
        tuning = ann.tune(index, held_vectors, truth, self.config, k=k)
        if n_held:
            index.add_with_ids(held_vectors, held_labels)
        log.info("built %s over %d items; tuning %s", kind, n, tuning.as_dict())
        return _Built(index, kind, seq, tuning)

    def _rebuild(self, reason: str) -> None:
        """Build in the calling thread from the items (start-up without a usable snapshot, or
        a replica whose log entries were truncated), follow the log from there, snapshot."""
        started = time.perf_counter()
        for attempt in range(1, REBUILD_ATTEMPTS + 1):
            # Registered first, at the log's current floor: from here on no live replica
            # truncates past it, so the entries after the build's seq stay until applied.
            # (Not as the applied seq yet: if the build fails, the old index has not.)
            self.store.heartbeat(self.replica_id, self.store.truncated_through())
            self._heartbeat_at = time.monotonic()
            built = self._build(self._own)
            self.index, self.kind, self._tombstones = built.index, built.kind, set()
            self._default_params = ann.default_params(built.index, self.config)
            self._tuning = built.tuning.as_dict()
            self._applied_seq = built.seq
            try:
                with self._own.consistent_view() as view:
                    self._apply_log(view)
                break
            except _LogTruncated:
                if attempt == REBUILD_ATTEMPTS:
                    raise
                log.warning("log truncated during a rebuild (attempt %d); building again", attempt)
        self._caught_up_at = time.monotonic()
        self._rebuilds_from_items += 1
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
            self._heartbeat(force=True)
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
        _lower_thread_priority(self.config.rebuild_nice)
        store = self._own  # thread-safe: this thread gets its own connection
        index_file = None
        try:
            built = self._build(store, cancelled=lambda: generation != self._generation)
            # Catch up with the log outside the lock, then write the snapshot file outside it too.
            with store.consistent_view() as view:
                last, caught_up = self._apply_ops(built.index, built.kind, _ops_after(view, built.seq))
            seq = max(built.seq, last)
            index_file = self.dir / f"rebuild-{seq:012d}.faiss"
            _write_atomic(index_file, lambda tmp: faiss.write_index(built.index, str(tmp)))
            with self._lock:
                if generation != self._generation or self.store is None:
                    raise _Cancelled
                # The few entries written since the catch-up, then the swap.
                with self._own.consistent_view() as view:
                    _, late = self._apply_ops(built.index, built.kind, _ops_after(view, seq))
                    newest = view.last_seq()
                    live = view.live_labels()
                stored = faiss.vector_to_array(built.index.id_map)
                tombstones = set(np.setdiff1d(stored, live).tolist())
                before = {"kind": self.kind, "stored_vectors": int(self.index.ntotal)}
                self.index, self.kind, self._tombstones = built.index, built.kind, tombstones
                self._default_params = ann.default_params(built.index, self.config)
                self._tuning = built.tuning.as_dict()
                self._applied_seq = max(seq, newest)
                self._caught_up_at = time.monotonic()
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
            written = self.store.upsert_logged(item_id, vector, metadata)
            # Durable from here: a crash now is repaired by replaying the log on start.
            self._apply_written(written)
            self._after_ops()
        return written.item_id

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

    def _after_ops(self) -> None:
        # While a rebuild runs, its swap is the next snapshot (the log keeps what it needs).
        if self._ops_since_snapshot >= self.config.snapshot_every_ops and not self.is_rebuilding():
            self.maintain()

    def maintain(self) -> None:
        """Catch up and snapshot; when deletes piled up or the collection outgrew its kind,
        also start a background rebuild (the write that got here does not wait for it)."""
        with self._lock:
            self._catch_up_locked(after=False)
            n = self._own.count()  # a shard's kind fits its own share
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
        """Save the in-memory index (through the applied seq) and truncate what it covers."""
        with self._lock:
            seq = self._applied_seq
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
            "store_id": self.store_id,
            "shard": list(self.shard),
            "stored_vectors": int(self.index.ntotal),
            "tuning": self._tuning,
            "saved_at": time.time(),
        }
        _write_atomic(self.dir / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        # Only now that the manifest covering them is durable may the log entries go; a running
        # rebuild still needs those after the seq it started from, and every live replica those
        # after its applied seq (the store takes the lowest of them).
        floor = self._log_floor
        self._heartbeat(force=True)
        self.store.truncate_log(
            seq if floor is None else min(seq, floor), replica_timeout_s=self.config.replica_timeout_s
        )
        for old in [*self.dir.glob("index-*.faiss"), *self.dir.glob("rebuild-*.faiss")]:
            if old.name != index_file and (floor is None or old.name.startswith("index-")):
                old.unlink(missing_ok=True)

    def reload(self) -> None:
        """Drop the in-memory index and load snapshot + log again (what a restart does); a
        background rebuild started before is dropped."""
        try:
            with self._lock:
                self._generation += 1
                self._load()
        except ConfigError:
            self.close()  # outside the lock: close() waits for threads that may want it
            raise

    def replica_stats(self) -> dict:
        """How far this replica is behind the log: entries (``lag_ops``) and seconds since it
        last reflected the whole log (``lag_s``; 0 when it does now)."""
        with self._lock:
            newest, truncated = self.store.log_bounds()
            applied = self._applied_seq
            # Counted, not subtracted: PostgreSQL's sequences leave gaps.
            lag_ops = self.store.count_ops_after(applied) if applied >= truncated else newest - applied
            lag_s = 0.0 if lag_ops == 0 else round(time.monotonic() - self._caught_up_at, 3)
            return {
                "replica_id": self.replica_id,
                "applied_seq": applied,
                "last_seq": newest,
                "lag_ops": int(lag_ops),
                "lag_s": lag_s,
                "rebuilds_from_items": self._rebuilds_from_items,
            }

    def stats(self) -> dict:
        with self._lock:
            items = self.store.count()
            return {
                "kind": self.kind,
                "items": items,  # the whole store, every shard's
                "shard": list(self.shard),
                "shard_items": items if self.shard[1] == 1 else self._own.count(),
                "stored_vectors": int(self.index.ntotal),
                "tombstones": len(self._tombstones),
                "dim": self.dim,
                "space": self.space,
                "index_bytes": ann.index_bytes(self.index),
                "ops_since_snapshot": self._ops_since_snapshot,
                **self.replica_stats(),
                "backend": self.store.backend,
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
        """Stop following, drop a running rebuild, snapshot pending operations (a fast next
        start), then release the store and lock."""
        self._stop_following.set()
        follower = self._follower
        if follower is not None and follower is not threading.current_thread():
            follower.join()
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
            if self.store is not None:
                self.store.close()
                self.store = None
            self._release_dir()

    def _abandon(self) -> None:
        """Release the store and the directory without a snapshot (a start that failed)."""
        if self.store is not None:
            self.store.close()
            self.store = None
        self._release_dir()

    def _release_dir(self) -> None:
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

        A replica whose last catch-up is older than ``max_staleness_s`` catches up first.
        Filters matching few items are answered by an exact scan over those items' vectors;
        otherwise the ANN search runs with a selector, and if the selector starved it (HNSW or
        IVF may return fewer than k under a selective filter) the exact scan answers instead,
        so a filter with at least k matches always yields k results. Equal scores are ordered
        by item id, and the k-th place goes to the lowest id among those tied for it (what
        makes results merged over shards equal to one index's).
        """
        k = self.check_k(k)
        query = self._check_vectors(query, "query")
        filters = filters or SearchFilters()
        params = params or SearchParams()
        with self._lock:
            self._maybe_catch_up()
            # Counts, scans and exclusions are this shard's: another's labels are never found here.
            exclude_labels = frozenset(label for label in exclude_labels if self._holds(label))
            want = k + len(exclude_labels)
            if filters.is_empty():
                n_allowed = self._own.count()
                allowed = None
            else:
                n_allowed = self._own.count_matching(filters)
                allowed = True
            expected = min(k, max(0, n_allowed - len(exclude_labels)))
            if n_allowed == 0:
                return SearchResult([], exact=False)
            exact = params.exact or (allowed is not None and n_allowed <= self.config.exact_filter_max_items)
            if not exact:
                inner = None  # a selector's inner selector must outlive the search
                if allowed is not None:
                    labels, _ = self._own.matching(filters, with_vectors=False)
                    selector = faiss.IDSelectorBatch(labels)
                elif self._tombstones:
                    inner = faiss.IDSelectorBatch(np.fromiter(self._tombstones, np.int64))
                    selector = faiss.IDSelectorNot(inner)
                else:
                    selector = None
                request = self._request_params(params)

                def ann_search(n: int) -> tuple[np.ndarray, np.ndarray]:
                    scores, labels = ann.search(self.index, self.kind, query, n, request, selector)
                    return scores[0], labels[0]

                scores, labels = search_with_ties(ann_search, want, max(1, self.index.ntotal))
                del selector, inner
                hits = self._hits(scores, labels, exclude_labels, k)
                if len(hits) >= expected:
                    return SearchResult(hits, exact=False)
                log.debug("ANN returned %d of %d under filters; exact scan", len(hits), expected)
            labels, vectors = self._own.matching(filters, with_vectors=True)
            if vectors is None:
                vectors = np.zeros((0, self.dim), np.float32)

            def exact_search(n: int) -> tuple[np.ndarray, np.ndarray]:
                scores, found = ann.exact_search(vectors, labels, query, n)
                return scores[0], found[0]

            scores, found = search_with_ties(exact_search, want, max(1, len(labels)))
            return SearchResult(self._hits(scores, found, exclude_labels, k), exact=True)

    def _hits(
        self, scores: np.ndarray, labels: np.ndarray, exclude: frozenset[int], k: int
    ) -> list[ScoredItem]:
        # -1 is FAISS's padding when fewer than k results exist; tombstones are deleted items;
        # a label without an item was removed by a write this replica has not applied yet.
        keep = [
            (float(score), int(label))
            for score, label in zip(scores, labels)
            if label >= 0 and int(label) not in exclude and int(label) not in self._tombstones
        ]
        items = self.store.items_by_label([label for _, label in keep])
        hits = [ScoredItem(items[label], score) for score, label in keep if label in items]
        hits.sort(key=lambda hit: (-hit.score, hit.item.id))
        return hits[:k]
