"""Invariants of search over any mix of writes: sorted, no padding, filters hold, k when possible."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval.config import IndexConfig
from retrieval.index import VectorIndex
from retrieval.schemas import ItemMetadata, SearchFilters
from tests.retrieval.conftest import unit_vectors

DIM = 8
TENANTS = ("a", "b", "c")


@pytest.fixture(scope="module", params=("exact", "hnsw"))
def index(request, tmp_path_factory):
    config = IndexConfig(kind=request.param, exact_filter_max_items=5, snapshot_every_ops=10_000)
    index = VectorIndex(tmp_path_factory.mktemp(request.param), DIM, "prop", config)
    rng = np.random.default_rng(0)
    for i, vector in enumerate(unit_vectors(rng, 120, DIM)):
        index.upsert(vector, ItemMetadata(tenant=TENANTS[i % 3], tags=[f"t{i % 4}"]))
    yield index
    index.close()


writes = st.lists(st.tuples(st.sampled_from(["add", "delete", "upsert"]), st.integers(0, 10**6)), max_size=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31),
    k=st.integers(1, 150),
    tenant=st.none() | st.sampled_from(TENANTS) | st.just("nobody"),
    tag=st.none() | st.sampled_from(["t0", "t1", "t2", "t3"]),
    ops=writes,
)
def test_results_sorted_unpadded_filtered_and_k_when_possible(index, seed, k, tenant, tag, ops):
    rng = np.random.default_rng(seed)
    for op, pick in ops:
        live = index.find(SearchFilters())
        if op == "add" or not live:
            index.upsert(
                unit_vectors(rng, 1, DIM)[0], ItemMetadata(tenant=TENANTS[pick % 3], tags=[f"t{pick % 4}"])
            )
        elif op == "delete":
            index.delete(live[pick % len(live)])
        else:
            index.upsert(
                unit_vectors(rng, 1, DIM)[0],
                ItemMetadata(tenant=TENANTS[pick % 3]),
                item_id=live[pick % len(live)],
            )
    filters = SearchFilters(tenant=tenant, tags_any=[tag] if tag else None)
    result = index.search(unit_vectors(rng, 1, DIM)[0], k, filters)
    scores = [h.score for h in result.hits]
    ids = [h.item.id for h in result.hits]
    assert scores == sorted(scores, reverse=True)
    assert -1 not in ids and len(set(ids)) == len(ids)
    assert len(ids) == min(k, len(index.find(filters)))
    assert set(ids) <= set(index.find(filters))
