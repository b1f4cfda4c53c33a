"""Shards of one index over one shared store: shard ``s`` of ``n`` indexes the vectors whose FAISS
label ``% n == s``. Three shards merged must answer exactly like one unsharded exact index (ties
included, with filters, after writes through any shard), every live item must be indexed by
exactly one shard, and a shard's snapshot must serve only that shard."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from retrieval.index import VectorIndex
from retrieval.schemas import ItemMetadata, SearchFilters, SearchParams
from retrieval.shards import merge_hits
from tests.retrieval.conftest import manual_follow_config as config
from tests.retrieval.conftest import unit_vectors
from visionroute.errors import ConfigError

DIM = 8
N_SHARDS = 3
N_DISTINCT = 240


@pytest.fixture
def open_index(tmp_path, state):
    """Opens indexes of one store, each in its own directory: ``shard=None`` is unsharded."""
    opened: list[VectorIndex] = []

    def open_one(name: str, shard: tuple[int, int] | None = None, **overrides) -> VectorIndex:
        index = VectorIndex(
            tmp_path / name,
            DIM,
            "s",
            config(**overrides),
            state,
            store_path=tmp_path / "shared.sqlite",
            shard=shard,
        )
        opened.append(index)
        return index

    yield open_one
    for index in opened:
        index.close()


def open_shards(open_index, **overrides) -> list[VectorIndex]:
    return [open_index(f"shard{s}", (s, N_SHARDS), **overrides) for s in range(N_SHARDS)]


def fill(index: VectorIndex, rng: np.random.Generator) -> np.ndarray:
    """Distinct vectors plus copies of some (equal scores), over two tenants; returns them."""
    distinct = unit_vectors(rng, N_DISTINCT, DIM)
    vectors = np.concatenate([distinct, distinct[rng.integers(0, N_DISTINCT, 60)]])
    for position, vector in enumerate(vectors):
        tenant = "acme" if position % 2 else "globex"
        index.upsert(vector, ItemMetadata(tenant=tenant, tags=[f"t{position % 5}"]))
    return vectors


def indexed_labels(index: VectorIndex) -> set[int]:
    """The labels a search of ``index`` can find: stored in FAISS and not tombstoned."""
    return set(faiss.vector_to_array(index.index.id_map).tolist()) - index._tombstones


def ranked(hits) -> list[tuple[int, float]]:
    return [(hit.item.id, hit.score) for hit in hits]


def merged_search(shards: list[VectorIndex], query: np.ndarray, k: int, **options) -> list[tuple[int, float]]:
    per_shard = [ranked(shard.search(query, k, **options).hits) for shard in shards]
    return merge_hits(per_shard, k, score=lambda h: h[1], item_id=lambda h: h[0])


def assert_merged_like_single(single, shards, queries, **options) -> int:
    """Every query and k: the merged shards' ids and scores are the single index's; returns how
    many tied scores the answers held (so a caller can check ties were exercised)."""
    ties = 0
    for query in queries:
        for k in (1, 5, 10):
            one = ranked(single.search(query, k, **options).hits)
            assert merged_search(shards, query, k, **options) == one
            ties += len(one) - len({score for _, score in one})
    return ties


def assert_partitioned(shards: list[VectorIndex], store_labels: set[int]) -> None:
    """Each live label in exactly one shard, the one its label names, and nothing else."""
    held = [indexed_labels(shard) for shard in shards]
    assert sum(len(labels) for labels in held) == len(store_labels)
    assert set().union(*held) == store_labels
    for s, labels in enumerate(held):
        assert all(label % N_SHARDS == s for label in labels)


def live_labels(index: VectorIndex) -> set[int]:
    return set(index.store.live_labels().tolist())


def test_three_shards_answer_like_one_exact_index(open_index):
    rng = np.random.default_rng(1)
    single = open_index("single")
    vectors = fill(single, rng)
    shards = open_shards(open_index)
    assert_partitioned(shards, live_labels(single))
    assert sum(shard.stats()["shard_items"] for shard in shards) == single.stats()["items"] == len(vectors)
    assert [shard.stats()["shard"] for shard in shards] == [[s, N_SHARDS] for s in range(N_SHARDS)]

    queries = np.concatenate([unit_vectors(rng, 40, DIM), vectors[N_DISTINCT : N_DISTINCT + 20]])
    assert assert_merged_like_single(single, shards, queries) > 0  # duplicates did tie
    brute = SearchParams(exact=True)  # the store scan, not FAISS: must keep the shard's labels too
    assert_merged_like_single(single, shards, queries[::4], params=brute)


@pytest.mark.parametrize("exact_filter_max_items", [0, 20_000], ids=["selector", "scan"])
def test_filtered_search_over_shards_answers_like_one(open_index, exact_filter_max_items):
    rng = np.random.default_rng(2)
    single = open_index("single", exact_filter_max_items=exact_filter_max_items)
    vectors = fill(single, rng)
    shards = open_shards(open_index, exact_filter_max_items=exact_filter_max_items)
    queries = np.concatenate([unit_vectors(rng, 15, DIM), vectors[N_DISTINCT : N_DISTINCT + 10]])
    for filters in (SearchFilters(tenant="acme"), SearchFilters(tenant="globex", tags_any=["t1", "t2"])):
        assert_merged_like_single(single, shards, queries, filters=filters)


def test_excluded_label_is_dropped_by_the_shard_holding_it(open_index):
    rng = np.random.default_rng(3)
    single = open_index("single")
    vectors = fill(single, rng)
    shards = open_shards(open_index)
    query = vectors[7]
    item = single.search(query, 1).hits[0].item  # search_by_id's query item: excluded
    exclude = frozenset({item.label})
    one = ranked(single.search(query, 5, exclude_labels=exclude).hits)
    assert item.id not in [item_id for item_id, _ in one]
    assert merged_search(shards, query, 5, exclude_labels=exclude) == one


def test_writes_through_any_shard_reach_the_shard_holding_them(open_index):
    rng = np.random.default_rng(4)
    single = open_index("single")
    fill(single, rng)
    shards = open_shards(open_index)
    ids = single.find(SearchFilters())

    added = [shards[s % N_SHARDS].upsert(v) for s, v in enumerate(unit_vectors(rng, 6, DIM))]
    replaced = ids[:12]
    old_labels = {item_id: single.get(item_id)[0].label for item_id in replaced}
    new_vectors = unit_vectors(rng, len(replaced), DIM)
    for s, (item_id, vector) in enumerate(zip(replaced, new_vectors)):
        shards[s % N_SHARDS].upsert(vector, ItemMetadata(tenant="acme"), item_id=item_id)
    deleted = ids[20:26]
    for s, item_id in enumerate(deleted):
        shards[s % N_SHARDS].delete(item_id)
    for index in [single, *shards]:
        index.catch_up()

    new_labels = {item_id: single.get(item_id)[0].label for item_id in replaced}
    moved = [i for i in replaced if old_labels[i] % N_SHARDS != new_labels[i] % N_SHARDS]
    assert moved  # some replacements changed shard: the remove and the add met different shards
    store_labels = live_labels(single)
    assert_partitioned(shards, store_labels)
    assert not set(old_labels.values()) & store_labels

    queries = np.concatenate([unit_vectors(rng, 20, DIM), new_vectors])
    assert_merged_like_single(single, shards, queries)
    assert_merged_like_single(single, shards, queries[::3], filters=SearchFilters(tenant="acme"))
    for item_id, vector in zip(replaced, new_vectors):
        top = merged_search(shards, vector, 10)
        assert [hit_id for hit_id, _ in top].count(item_id) == 1 and top[0][1] == pytest.approx(1.0)
    found = {hit_id for query in queries for hit_id, _ in merged_search(shards, query, 10)}
    assert not found & set(deleted)
    assert set(added) <= set(single.find(SearchFilters()))


def test_reopened_shard_keeps_only_its_labels(open_index, tmp_path, state):
    rng = np.random.default_rng(5)
    single = open_index("single")
    fill(single, rng)
    shard = open_index("one", (1, N_SHARDS))
    shard.snapshot()
    shard.close()
    for vector in unit_vectors(rng, 9, DIM):  # written while the shard is away: replayed on start
        single.upsert(vector)
    single.delete(single.find(SearchFilters())[0])

    again = open_index("one", (1, N_SHARDS))
    assert again.replica_stats()["rebuilds_from_items"] == 0  # its own snapshot, then the log
    mine = {label for label in live_labels(single) if label % N_SHARDS == 1}
    assert indexed_labels(again) == mine
    assert json.loads((tmp_path / "one" / "snapshot.json").read_text())["shard"] == [1, N_SHARDS]


@pytest.mark.parametrize(
    ("saved_as", "opened_as"),
    [((0, N_SHARDS), (1, N_SHARDS)), (None, (2, N_SHARDS)), ((0, N_SHARDS), None), ((0, 2), (0, N_SHARDS))],
)
def test_snapshot_of_another_shard_is_not_reused(open_index, saved_as, opened_as):
    rng = np.random.default_rng(6)
    writer = open_index("writer")
    fill(writer, rng)
    first = open_index("dir", saved_as)
    first.snapshot()
    first.close()

    reopened = open_index("dir", opened_as)
    assert reopened.replica_stats()["rebuilds_from_items"] == 1  # rebuilt, not loaded
    index, count = opened_as or (0, 1)
    assert indexed_labels(reopened) == {label for label in live_labels(writer) if label % count == index}


def test_hnsw_shards_index_each_live_item_once_after_deletes(open_index):
    # HNSW cannot remove: another shard's deletes must not become this shard's tombstones.
    rng = np.random.default_rng(7)
    single = open_index("single")
    fill(single, rng)
    shards = open_shards(open_index, kind="hnsw")
    ids = single.find(SearchFilters())
    for s, item_id in enumerate(ids[:15]):
        shards[s % N_SHARDS].delete(item_id)
    for s, item_id in enumerate(ids[15:30]):
        shards[s % N_SHARDS].upsert(unit_vectors(rng, 1, DIM)[0], item_id=item_id)
    for shard in shards:
        shard.catch_up()
        stored = set(faiss.vector_to_array(shard.index.id_map).tolist())
        assert shard._tombstones <= stored
    assert_partitioned(shards, live_labels(single))
    for shard in shards:  # a background rebuild builds and replays from the shard's view too
        shard.compact(wait=True)
        assert not shard._tombstones and shard.stats()["shard_items"] == shard.index.ntotal
    assert_partitioned(shards, live_labels(single))


@pytest.mark.parametrize("bad", [(3, 3), (-1, 3), (0, 0), (True, 2), (1.0, 2), (0, 1, 2), "01"])
def test_invalid_shard_is_refused(tmp_path, bad):
    with pytest.raises(ConfigError, match="shard"):
        VectorIndex(tmp_path / "bad", DIM, "s", config(), shard=bad)
