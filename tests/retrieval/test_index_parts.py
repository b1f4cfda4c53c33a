"""The parts of ``retrieval.index`` on their own: no ``VectorIndex``, no lock, no threads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval import ann
from retrieval.config import IndexConfig
from retrieval.index.faiss_index import FaissIndex
from retrieval.index.log_follower import LogFollower, LogTruncated
from retrieval.index.rebuilder import Cancelled, build
from retrieval.index.recovery import load_snapshot
from retrieval.index.snapshots import MANIFEST, Origin, SnapshotDir
from retrieval.schemas import ItemMetadata, SearchParams
from retrieval.shards import ShardMap
from retrieval.store import MetadataStore, Op, Written
from visionroute.errors import Conflict

DIM = 8


def unit(rng, n):
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class LogView:
    """A store view over a list of log entries (what ``StoreReader`` answers about the log)."""

    def __init__(self, ops, truncated_through=0):
        self.ops, self.truncated = ops, truncated_through

    def last_seq(self):
        return max([self.truncated, *(op.seq for op in self.ops)])

    def truncated_through(self):
        return self.truncated

    def ops_after(self, seq):
        return iter([op for op in self.ops if op.seq > seq])


class Heartbeats:
    """The one store call a follower makes while applying: its registrations, recorded."""

    def __init__(self):
        self.calls = []

    def heartbeat(self, replica_id, applied_seq):
        self.calls.append((replica_id, applied_seq))


def empty(kind, config=None):
    config = config or IndexConfig(kind=kind)
    return FaissIndex(ann.build_index(kind, DIM, config), config, kind=kind)


def test_the_follower_applies_adds_and_removes_in_order_and_skips_none():
    vectors = unit(np.random.default_rng(0), 4)
    ops = [Op(seq, "add", label, vectors[label]) for seq, label in ((1, 0), (2, 1), (4, 2))]
    ops += [Op(5, "remove", 1, None), Op(7, "add", 3, vectors[3])]
    index, follower = empty("exact"), LogFollower(Heartbeats(), "r", IndexConfig())
    assert follower.apply_log(index, LogView(ops[:3])) == 3
    assert follower.applied_seq == 4 and sorted(index.stored_labels()) == [0, 1, 2]
    # Only what comes after the applied seq is applied again.
    assert follower.apply_log(index, LogView(ops)) == 2
    assert follower.applied_seq == 7 and sorted(index.stored_labels()) == [0, 2, 3]
    assert follower.ops_since_snapshot == 5 and not index.tombstones
    scores, labels = index.searcher(vectors[3][None, :], index.request_params(SearchParams()))(1)
    assert labels.tolist() == [3] and scores[0] == pytest.approx(1.0, abs=1e-5)


def test_a_removal_from_hnsw_is_a_tombstone_its_search_skips():
    vectors = unit(np.random.default_rng(1), 20)
    ops = [Op(i + 1, "add", i, v) for i, v in enumerate(vectors)] + [Op(21, "remove", 5, None)]
    index, follower = empty("hnsw"), LogFollower(Heartbeats(), "r", IndexConfig())
    follower.apply_log(index, LogView(ops))
    assert index.tombstones == {5} and index.ntotal == 20  # HNSW cannot remove: still stored
    _, labels = index.searcher(vectors[5][None, :], index.request_params(SearchParams()))(20)
    assert 5 not in labels.tolist() and len([label for label in labels if label >= 0]) == 19
    # A live set from the store says the same: 5 is gone, and nothing live is missing.
    assert index.reconcile(np.array([i for i in range(20) if i != 5])).size == 0
    assert index.tombstones == {5}


def test_a_shard_follower_moves_past_other_shards_entries_without_indexing_them():
    vectors = unit(np.random.default_rng(2), 6)
    shards = ShardMap(2)
    follower = LogFollower(Heartbeats(), "r", IndexConfig(), holds=lambda label: shards.shard_of(label) == 1)
    index = empty("exact")
    applied = follower.apply_log(index, LogView([Op(i + 1, "add", i, v) for i, v in enumerate(vectors)]))
    held = [label for label in range(6) if shards.shard_of(label) == 1]
    assert applied == 6 and follower.applied_seq == 6
    assert sorted(index.stored_labels()) == held and follower.ops_since_snapshot == len(held)


def test_entries_truncated_past_the_applied_seq_are_never_skipped():
    vectors = unit(np.random.default_rng(3), 3)
    follower, index = LogFollower(Heartbeats(), "r", IndexConfig()), empty("exact")
    follower.applied_seq = 2
    with pytest.raises(LogTruncated, match="truncated through 5"):
        follower.apply_log(index, LogView([Op(6, "add", 0, vectors[0])], truncated_through=5))
    assert follower.applied_seq == 2 and index.ntotal == 0


def test_an_own_write_applies_directly_only_right_after_the_applied_seq():
    vectors = unit(np.random.default_rng(4), 2)
    follower, index = LogFollower(Heartbeats(), "r", IndexConfig()), empty("exact")
    follower.applied_seq = 3
    # Another replica wrote seq 4 first: this write must wait for a catch-up, in order.
    assert not follower.apply_written(index, Written(1, [Op(5, "add", 0, vectors[0])], previous_seq=4))
    assert index.ntotal == 0 and follower.applied_seq == 3
    assert follower.apply_written(index, Written(2, [Op(4, "add", 1, vectors[1])], previous_seq=3))
    assert index.stored_labels().tolist() == [1] and follower.applied_seq == 4


def test_the_heartbeat_holds_the_log_from_a_running_rebuilds_floor():
    floor = [None]
    store = Heartbeats()
    follower = LogFollower(store, "replica-a", IndexConfig(), log_floor=lambda: floor[0])
    follower.applied_seq = 40
    follower.heartbeat(force=True)
    floor[0] = 25
    follower.heartbeat()  # within a quarter of replica_timeout_s: not sent again
    follower.heartbeat(force=True)
    assert store.calls == [("replica-a", 40), ("replica-a", 25)]


def test_snapshot_dir_is_one_process_and_loads_only_its_own_origin(tmp_path):
    snapshots = SnapshotDir(tmp_path)
    with pytest.raises(Conflict, match="another process"):
        SnapshotDir(tmp_path)
    index = empty("exact")
    index.add(np.arange(3, dtype=np.int64), unit(np.random.default_rng(5), 3))
    origin = Origin(DIM, "space", "store-1", (0, 1))
    name = snapshots.write_index(index, snapshots.snapshot_name(7)).name
    snapshots.write_manifest(origin, index, 7, name)
    assert json.loads((tmp_path / MANIFEST).read_text())["index_file"] == "index-000000000007.faiss"
    assert snapshots.usable_manifest(origin, lambda: 7)["applied_seq"] == 7
    assert snapshots.usable_manifest(Origin(DIM, "space", "store-2", (0, 1)), lambda: 7) is None
    assert snapshots.usable_manifest(Origin(DIM, "space", "store-1", (1, 2)), lambda: 7) is None
    assert snapshots.usable_manifest(origin, lambda: 6) is None  # ahead of the store's log
    loaded = snapshots.read_index(snapshots.usable_manifest(origin, lambda: 7), IndexConfig())
    assert sorted(loaded.stored_labels()) == [0, 1, 2]
    # A running rebuild's file survives a snapshot; old snapshots do not.
    (tmp_path / snapshots.rebuild_name(9)).write_bytes(b"x")
    (tmp_path / snapshots.snapshot_name(3)).write_bytes(b"x")
    snapshots.remove_unnamed(name, keep_rebuilds=True)
    assert sorted(p.name for p in tmp_path.glob("*.faiss")) == [name, snapshots.rebuild_name(9)]
    snapshots.remove_unnamed(name, keep_rebuilds=False)
    assert [p.name for p in tmp_path.glob("*.faiss")] == [name]
    snapshots.release()
    SnapshotDir(tmp_path).release()  # free again


@pytest.fixture
def store(tmp_path):
    store = MetadataStore(tmp_path / "items.sqlite")
    yield store
    store.close()


def test_a_build_holds_every_live_vector_at_its_seq_and_can_be_cancelled(store):
    vectors = unit(np.random.default_rng(6), 40)
    ids = [store.upsert_logged(None, v, ItemMetadata()).item_id for v in vectors]
    store.delete_logged(ids[0])
    built = build(store, DIM, IndexConfig(kind="hnsw", target_recall=None))
    assert built.seq == store.last_seq() and built.index.kind == "hnsw"
    assert sorted(built.index.stored_labels()) == sorted(store.live_labels().tolist())
    assert len(built.index.stored_labels()) == 39
    with pytest.raises(Cancelled):
        build(store, DIM, IndexConfig(kind="hnsw"), cancelled=lambda: True)


def test_recovery_replays_the_log_after_the_snapshot_into_it(tmp_path, store):
    vectors = unit(np.random.default_rng(7), 12)
    for v in vectors[:8]:
        store.upsert_logged(None, v, ItemMetadata())
    origin = Origin(DIM, "space", "store-1", (0, 1))
    snapshots = SnapshotDir(tmp_path / "replica")
    follower = LogFollower(store, "r", IndexConfig())
    index, reason = load_snapshot(snapshots, origin, IndexConfig(), store, follower, store.last_seq)
    assert index is None and reason == "no snapshot"
    built = build(store, DIM, IndexConfig(kind="exact"))
    snapshots.write_manifest(
        origin, built.index, built.seq, snapshots.write_index(built.index, "index-a.faiss").name
    )
    for v in vectors[8:]:
        store.upsert_logged(None, v, ItemMetadata())
    store.delete_logged(1)
    index, reason = load_snapshot(snapshots, origin, IndexConfig(), store, follower, store.last_seq)
    assert reason == "" and follower.applied_seq == store.last_seq()
    assert follower.ops_since_snapshot == 5  # four adds and a remove after the snapshot
    assert sorted(index.stored_labels()) == sorted(store.live_labels().tolist())
    # A replica away long enough to be forgotten: the log is truncated past its snapshot, and
    # it must build from the items instead.
    store.forget_replica("r")
    assert store.truncate_log(store.last_seq()) == store.last_seq()
    follower.applied_seq = 0
    assert load_snapshot(snapshots, origin, IndexConfig(), store, follower, store.last_seq) == (
        None,
        "the log no longer holds the entries after the snapshot",
    )
    snapshots.release()
