"""VectorIndex: add / upsert / delete, filters, per-request params, persistence, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.config import IndexConfig
from retrieval.index import VectorIndex
from retrieval.schemas import ItemMetadata, SearchFilters, SearchParams
from tests.retrieval.conftest import clustered_vectors, unit_vectors
from visionroute.errors import ConfigError, Conflict, InputError, NotFound

DIM = 16
KINDS = ("exact", "hnsw", "ivfpq")


def config_for(kind: str, **overrides) -> IndexConfig:
    # IVF-PQ is built once 1,000 items exist; 4 sub-quantisers of 4 dims each.
    values = {"kind": kind, "ivf_min_items": 1000, "pq_m": 4, "snapshot_every_ops": 10_000, **overrides}
    return IndexConfig(**values)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def fill(index: VectorIndex, vectors: np.ndarray) -> list[int]:
    ids = []
    for i, vector in enumerate(vectors):
        metadata = ItemMetadata(
            tenant="a" if i % 2 else "b", tags=[f"t{i % 3}"], source="test", created_at=1000.0 + i
        )
        ids.append(index.upsert(vector, metadata))
    return ids


@pytest.fixture(params=KINDS)
def filled(request, tmp_path, rng):
    kind = request.param
    vectors = clustered_vectors(rng, 1200, DIM)
    index = VectorIndex(tmp_path / "idx", DIM, "test-space", config_for(kind))
    ids = fill(index, vectors)
    index.compact()  # builds the configured kind over what is stored (IVF-PQ needs data to train)
    assert index.kind == kind
    yield index, vectors, ids
    index.close()


def test_each_item_finds_itself_first(filled):
    index, vectors, ids = filled
    for i in (0, 17, 599, 1199):
        hits = index.search(vectors[i], 5).hits
        assert hits[0].item.id == ids[i]
        # IVF-PQ's scores come from its 8-bit re-ranking store: cosine to about 1e-3.
        assert hits[0].score == pytest.approx(1.0, abs=1e-4 if index.kind != "ivfpq" else 5e-3)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_delete_removes_from_results_and_unknown_id_is_not_found(filled):
    index, vectors, ids = filled
    index.delete(ids[3])
    assert ids[3] not in [h.item.id for h in index.search(vectors[3], 10).hits]
    with pytest.raises(NotFound, match=str(ids[3])):
        index.delete(ids[3])
    with pytest.raises(NotFound):
        index.delete(10**9)
    assert len(index) == len(ids) - 1  # intact after the failed deletes


def test_upsert_replaces_vector_and_metadata(filled):
    index, vectors, ids = filled
    index.upsert(vectors[10], ItemMetadata(tenant="z", tags=["moved"]), item_id=ids[3])
    hits = index.search(vectors[10], 2).hits
    assert {h.item.id for h in hits} == {ids[3], ids[10]}
    assert index.get(ids[3])[0].metadata.tags == ["moved"]
    # The old vector no longer answers for item 3.
    assert ids[3] not in [h.item.id for h in index.search(vectors[3], 3).hits[:1]]
    assert len(index) == len(ids)


@pytest.mark.parametrize(
    "filters, predicate",
    [
        (SearchFilters(tenant="a"), lambda m: m.tenant == "a"),
        (SearchFilters(tenant=["a", "b"], tags_any=["t1"]), lambda m: "t1" in m.tags),
        (
            SearchFilters(tags_all=["t2"], created_after=1100.0, created_before=1150.0),
            lambda m: "t2" in m.tags and 1100 <= m.created_at < 1150,
        ),
        (SearchFilters(in_review=False, source="test"), lambda m: m.review_item_id is None),
    ],
)
def test_filters_hold_and_still_return_k(filled, filters, predicate):
    index, vectors, _ = filled
    result = index.search(vectors[0], 10, filters)
    matching = index.store.count_matching(filters)
    assert len(result.hits) == min(10, matching)
    assert all(predicate(h.item.metadata) for h in result.hits)


def test_selective_filter_through_ann_falls_back_to_exact(tmp_path, rng):
    # exact_filter_max_items=0 forces the ANN path with a selector; a 3-item filter starves
    # HNSW / IVF (they return fewer than k), and the exact scan must make up k.
    vectors = clustered_vectors(rng, 1200, DIM)
    for kind in ("hnsw", "ivfpq"):
        index = VectorIndex(tmp_path / kind, DIM, "s", config_for(kind, exact_filter_max_items=0))
        ids = fill(index, vectors)
        index.compact()
        chosen = ids[100:103]
        result = index.search(vectors[0], 3, SearchFilters(ids=chosen))
        assert sorted(h.item.id for h in result.hits) == sorted(chosen)
        index.close()


def test_per_request_params_do_not_touch_the_shared_index(filled):
    index, vectors, _ = filled
    import faiss

    base = faiss.downcast_index(index.index.index)
    before = (getattr(getattr(base, "hnsw", None), "efSearch", None), getattr(base, "k_factor", None))
    index.search(vectors[0], 5, params=SearchParams(ef_search=7, nprobe=1, refine_k_factor=1.5))
    after = (getattr(getattr(base, "hnsw", None), "efSearch", None), getattr(base, "k_factor", None))
    assert before == after


def test_exact_param_matches_brute_force(filled):
    index, vectors, _ = filled
    query = vectors[42]
    scores = vectors @ query
    result = index.search(query, 10, params=SearchParams(exact=True))
    assert result.exact
    assert [h.score for h in result.hits] == pytest.approx(np.sort(scores)[::-1][:10].tolist(), abs=1e-5)


def test_persistence_snapshot_plus_log(tmp_path, rng):
    vectors = unit_vectors(rng, 60, DIM)
    config = config_for("hnsw", snapshot_every_ops=25)
    index = VectorIndex(tmp_path, DIM, "s", config)
    ids = fill(index, vectors)
    index.delete(ids[0])
    index.upsert(vectors[1], ItemMetadata(tags=["new"]), item_id=ids[2])
    manifest = json.loads((tmp_path / "snapshot.json").read_text())
    assert 0 < manifest["applied_seq"] < index.store.last_seq()  # some ops only in the log
    # Simulate a crash: drop the object without close() (which would snapshot).
    index._lock_file.close()
    reopened = VectorIndex(tmp_path, DIM, "s", config)
    assert json.loads((tmp_path / "snapshot.json").read_text()) == manifest  # replayed, not rebuilt
    assert reopened.stats()["ops_since_snapshot"] == reopened.store.last_seq() - manifest["applied_seq"]
    assert len(reopened) == 59
    assert reopened.get(ids[2])[0].metadata.tags == ["new"]
    assert ids[0] not in [h.item.id for h in reopened.search(vectors[0], 5).hits]
    assert reopened.search(vectors[1], 2).hits[0].item.id in (ids[1], ids[2])
    reopened.close()
    # A clean close snapshots everything: the log is empty and a reload changes nothing.
    again = VectorIndex(tmp_path, DIM, "s", config)
    assert list(again.store.ops_after(0)) == []
    assert len(again) == 59
    again.reload()
    assert again.stats()["items"] == 59
    again.close()


def test_compaction_drops_tombstones_and_auto_picks_kind(tmp_path, rng):
    vectors = unit_vectors(rng, 300, DIM)
    index = VectorIndex(
        tmp_path, DIM, "s", IndexConfig(kind="auto", exact_max_items=200, snapshot_every_ops=10_000)
    )
    ids = fill(index, vectors)
    assert index.kind == "exact"  # nothing triggered a rebuild yet
    report = index.compact()
    assert report["after"]["kind"] == "hnsw"  # 300 items >= exact_max_items
    for item_id in ids[:50]:
        index.delete(item_id)
    assert index.stats()["tombstones"] == 50
    index.compact()
    assert index.stats()["tombstones"] == 0 and index.stats()["stored_vectors"] == 250
    index.close()


def test_dimension_or_space_mismatch_at_start_names_both(tmp_path, rng):
    index = VectorIndex(tmp_path, DIM, "conse:model-a", config_for("exact"))
    index.upsert(unit_vectors(rng, 1, DIM)[0])
    index.close()
    with pytest.raises(ConfigError) as error:
        VectorIndex(tmp_path, 512, "open_clip:ViT-B-32", config_for("exact"))
    assert "16-d" in error.value.reason and "512-d" in error.value.reason
    assert "conse:model-a" in error.value.reason and "open_clip:ViT-B-32" in error.value.reason
    reopened = VectorIndex(tmp_path, DIM, "conse:model-a", config_for("exact"))  # intact
    assert len(reopened) == 1
    reopened.close()


def test_second_writer_is_refused(tmp_path):
    index = VectorIndex(tmp_path, DIM, "s")
    with pytest.raises(Conflict, match="another process"):
        VectorIndex(tmp_path, DIM, "s")
    index.close()


def test_bad_input_is_rejected_and_index_intact(filled):
    index, vectors, ids = filled
    for k in (0, -1, index.config.max_k + 1, 2.5, True):
        with pytest.raises(InputError) as error:
            index.search(vectors[0], k)
        assert error.value.field == "k"
    with pytest.raises(InputError, match="expected 16-d"):
        index.search(np.ones(8, np.float32) / np.sqrt(8), 3)
    with pytest.raises(InputError, match="L2-normalised"):
        index.upsert(np.ones(DIM, np.float32))
    with pytest.raises(InputError, match="NaN"):
        index.upsert(np.full(DIM, np.nan, np.float32))
    assert len(index) == len(ids)
