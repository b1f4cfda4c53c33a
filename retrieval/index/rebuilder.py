"""Building a new FAISS index from the store's live vectors, and the background rebuild thread.

``build`` reads the live vectors in one consistent view of the store (at log entry ``seq``),
chooses the kind for their number, trains IVF-PQ on a sample, and tunes the search knobs on
held-out vectors before adding them too. It is what a replica does at start without a usable
snapshot, and what a background rebuild (compaction, a change of kind) does.

``BackgroundRebuild`` runs one rebuild at a time without holding the replica's lock while it
builds: it builds, replays the log entries written meanwhile and writes its snapshot file
outside the lock; only the last few entries and the swap run under it. Writes go on into the
old index and the log (whose entries after ``log_floor`` are kept until the swap), so nothing
acknowledged meanwhile is lost. ``cancel()`` (a reload, a close) makes a running rebuild stop
at its next chunk, or before its swap.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np

from retrieval import ann
from retrieval.config import IndexConfig
from retrieval.index.faiss_index import FaissIndex
from retrieval.index.log_follower import ops_after
from retrieval.index.snapshots import SnapshotDir

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """A background rebuild was overtaken by close() or reload()."""


class VectorSource(Protocol):
    """What a build reads: the store, or one shard's view of it (``shard_view.ShardStore``)."""

    def consistent_view(self): ...  # a context manager yielding a StoreReader


@dataclass
class Built:
    index: FaissIndex
    seq: int  # the last log entry the index contains


def build(
    source: VectorSource, dim: int, config: IndexConfig, cancelled: Callable[[], bool] = lambda: False
) -> Built:
    """A new index of the right kind over ``source``'s live vectors, tuned, not yet shared.

    One consistent view makes the vectors and ``seq`` agree. ``tune_queries`` live vectors (at
    most a tenth) are held out of the build: they are the tuner's queries, with exact top-10
    ground truth over the rest, and are added once the knobs are chosen. ``Cancelled`` as soon
    as ``cancelled()`` says so (checked after every chunk read).
    """
    with source.consistent_view() as view:
        seq, n = view.last_seq(), view.count()
        kind = ann.choose_kind(config, n)
        tuned = kind != "exact" and config.target_recall is not None
        n_held = min(config.tune_queries, n // 10) if tuned else 0
        if n_held < 10:
            n_held = 0
        held_positions = np.sort(np.random.default_rng(n).choice(n, n_held, replace=False))
        held_labels, held_vectors, train = [], [], []
        nlist = ann.ivf_nlist(config, n) if kind == "ivfpq" else 1
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
                raise Cancelled
        held_labels = np.concatenate(held_labels) if held_labels else np.zeros(0, np.int64)
        held_vectors = np.concatenate(held_vectors) if held_vectors else np.zeros((0, dim), np.float32)
        index = ann.build_index(kind, dim, config, np.concatenate(train) if train else None)
        held_set = set(held_labels.tolist())

        def indexed_chunks():  # pass 2: add everything but the held-out vectors
            for labels, vectors in view.iter_vectors():
                keep = ~np.isin(labels, held_labels) if held_set else slice(None)
                index.add_with_ids(np.ascontiguousarray(vectors[keep]), labels[keep])
                if cancelled():
                    raise Cancelled
                yield labels[keep], vectors[keep]

        k = min(10, max(1, n - n_held))
        if n_held:
            truth = ann.exact_top_k(indexed_chunks(), held_vectors, k)
        else:
            for _ in indexed_chunks():
                pass
            truth = np.zeros((0, k), np.int64)
    tuning = ann.tune(index, held_vectors, truth, config, k=k)
    if n_held:
        index.add_with_ids(held_vectors, held_labels)
    log.info("built %s over %d items; tuning %s", kind, n, tuning.as_dict())
    return Built(FaissIndex(index, config, kind=kind, tuning=tuning.as_dict()), seq)


def lower_thread_priority(nice: int) -> None:
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


# ``swap(index, snapshot_seq, applied_seq, index_file, late_ops)``, under the replica's lock:
# make ``index`` the replica's (it reflects the log through ``applied_seq``; ``index_file``
# holds it through ``snapshot_seq``); returns what it replaced ({"kind", "stored_vectors"}).
Swap = Callable[[FaissIndex, int, int, str, int], dict]


class BackgroundRebuild:
    """The replica's one background rebuild, and what the last one did (``state``).

    ``source()`` is what the replica indexes (None once it closed: the rebuild is dropped);
    ``lock`` is the replica's, held only for the late entries and ``swap``.
    """

    def __init__(
        self,
        *,
        dim: int,
        lock: threading.RLock,
        source: Callable[[], VectorSource | None],
        snapshots: SnapshotDir,
        swap: Swap,
    ) -> None:
        self.dim, self.lock = dim, lock
        self.source, self.snapshots, self.swap = source, snapshots, swap
        self.generation = 0  # bumped by cancel(): a rebuild started before is dropped
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.state: dict = {"running": False}
        self.log_floor: int | None = None  # log entries after this stay while a rebuild runs

    def is_running(self) -> bool:
        thread = self.thread
        return thread is not None and thread.is_alive()

    def start(self, reason: str, config: IndexConfig, log_floor: int, register: Callable[[], None]) -> bool:
        """Start a rebuild with ``config`` (the caller holds the lock); False when one is
        already running.

        ``log_floor`` is a lower bound of the seq the build will read at; ``register()`` (the
        replica's heartbeat) reports it to the store before the thread starts, so no replica
        truncates the entries the rebuild will replay.
        """
        if self.is_running():
            return False
        self.log_floor = log_floor
        register()
        self.error = None
        self.state = {"running": True, "reason": reason, "started_at": time.time()}
        self.thread = threading.Thread(
            target=self._run,
            args=(reason, config, self.generation),
            name=f"index-rebuild:{self.snapshots.path.name}",
            daemon=True,
        )
        self.thread.start()
        return True

    def cancel(self) -> None:
        """A running rebuild stops at its next chunk, or at the swap it may no longer make."""
        self.generation += 1

    def join(self, timeout: float | None = None) -> None:
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a running rebuild; re-raises what made it fail."""
        self.join(timeout)
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _run(self, reason: str, config: IndexConfig, generation: int) -> None:
        started = time.perf_counter()
        threads = config.rebuild_threads or max(1, faiss.omp_get_max_threads() - 1)
        faiss.omp_set_num_threads(threads)  # OpenMP settings are per thread: searches keep theirs
        lower_thread_priority(config.rebuild_nice)
        source = self.source()  # thread-safe: this thread gets its own connection
        index_file = None
        try:
            if source is None:
                raise Cancelled
            built = build(source, self.dim, config, cancelled=lambda: generation != self.generation)
            new = built.index
            # Catch up with the log outside the lock, then write the snapshot file outside it too.
            with source.consistent_view() as view:
                last, caught_up = new.replay(ops_after(view, built.seq))
            seq = max(built.seq, last)
            index_file = self.snapshots.write_index(new, self.snapshots.rebuild_name(seq))
            with self.lock:
                source = self.source()
                if generation != self.generation or source is None:
                    raise Cancelled
                # The few entries written since the catch-up, then the swap.
                with source.consistent_view() as view:
                    _, late = new.replay(ops_after(view, seq))
                    newest = view.last_seq()
                    live = view.live_labels()
                new.reconcile(live)
                before = self.swap(new, seq, max(seq, newest), index_file.name, late)
                index_file = None  # the manifest names it now
                self.state = {
                    "running": False,
                    "reason": reason,
                    "before": before,
                    "kind": new.kind,
                    "seconds": round(time.perf_counter() - started, 3),
                    "ops_caught_up": caught_up + late,
                    "ops_under_lock": late,
                    "finished_at": time.time(),
                }
            log.info("background rebuild (%s) swapped in: %s", reason, self.state)
        except Cancelled:
            log.info("background rebuild (%s) dropped: the index was reloaded or closed", reason)
            self.state = {"running": False, "reason": reason, "dropped": True}
        except BaseException as exc:  # reported by stats() and re-raised by wait()
            log.exception("background rebuild (%s) failed; the current index stays", reason)
            self.error = exc
            self.state = {"running": False, "reason": reason, "error": repr(exc)}
        finally:
            if index_file is not None:
                index_file.unlink(missing_ok=True)
            with self.lock:
                self.log_floor = None
