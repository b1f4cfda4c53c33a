"""Shards: a stable item -> shard map, and per-shard top-k merged into the same top-k as one
index (ties, i.e. duplicate vectors, broken by item id)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from retrieval.config import IndexConfig
from retrieval.index import VectorIndex
from retrieval.shards import ShardMap, merge, merge_hits, scatter, search_with_ties
from tests.retrieval.conftest import unit_vectors

DIM = 8
N_SHARDS = 3


@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=50), st.integers(1, 16))
def test_scatter_sends_each_item_to_exactly_its_shard(item_ids, n_shards):
    shards = ShardMap(n_shards)
    positions = scatter(item_ids, n_shards)
    assert sorted(p for shard in positions for p in shard) == list(range(len(item_ids)))
    for shard, held in enumerate(positions):
        assert all(shards.shard_of(item_ids[p]) == shard for p in held)
        assert held == sorted(held)  # input order kept


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_shard_count_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="n_shards"):
        ShardMap(bad)


def test_merge_orders_by_score_then_id_and_drops_padding():
    per_shard = [
        (np.array([0.9, 0.5, -np.inf]), np.array([30, 3, -1])),
        (np.array([0.9, 0.7]), np.array([12, 4])),
        (np.array([0.5]), np.array([1])),
    ]
    scores, ids = merge(per_shard, 4)
    assert ids.tolist() == [12, 30, 4, 1]
    assert scores.tolist() == pytest.approx([0.9, 0.9, 0.7, 0.5])
    hits = [[{"id": 30, "score": 0.9}], [{"id": 12, "score": 0.9}, {"id": 2, "score": 0.1}]]
    merged = merge_hits(hits, 2, score=lambda h: h["score"], item_id=lambda h: h["id"])
    assert [h["id"] for h in merged] == [12, 30]


def test_search_with_ties_widens_until_the_run_of_ties_ends():
    scores = np.array([0.9, 0.8, 0.8, 0.8, 0.8, 0.1], np.float32)
    ids = np.array([5, 9, 2, 7, 4, 1])
    asked = []

    def search(n):
        asked.append(n)
        return scores[:n], ids[:n]

    found_scores, found_ids = search_with_ties(search, 2, len(ids))
    assert set(found_ids.tolist()) >= {9, 2, 7, 4}  # every id tied with the 2nd place
    assert asked[-1] > 3
    assert merge([(found_scores, found_ids)], 2)[1].tolist() == [5, 2]


@pytest.fixture(scope="module")
def collection():
    """Unit vectors with duplicates (tied scores) and item ids in no particular order."""
    rng = np.random.default_rng(5)
    distinct = unit_vectors(rng, 240, DIM)
    duplicates = distinct[rng.integers(0, 240, 60)]
    vectors = np.concatenate([distinct, duplicates, duplicates[:20]])
    item_ids = rng.choice(10**6, len(vectors), replace=False) + 1
    return vectors, item_ids


def open_index(path, vectors, item_ids) -> VectorIndex:
    index = VectorIndex(
        path, DIM, "s", IndexConfig(kind="exact", follow_interval_s=None, snapshot_every_ops=10**6)
    )
    for vector, item_id in zip(vectors, item_ids):
        index.upsert(vector, item_id=int(item_id))
    return index


def test_exact_index_over_three_shards_answers_like_one(tmp_path, collection):
    vectors, item_ids = collection
    single = open_index(tmp_path / "single", vectors, item_ids)
    placement = scatter(item_ids, N_SHARDS)
    shards = [
        open_index(tmp_path / f"shard{s}", vectors[positions], item_ids[positions])
        for s, positions in enumerate(placement)
    ]
    try:
        assert all(len(p) > 0 for p in placement)
        rng = np.random.default_rng(9)
        queries = np.concatenate([unit_vectors(rng, 60, DIM), vectors[240:260]])  # the latter: ties
        ties_seen = 0
        for query in queries:
            for k in (1, 4, 10):
                one = [(h.item.id, h.score) for h in single.search(query, k).hits]
                per_shard = [[(h.item.id, h.score) for h in shard.search(query, k).hits] for shard in shards]
                merged = merge_hits(per_shard, k, score=lambda h: h[1], item_id=lambda h: h[0])
                assert merged == one
                scores = [score for _, score in one]
                ties_seen += len(scores) - len(set(scores))
        assert ties_seen > 0  # the duplicates did tie, so the tie rule was exercised
    finally:
        for index in [single, *shards]:
            index.close()
