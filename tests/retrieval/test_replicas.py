"""Replicas following the shared log, on both backends: two ``VectorIndex`` objects with their
own ``index_dir`` and one store (a shared SQLite file, or one PostgreSQL schema) are two
replicas. Writes through either are found by the other; truncation waits for live replicas;
one that fell behind a truncation rebuilds from the items; one with an empty directory starts
from the store alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from retrieval.index import VectorIndex
from retrieval.schemas import ItemMetadata, SearchFilters
from tests.retrieval.conftest import manual_follow_config as config
from tests.retrieval.conftest import unit_vectors

DIM = 8


@pytest.fixture
def open_replica(tmp_path, state):
    """Opens replicas of one index; each has its own directory, all share the store."""
    opened: list[VectorIndex] = []

    def open_one(name: str, **overrides) -> VectorIndex:
        replica = VectorIndex(
            tmp_path / name, DIM, "s", config(**overrides), state, store_path=tmp_path / "shared.sqlite"
        )
        opened.append(replica)
        return replica

    yield open_one
    for replica in opened:
        replica.close()


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def top_ids(index: VectorIndex, vector: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    return [(hit.item.id, hit.score) for hit in index.search(vector, k).hits]


def brute_force(index: VectorIndex, query: np.ndarray, k: int = 5) -> list[int]:
    """The true top ids from the store itself (what every caught-up replica must answer)."""
    labels, vectors = index.store.matching(SearchFilters(), with_vectors=True)
    items = index.store.items_by_label(labels.tolist())
    ids = np.array([items[int(label)].id for label in labels])
    scores = vectors @ query
    order = np.lexsort((ids, -scores))[:k]
    return ids[order].tolist()


def test_a_write_through_one_replica_is_found_by_the_other_after_catch_up(open_replica, rng):
    a, b = open_replica("a"), open_replica("b")
    vectors = unit_vectors(rng, 50, DIM)
    a.upsert(vectors[0])
    b.catch_up()
    ids = [a.upsert(v, ItemMetadata(tags=[f"t{i}"])) for i, v in enumerate(vectors[1:], 1)]
    stats = b.stats()
    assert stats["lag_ops"] == 49 and stats["applied_seq"] < stats["last_seq"] == a.stats()["applied_seq"]
    assert top_ids(b, vectors[7], 1)[0][0] != ids[6]  # not applied yet, and the bound is an hour
    assert b.catch_up() == 49
    assert all(top_ids(b, v, 1)[0][0] == item_id for v, item_id in zip(vectors[1:], ids))
    stats = b.stats()
    assert (stats["lag_ops"], stats["lag_s"], stats["applied_seq"]) == (0, 0.0, stats["last_seq"])


def test_writes_on_both_replicas_interleave_and_both_answer_like_the_store(open_replica, rng):
    a, b = open_replica("a", max_staleness_s=0.0), open_replica("b", max_staleness_s=0.0)
    vectors = unit_vectors(rng, 60, DIM)
    ids = []
    for i, vector in enumerate(vectors):
        writer = a if i % 3 else b  # neither catches up between: each write follows the other's
        ids.append(writer.upsert(vector))
    b.delete(ids[5])
    a.upsert(vectors[0], item_id=ids[9])  # item 9 moves onto item 0's vector
    a.delete(ids[12])
    for replica in (a, b):
        assert ids[5] not in [hit.item.id for hit in replica.search(vectors[5], 3).hits]
        assert {h.item.id for h in replica.search(vectors[0], 2).hits} == {ids[0], ids[9]}
    for query in unit_vectors(rng, 20, DIM):
        expected = brute_force(a, query)
        assert [i for i, _ in top_ids(a, query)] == expected == [i for i, _ in top_ids(b, query)]
    assert a.stats()["rebuilds_from_items"] == b.stats()["rebuilds_from_items"] == 1  # only at start


def test_a_search_on_a_replica_older_than_the_bound_catches_up_first(open_replica, rng):
    a, b = open_replica("a"), open_replica("b", max_staleness_s=0.2)
    b.search(unit_vectors(rng, 1, DIM)[0], 1)
    vector = unit_vectors(rng, 1, DIM)[0]
    item_id = a.upsert(vector)
    time.sleep(0.3)  # older than the bound: a lower bound on time, never an upper one
    assert b.stats()["lag_s"] >= 0.2
    assert top_ids(b, vector, 1)[0][0] == item_id


def test_the_timer_catches_up_without_any_call(open_replica, rng):
    a, b = open_replica("a"), open_replica("b", follow_interval_s=0.05)
    ids = [a.upsert(v) for v in unit_vectors(rng, 10, DIM)]
    deadline = time.monotonic() + 60
    while b.stats()["lag_ops"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.stats()["applied_seq"] == a.stats()["applied_seq"]
    assert b.find(SearchFilters()) == ids


def test_truncation_keeps_the_entries_a_live_replica_has_not_applied(open_replica, rng):
    a, b = open_replica("a"), open_replica("b")
    vectors = unit_vectors(rng, 45, DIM)
    for vector in vectors[:30]:
        a.upsert(vector)
    a.snapshot()  # b has applied nothing yet: every entry stays
    assert a.store.truncated_through() == 0 and len(list(a.store.ops_after(0))) == 30
    b.catch_up()
    b_applied = b.stats()["applied_seq"]
    for vector in vectors[30:]:
        a.upsert(vector)
    a.snapshot()
    assert a.store.truncated_through() == b_applied  # a's snapshot covers all; b needs the rest
    assert len(list(a.store.ops_after(b_applied))) == 15
    assert b.catch_up() == 15 and b.stats()["rebuilds_from_items"] == 1  # followed, not rebuilt
    assert top_ids(b, vectors[40], 1)[0][1] == pytest.approx(1.0, abs=1e-5)


def test_a_replica_that_timed_out_and_lost_its_entries_rebuilds_and_agrees(open_replica, rng):
    a = open_replica("a", replica_timeout_s=60.0)
    b = open_replica("b", replica_timeout_s=60.0)
    vectors = unit_vectors(rng, 80, DIM)
    ids = [a.upsert(v) for v in vectors[:40]]
    b.catch_up()
    # b goes silent: its heartbeat is now older than the timeout.
    a.store.heartbeat(b.replica_id, b.stats()["applied_seq"], at=time.time() - 1000)
    ids += [a.upsert(v) for v in vectors[40:]]
    for item_id in ids[::7]:
        a.delete(item_id)
    a.upsert(vectors[1], item_id=ids[2])
    a.snapshot()
    assert a.store.truncated_through() > b.stats()["applied_seq"]  # b's next entries are gone
    b.catch_up()
    assert b.stats()["rebuilds_from_items"] == 2 and b.stats()["lag_ops"] == 0
    for query in [*vectors[::5], *unit_vectors(rng, 20, DIM)]:
        assert top_ids(b, query) == top_ids(a, query)
    assert len(b) == len(a) == 80 - len(ids[::7])


def test_a_replica_with_an_empty_directory_starts_from_the_store(open_replica, rng):
    a = open_replica("a")
    vectors = unit_vectors(rng, 50, DIM)
    ids = [a.upsert(v, ItemMetadata(tenant="x" if i % 2 else "y")) for i, v in enumerate(vectors)]
    a.delete(ids[3])
    a.snapshot()  # the log is truncated: the items are the only full copy
    fresh = open_replica("fresh")
    assert fresh.stats()["rebuilds_from_items"] == 1 and fresh.stats()["lag_ops"] == 0
    for i, vector in enumerate(vectors):
        hits = fresh.search(vector, 1).hits
        if i == 3:
            assert hits[0].item.id != ids[3]
        else:
            assert hits[0].item.id == ids[i] and hits[0].item.metadata.tenant == ("x" if i % 2 else "y")
    later = a.upsert(unit_vectors(rng, 1, DIM)[0])
    fresh.catch_up()
    assert later in fresh.find(SearchFilters())


def test_a_snapshot_made_from_another_store_is_not_used(tmp_path, state, rng):
    vectors = unit_vectors(rng, 20, DIM)
    first = VectorIndex(
        tmp_path / "dir", DIM, "s", config(), state, name="first", store_path=tmp_path / "1.sqlite"
    )
    for vector in vectors[:10]:
        first.upsert(vector)
    first.close()  # its snapshot stays in tmp_path / "dir"
    second = VectorIndex(
        tmp_path / "dir", DIM, "s", config(), state, name="second", store_path=tmp_path / "2.sqlite"
    )
    try:
        item_id = second.upsert(vectors[15])
        assert len(second) == 1 and second.stats()["stored_vectors"] == 1
        assert [h.item.id for h in second.search(vectors[0], 5).hits] == [item_id]
    finally:
        second.close()


def test_a_reopened_replica_resumes_from_its_snapshot_and_the_log(open_replica, tmp_path, state, rng):
    a, b = open_replica("a"), open_replica("b")
    vectors = unit_vectors(rng, 30, DIM)
    for vector in vectors[:20]:
        a.upsert(vector)
    b.catch_up()
    b.close()
    for vector in vectors[20:]:
        a.upsert(vector)
    a.snapshot()  # b's row is live: its entries stay
    again = open_replica("b")
    assert again.stats()["rebuilds_from_items"] == 0  # snapshot + replay of the 10 it missed
    assert again.stats()["ops_since_snapshot"] == 10 and len(again.find(SearchFilters())) == 30


def test_a_compaction_on_one_replica_while_the_other_writes_loses_nothing(open_replica, rng):
    a, b = open_replica("a"), open_replica("b")
    vectors = unit_vectors(rng, 120, DIM)
    ids = [a.upsert(v) for v in vectors[:60]]
    for item_id in ids[:20]:
        a.delete(item_id)  # tombstones for the compaction to drop
    writer = threading.Thread(target=lambda: [b.upsert(v) for v in vectors[60:]])
    writer.start()
    a.compact()
    writer.join()
    a.catch_up()
    assert a.stats()["items"] == a.stats()["stored_vectors"] == 100
    for query in [*vectors[::6], *unit_vectors(rng, 10, DIM)]:
        assert [i for i, _ in top_ids(a, query)] == brute_force(a, query)
