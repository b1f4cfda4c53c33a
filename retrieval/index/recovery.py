"""How a replica's FAISS index comes back: its snapshot plus the log after it, or a build.

At start (and on ``reload``) the replica loads the snapshot its manifest names and replays the
log entries after it. It builds from the store's items instead when there is no usable
snapshot (none yet, another store's or shard's, unreadable, behind the store) or when the log no
longer holds the entries after it; a running replica that fell off the log (its next entries
were truncated) builds the same way. Either way no log entry is ever skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from retrieval.config import IndexConfig
from retrieval.index.faiss_index import FaissIndex
from retrieval.index.log_follower import LogFollower, LogTruncated
from retrieval.index.rebuilder import VectorSource, build
from retrieval.index.snapshots import Origin, SnapshotDir
from retrieval.store import MetadataStore
from visionroute.errors import ConfigError

log = logging.getLogger(__name__)

REBUILD_ATTEMPTS = 3


def load_snapshot(
    snapshots: SnapshotDir,
    origin: Origin,
    config: IndexConfig,
    source: VectorSource,
    follower: LogFollower,
    last_seq: Callable[[], int],
) -> tuple[FaissIndex | None, str]:
    """(the snapshot with the log replayed into it, "") or (None, why the replica must build
    from the items). ``follower`` ends at the last entry applied. A snapshot of another
    dimension is a ``ConfigError``."""
    snapshots.remove_interrupted()
    manifest = snapshots.usable_manifest(origin, last_seq)
    if manifest is None:
        return None, "no snapshot"
    try:
        index = snapshots.read_index(manifest, config)
    except RuntimeError as exc:
        log.error(
            "cannot read snapshot %s (%s); rebuilding from the store",
            snapshots.path / manifest["index_file"],
            exc,
        )
        return None, "unreadable snapshot"
    if index.dim != origin.dim:
        raise ConfigError(
            f"snapshot {manifest['index_file']} holds {index.dim}-d vectors, the embedder {origin.space!r} makes {origin.dim}-d",
            field="retrieval.embedder",
        )
    snapshot_seq = follower.applied_seq = int(manifest["applied_seq"])
    follower.heartbeat(force=True)  # from now on the log keeps what this replica needs
    try:
        # Replay and the live set from one view: other replicas may write meanwhile.
        with source.consistent_view() as view:
            replayed = follower.apply_log(index, view)
            live = view.live_labels()
    except LogTruncated:
        return None, "the log no longer holds the entries after the snapshot"
    follower.ops_since_snapshot = replayed
    log.info("loaded %s snapshot at seq %d, replayed %d ops", index.kind, snapshot_seq, replayed)
    missing = index.reconcile(live)
    if len(missing):
        # The log should make this impossible; rebuilding from the store is always right.
        log.warning("snapshot lacks %d live items; rebuilding from the store", len(missing))
        return None, "snapshot behind the store"
    return index, ""


def rebuild_from_items(
    source: VectorSource,
    store: MetadataStore,
    follower: LogFollower,
    dim: int,
    config: IndexConfig,
    install: Callable[[FaissIndex], None],
) -> FaissIndex:
    """Build in the calling thread from ``source``'s items, ``install`` it, and follow the log
    from the build's seq (built again if the log was truncated past it meanwhile)."""
    for attempt in range(1, REBUILD_ATTEMPTS + 1):
        # Registered first, at the log's current floor: from here on no live replica
        # truncates past it, so the entries after the build's seq stay until applied.
        # (Not as the applied seq yet: if the build fails, the old index has not.)
        follower.hold_log_from(store.truncated_through())
        built = build(source, dim, config)
        install(built.index)
        follower.applied_seq = built.seq
        try:
            with source.consistent_view() as view:
                follower.apply_log(built.index, view)
            break
        except LogTruncated:
            if attempt == REBUILD_ATTEMPTS:
                raise
            log.warning("log truncated during a rebuild (attempt %d); building again", attempt)
    follower.caught_up_at = time.monotonic()
    follower.rebuilds_from_items += 1
    return built.index
