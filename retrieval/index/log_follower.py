"""``LogFollower``: where a replica stands in the shared operation log, and how it moves on.

The store's log holds every write (``add`` / ``remove`` of a FAISS label) in seq order. A
follower applies the entries after its ``applied_seq`` to a ``FaissIndex``, counts them towards
the next snapshot, and registers in the store's ``replicas`` table (a heartbeat with the seq it
still needs): the log is truncated only through the lowest seq that live replicas need. A
replica that was away longer finds its next entries gone (below ``truncated_through``):
``LogTruncated``, and its owner rebuilds from the items; no entry is ever skipped.

``FollowTimer`` is the background thread that asks the owner to catch up every
``follow_interval_s``; it holds the owner weakly, so an index dropped without ``close()`` is
still collected.

Not thread-safe on its own: the owner calls it under its lock.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator

from retrieval.config import IndexConfig
from retrieval.index.faiss_index import FaissIndex
from retrieval.store import MetadataStore, Op, StoreReader, Written

log = logging.getLogger(__name__)


class LogTruncated(Exception):
    """The log no longer holds the entries after the seq a replica has applied."""


def ops_after(view: StoreReader, seq: int) -> Iterator[Op]:
    """The log entries after ``seq`` in ``view``; ``LogTruncated`` when some are gone."""
    if view.truncated_through() > seq:
        raise LogTruncated(f"the log is truncated through {view.truncated_through()}, past seq {seq}")
    return view.ops_after(seq)


class LogFollower:
    """``holds(label)``: whether this replica indexes a label (its shard); entries of other
    labels only move the applied seq on. ``log_floor()``: a seq below the applied one that the
    replica still needs the log after (a running rebuild's start), or None."""

    def __init__(
        self,
        store: MetadataStore,
        replica_id: str,
        config: IndexConfig,
        *,
        holds: Callable[[int], bool] = lambda label: True,
        log_floor: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.store = store
        self.replica_id = replica_id
        self.config = config
        self.holds = holds
        self.log_floor = log_floor
        self.applied_seq = 0  # the last log entry the index reflects
        self.ops_since_snapshot = 0
        self.rebuilds_from_items = 0  # start-ups without a usable snapshot, falls off the log
        self.caught_up_at = time.monotonic()  # when the index last reflected the whole log
        self._heartbeat_at = float("-inf")

    # applying --------------------------------------------------------------------------------
    def apply_op(self, index: FaissIndex, op: Op) -> None:
        # A shard's views hold only its entries, but the replica's own writes do not: another
        # shard's entry only moves the applied seq on.
        if self.holds(op.label):
            index.apply(op)
            self.ops_since_snapshot += 1
        self.applied_seq = op.seq

    def apply_log(self, index: FaissIndex, view: StoreReader) -> int:
        """Apply every entry after the applied seq that ``view`` holds; returns how many.
        ``LogTruncated`` when the log no longer has them all."""
        newest = view.last_seq()
        count = 0
        for op in ops_after(view, self.applied_seq):
            self.apply_op(index, op)
            count += 1
        # Everything through ``newest`` is applied now (sequence gaps on PostgreSQL included).
        self.applied_seq = max(self.applied_seq, newest)
        return count

    def apply_written(self, index: FaissIndex, written: Written) -> bool:
        """Apply the replica's own committed write when nothing came between it and what was
        applied; False when another write did (the owner catches up, reading it in order)."""
        if written.previous_seq != self.applied_seq:
            return False
        for op in written.ops:
            self.apply_op(index, op)
        self.caught_up_at = time.monotonic()
        return True

    def is_stale(self) -> bool:
        """The last catch-up is older than ``max_staleness_s``."""
        return time.monotonic() - self.caught_up_at > self.config.max_staleness_s

    # registering -----------------------------------------------------------------------------
    def needed_seq(self) -> int:
        """The seq after which this replica needs the log: its applied seq, or a running
        rebuild's starting point when lower."""
        floor = self.log_floor()
        return self.applied_seq if floor is None else min(self.applied_seq, floor)

    def heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._heartbeat_at >= self.config.replica_timeout_s / 4:
            self.store.heartbeat(self.replica_id, self.needed_seq())
            self._heartbeat_at = now

    def hold_log_from(self, seq: int) -> None:
        """Register as needing the log after ``seq`` (a rebuild from the items, before its build:
        no live replica truncates past it while it runs)."""
        self.store.heartbeat(self.replica_id, seq)
        self._heartbeat_at = time.monotonic()

    def stats(self) -> dict:
        """How far behind the log: entries (``lag_ops``) and seconds since the replica last
        reflected the whole log (``lag_s``; 0 when it does now)."""
        newest, truncated = self.store.log_bounds()
        applied = self.applied_seq
        # Counted, not subtracted: PostgreSQL's sequences leave gaps.
        lag_ops = self.store.count_ops_after(applied) if applied >= truncated else newest - applied
        lag_s = 0.0 if lag_ops == 0 else round(time.monotonic() - self.caught_up_at, 3)
        return {
            "replica_id": self.replica_id,
            "applied_seq": applied,
            "last_seq": newest,
            "lag_ops": int(lag_ops),
            "lag_s": lag_s,
            "rebuilds_from_items": self.rebuilds_from_items,
        }


class FollowTimer:
    """Calls ``catch_up(stop)`` every ``interval_s`` seconds in a daemon thread until stopped.

    ``catch_up`` is a bound method held weakly: the timer ends once its object is collected.
    Its exceptions (e.g. the database is down) are logged; the next tick tries again.
    """

    def __init__(
        self, catch_up: Callable[[threading.Event], None], interval_s: float, name: str, replica_id: str
    ):
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=_follow,
            args=(weakref.WeakMethod(catch_up), self.stop_event, interval_s, replica_id),
            name=name,
            daemon=True,
        )
        self.thread.start()

    def stop(self) -> None:
        """Ask the thread to stop (it may be inside a catch-up: ``join`` waits for it)."""
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)


def _follow(
    catch_up_ref: weakref.WeakMethod, stop: threading.Event, interval_s: float, replica_id: str
) -> None:
    while not stop.wait(interval_s):
        catch_up = catch_up_ref()
        if catch_up is None:
            return
        try:
            catch_up(stop)
        except Exception as exc:  # e.g. the database is down: the next tick tries again
            log.warning("replica %s could not catch up: %r", replica_id, exc)
        del catch_up
