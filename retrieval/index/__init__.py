"""The search index: ``VectorIndex``, a FAISS index over external labels, kept by a replica
that follows the log.

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

Shards: ``shard=(s, n)`` makes a replica hold only shard ``s`` of ``n`` (``retrieval.shards``),
reading the shared store through ``shard_view``. Every vector is indexed by exactly one shard,
so the shards' top-k lists merge (``shards.merge_hits``) into one index's answer.

Rebuilds (compaction, a change of kind as the collection grows) run in a background thread and
never hold the lock while they build (``rebuilder``): only the last few log entries and the
swap itself run under the lock, so nothing acknowledged meanwhile is lost.

The parts, one job each:
- ``vector_index``: ``VectorIndex``, the facade: the lock, and the order in which the parts run;
- ``faiss_index``: ``FaissIndex``, the FAISS structure (add, remove, tombstones, search knobs);
- ``log_follower``: ``LogFollower`` (the applied seq, replaying entries, heartbeats) and the
  timer thread that catches up;
- ``recovery``: back at start: the snapshot plus the log after it, or a build from the items;
- ``rebuilder``: ``build`` from the store's live vectors (with tuning) and the background rebuild;
- ``snapshots``: the replica's directory: lock, atomic snapshot files, the manifest;
- ``searcher``: one query, by ANN with a selector or by exact scan;
- ``shard_view``: what one shard reads of the shared store.
"""

from retrieval.index.faiss_index import FaissIndex
from retrieval.index.rebuilder import lower_thread_priority
from retrieval.index.searcher import ScoredItem, SearchResult
from retrieval.index.vector_index import VectorIndex

_lower_thread_priority = lower_thread_priority  # its name before the package split

__all__ = ["FaissIndex", "ScoredItem", "SearchResult", "VectorIndex", "lower_thread_priority"]
