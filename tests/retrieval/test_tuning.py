"""Search defaults tuned to a target recall, SQ8 re-ranking, and the background rebuild."""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from retrieval import ann
from retrieval.config import IndexConfig
from retrieval.index import VectorIndex
from retrieval.schemas import ItemMetadata
from tests.retrieval.conftest import clustered_vectors

DIM = 32


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def collection():
    """A clustered collection, tuning queries and fresh queries, neither of them indexed."""
    data = clustered_vectors(np.random.default_rng(3), 4600, DIM, n_clusters=30, spread=1.0)
    base, tune_queries, fresh = data[:4000], data[4000:4300], data[4300:]

    def truth(queries):
        return faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]

    return base, tune_queries, fresh, truth


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_tuner_reaches_target_on_held_out_queries_and_is_cheaper_for_lower_targets(kind, collection):
    base, tune_queries, fresh, truth = collection
    chosen = {}
    built = IndexConfig(kind=kind, hnsw_m=8, pq_m=8, ivf_min_items=1000)
    index = ann.build_index(kind, DIM, built, base if kind == "ivfpq" else None)
    index.add_with_ids(base, np.arange(len(base), dtype=np.int64))
    for target in (0.95, 0.5):  # one index, tuned twice: only the search knobs change
        config = built.model_copy(update={"target_recall": target})
        tuning = ann.tune(index, tune_queries, truth(tune_queries), config)
        params = ann.default_params(index, config)  # what every search now uses
        _, on_tuning_queries = ann.search(index, kind, tune_queries, 10, params)
        _, on_fresh = ann.search(index, kind, fresh, 10, params)
        assert tuning.reached and tuning.recall_at_k >= target
        assert _recall(on_tuning_queries, truth(tune_queries)) == pytest.approx(tuning.recall_at_k, abs=1e-4)
        if target == 0.95:  # queries the tuner never saw: the target holds within sampling error
            assert _recall(on_fresh, truth(fresh)) >= 0.93
        chosen[target] = (params, ann._cost(kind, tuning.chosen, faiss.downcast_index(index.index), 10))
    (high, high_cost), (low, low_cost) = chosen[0.95], chosen[0.5]
    assert low_cost < high_cost
    if kind == "hnsw":
        assert low.ef_search < high.ef_search
    else:
        assert low.nprobe <= high.nprobe and low.refine_k_factor <= high.refine_k_factor


def test_sq8_refine_store_takes_less_memory_than_flat(collection):
    base = collection[0][:1500]
    sizes = {}
    for store in ("sq8", "flat"):
        config = IndexConfig(kind="ivfpq", pq_m=4, ivf_nlist=16, ivf_min_items=1000, refine_store=store)
        index = ann.build_index("ivfpq", DIM, config, base)
        index.add_with_ids(base, np.arange(len(base), dtype=np.int64))
        sizes[store] = ann.index_bytes(index)
    assert sizes["sq8"] < 0.6 * sizes["flat"]


def _fill(index, vectors):
    return [index.upsert(v, ItemMetadata(tags=[f"t{i % 3}"])) for i, v in enumerate(vectors)]


def test_writes_during_a_background_rebuild_survive_the_swap_and_a_reload(tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    vectors = clustered_vectors(rng, 1300, DIM)
    config = IndexConfig(kind="exact", snapshot_every_ops=100_000)
    index = VectorIndex(tmp_path, DIM, "s", config)
    ids = _fill(index, vectors[:1200])
    # Hold the rebuild inside its build (after it read the store) until the test has written.
    building, proceed = threading.Event(), threading.Event()
    real_tune = ann.tune

    def held_tune(*args, **kwargs):
        building.set()
        assert proceed.wait(60)
        return real_tune(*args, **kwargs)

    monkeypatch.setattr(ann, "tune", held_tune)
    index.config = IndexConfig(kind="hnsw", hnsw_m=8, snapshot_every_ops=100_000)
    assert index.start_rebuild("switch to hnsw")
    assert building.wait(60)
    # These writes are acknowledged while the rebuild is held: it is off the write path.
    new_ids = _fill(index, vectors[1200:1300])
    index.upsert(vectors[5], ItemMetadata(tags=["moved"]), item_id=ids[0])
    index.delete(ids[1])
    assert index.kind == "exact" and index.is_rebuilding()
    proceed.set()
    index.wait_for_rebuild(60)
    assert index.kind == "hnsw"
    assert index.stats()["rebuild"]["ops_caught_up"] >= 102

    def check(ix):
        for i, item_id in zip(range(1200, 1300, 17), new_ids[::17]):
            assert ix.search(vectors[i], 1).hits[0].item.id == item_id
        assert ix.get(ids[0])[0].metadata.tags == ["moved"]
        assert ids[1] not in [h.item.id for h in ix.search(vectors[1], 10).hits]
        assert len(ix) == 1299

    check(index)
    index.reload()
    assert index.kind == "hnsw"
    check(index)
    index.close()
    reopened = VectorIndex(tmp_path, DIM, "s", IndexConfig(kind="hnsw", hnsw_m=8))
    check(reopened)
    reopened.close()


def test_stats_report_the_tuned_parameters(tmp_path):
    vectors = clustered_vectors(np.random.default_rng(5), 1500, DIM, spread=1.0)
    index = VectorIndex(tmp_path, DIM, "s", IndexConfig(kind="hnsw", hnsw_m=8, snapshot_every_ops=100_000))
    _fill(index, vectors)
    index.compact()
    stats = index.stats()
    tuning = stats["tuning"]
    assert tuning["kind"] == "hnsw" and tuning["target_recall"] == 0.95 and tuning["reached"]
    assert tuning["held_out_queries"] == 150 and tuning["recall_at_k"] >= 0.95
    assert stats["search_params"]["ef_search"] == tuning["chosen"]["efSearch"]
    index.close()
    reopened = VectorIndex(tmp_path, DIM, "s", IndexConfig(kind="hnsw", hnsw_m=8))
    assert reopened.stats()["tuning"] == tuning  # kept in the snapshot's manifest
    assert reopened.stats()["search_params"] == stats["search_params"]
    reopened.close()


def test_the_rebuild_thread_lowers_only_its_own_priority():
    import os
    import threading

    from retrieval.index import _lower_thread_priority

    seen = {}

    def rebuild_like():
        _lower_thread_priority(7)
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    worker = threading.Thread(target=rebuild_like)
    worker.start()
    worker.join()
    assert seen["thread"] == min(19, before + 7)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # the caller keeps its own
