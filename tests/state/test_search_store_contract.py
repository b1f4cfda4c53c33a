"""The search index store's contract, the same on both state backends: a SQLite file (one node)
and a PostgreSQL schema (shared by replicas on any node). Every test runs on both; the SQLite
file from before versioning is SQLite's own, and commit order is PostgreSQL's own concern."""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest

from retrieval.schemas import ItemMetadata, SearchFilters
from retrieval.store import SCHEMA_V1, MetadataStore

DIM = 4


@pytest.fixture
def open_store(tmp_path, state):
    """Opens stores of one index (each its own connections, like separate processes)."""
    opened: list[MetadataStore] = []

    def open_one() -> MetadataStore:
        store = MetadataStore(tmp_path / "items.sqlite", state)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store) -> MetadataStore:
    return open_store()


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


METADATA = [
    ItemMetadata(tenant="a", tags=["cat", "pet"], source="upload", created_at=100.0),
    ItemMetadata(
        tenant="a", tags=["dog", "pet"], source="cascade:classify", created_at=200.0, review_item_id="r1"
    ),
    ItemMetadata(tenant="b", tags=["cat"], source="upload", created_at=300.0, image_sha256="f" * 64),
    ItemMetadata(tenant="b", tags=[], source=None, created_at=400.0, extra={"note": "x?%"}),
]


def test_upsert_get_and_log_entry(store):
    item_id, label, replaced = store.upsert(None, unit(1), METADATA[0])
    assert replaced is None
    item, vector = store.get(item_id)
    assert item.metadata == METADATA[0] and item.label == label
    np.testing.assert_array_equal(vector, unit(1))
    (op,) = list(store.ops_after(0))
    assert (op.op, op.seq, op.label) == ("add", label, label)  # the label is the add's seq
    np.testing.assert_array_equal(op.vector, unit(1))
    assert store.last_seq() == label and store.count() == 1


def test_upsert_existing_replaces_vector_tags_and_logs_remove_then_add(store):
    item_id, old_label, _ = store.upsert(None, unit(1), METADATA[0])
    same_id, new_label, replaced = store.upsert(item_id, unit(2), METADATA[1])
    assert same_id == item_id and replaced == old_label and new_label > old_label
    item, vector = store.get(item_id)
    assert item.metadata.tags == ["dog", "pet"] and item.metadata.review_item_id == "r1"
    np.testing.assert_array_equal(vector, unit(2))
    assert [(op.op, op.label) for op in store.ops_after(old_label)] == [
        ("remove", old_label),
        ("add", new_label),
    ]
    assert store.count() == 1
    assert store.item_ids(SearchFilters(tags_any=["cat"])) == []  # the old tags are gone


def test_explicit_ids_never_collide_with_generated_ones(store):
    store.upsert(1000, unit(1), METADATA[0])
    generated, _, _ = store.upsert(None, unit(2), METADATA[1])
    assert generated > 1000
    store.delete(generated)
    again, _, _ = store.upsert(None, unit(3), METADATA[2])
    assert again > generated  # ids of deleted items are not handed out again


def test_delete_logs_remove_and_drops_tags(store):
    item_id, label, _ = store.upsert(None, unit(1), METADATA[0])
    assert store.delete(item_id) == label
    assert store.delete(item_id) is None  # nothing to delete: nothing logged
    assert store.get(item_id) is None and store.count() == 0
    assert [(op.op, op.label) for op in store.ops_after(label)] == [("remove", label)]
    assert store.item_ids(SearchFilters(tags_any=["cat", "pet"])) == []


@pytest.mark.parametrize(
    "filters, predicate",
    [
        (SearchFilters(), lambda m: True),
        (SearchFilters(tenant="a"), lambda m: m.tenant == "a"),
        (SearchFilters(tenant=[]), lambda m: False),
        (SearchFilters(source=["upload"]), lambda m: m.source == "upload"),
        (SearchFilters(tags_any=["dog", "cat"]), lambda m: {"dog", "cat"} & set(m.tags)),
        (SearchFilters(tags_any=[]), lambda m: False),
        (SearchFilters(tags_all=["cat", "pet"]), lambda m: {"cat", "pet"} <= set(m.tags)),
        (SearchFilters(created_after=200.0, created_before=400.0), lambda m: 200 <= m.created_at < 400),
        (SearchFilters(in_review=True), lambda m: m.review_item_id is not None),
        (SearchFilters(in_review=False, tenant="b"), lambda m: m.review_item_id is None and m.tenant == "b"),
        (SearchFilters(review_item_ids=["r1", "r9"]), lambda m: m.review_item_id == "r1"),
        (SearchFilters(image_sha256="f" * 64), lambda m: m.image_sha256 == "f" * 64),
    ],
)
def test_filters_select_exactly_the_matching_items(store, filters, predicate):
    ids = [store.upsert(None, unit(i), metadata)[0] for i, metadata in enumerate(METADATA)]
    expected = [item_id for item_id, m in zip(ids, METADATA) if predicate(m)]
    assert store.item_ids(filters) == expected
    assert store.count_matching(filters) == len(expected)
    labels, vectors = store.matching(filters, with_vectors=True)
    assert sorted(store.items_by_label(labels.tolist())[int(label)].id for label in labels) == expected
    if expected:
        assert vectors.shape == (len(expected), DIM)


def test_filter_by_ids(store):
    ids = [store.upsert(None, unit(i), metadata)[0] for i, metadata in enumerate(METADATA)]
    assert store.item_ids(SearchFilters(ids=[ids[3], ids[1], 10**12])) == sorted([ids[1], ids[3]])
    assert store.item_ids(SearchFilters(ids=[])) == []


def test_extra_with_placeholder_characters_round_trips(store):
    item_id, _, _ = store.upsert(None, unit(1), METADATA[3])
    assert store.get(item_id)[0].metadata.extra == {"note": "x?%"}


def test_iter_vectors_pages_every_live_vector_in_label_order(store):
    ids = [store.upsert(None, unit(i), ItemMetadata())[0] for i in range(7)]
    store.delete(ids[2])
    pages = list(store.iter_vectors(batch=3))
    labels = np.concatenate([labels for labels, _ in pages])
    assert labels.tolist() == sorted(store.live_labels().tolist()) and len(labels) == 6
    assert [len(p[0]) for p in pages] == [3, 3]


def test_truncate_keeps_last_seq_and_the_entries_after_it(store):
    for i in range(6):
        store.upsert(None, unit(i), ItemMetadata())
    last = store.last_seq()
    assert store.truncate_log(4) == 4
    assert [op.seq for op in store.ops_after(0)] == [5, 6]
    assert store.truncated_through() == 4 and store.last_seq() == last
    assert store.truncate_log(last) == last
    assert list(store.ops_after(0)) == [] and store.last_seq() == last  # an empty log keeps its seq
    store.upsert(None, unit(9), ItemMetadata())
    assert [op.seq for op in store.ops_after(0)] == [last + 1]
    assert store.truncate_log(2) == last  # never backwards


def test_truncate_waits_for_live_replicas_only(store):
    for i in range(10):
        store.upsert(None, unit(i), ItemMetadata())
    store.heartbeat("live", 3)
    store.heartbeat("gone", 1, at=time.time() - 300)
    store.heartbeat("long gone", 0, at=time.time() - 10_000)
    assert store.truncate_log(8, replica_timeout_s=60) == 3  # "live" still needs 4 onwards
    assert [op.seq for op in store.ops_after(0)][0] == 4
    # Without a timeout every registered replica counts, "gone" too: nothing more goes.
    assert store.truncate_log(8) == 3 and [op.seq for op in store.ops_after(0)][0] == 4
    store.heartbeat("live", 9)
    assert store.truncate_log(8, replica_timeout_s=60) == 8
    # Silent for over ten timeouts: forgotten; merely timed out: kept, but not waited for.
    assert {r.replica_id: r.applied_seq for r in store.replicas()} == {"gone": 1, "live": 9}


def test_settings_first_writer_wins(store, open_store):
    assert store.settings_once({"dim": "4", "space": "s"}) == {"dim": "4", "space": "s"}
    other = open_store()
    assert other.settings_once({"dim": "8", "space": "t"}) == {"dim": "4", "space": "s"}
    other.set_settings({"space": "u"})
    assert store.get_setting("space") == "u" and store.get_setting("missing") is None


def test_schema_is_versioned_and_reopening_applies_nothing(store, open_store):
    assert store.schema.to_version == 2
    again = open_store()
    assert again.schema.from_version == 2 and again.schema.applied == []


def test_a_second_store_sees_every_write(store, open_store):
    other = open_store()
    item_id, label, _ = store.upsert(None, unit(1), METADATA[2])
    assert other.get(item_id)[0].metadata == METADATA[2]
    assert [op.label for op in other.ops_after(0)] == [label]


@pytest.mark.parametrize("state", ["sqlite"], indirect=True)  # files from before versioning are SQLite files
def test_unversioned_sqlite_file_is_adopted_with_its_truncated_log(tmp_path, state):
    path = tmp_path / "items.sqlite"
    with sqlite3.connect(path) as old:
        old.executescript(SCHEMA_V1)
        for seq in range(1, 6):
            old.execute(
                "INSERT INTO oplog (op, label, vector) VALUES ('add', ?, ?)", (seq, unit(seq).tobytes())
            )
            old.execute(
                "INSERT INTO items (label, tenant, created_at, extra, vector) VALUES (?, 'a', 1.0, '{}', ?)",
                (seq, unit(seq).tobytes()),
            )
        old.execute("DELETE FROM oplog WHERE seq <= 3")  # the old snapshot covered these
    store = MetadataStore(path)
    try:
        assert store.schema.from_version == 0 and store.schema.to_version == 2
        assert store.count() == 5 and store.last_seq() == 5 and store.truncated_through() == 3
        assert [op.seq for op in store.ops_after(0)] == [4, 5]
        item_id, label, _ = store.upsert(None, unit(9), ItemMetadata())
        assert label == 6 and item_id == 6
    finally:
        store.close()


def test_concurrent_writers_commit_in_seq_order(open_store):
    """A follower reading ``seq > applied`` over and over sees every entry: no entry commits
    after one with a higher seq (PostgreSQL's reason for the per-index write lock)."""
    writers = [open_store() for _ in range(3)]
    follower = open_store()
    done = threading.Event()
    seen: list[int] = []

    def write(store: MetadataStore, offset: int) -> None:
        for i in range(25):
            store.upsert(None, unit(offset + i), ItemMetadata())

    def follow() -> None:
        applied = 0
        while True:
            finished = done.is_set()
            for op in follower.ops_after(applied):
                seen.append(op.seq)
                applied = op.seq
            if finished:
                return

    threads = [threading.Thread(target=write, args=(w, 100 * n)) for n, w in enumerate(writers)]
    reader = threading.Thread(target=follow)
    reader.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reader.join()
    assert seen == [op.seq for op in follower.ops_after(0)]
    assert len(seen) == 75


def test_a_new_store_holds_no_rows(store):
    """``visionroute db copy`` fills only empty stores: opening one must not write rows."""
    with store.database.read() as conn:
        for table in ("items", "item_tags", "oplog", "settings", "replicas", "log_state"):
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table


@pytest.mark.parametrize("state", ["postgres"], indirect=True)  # SQLite's AUTOINCREMENT never restarts
def test_postgres_seqs_continue_after_a_copied_truncated_log(store, open_store, state):
    for i in range(5):
        store.upsert(None, unit(i), ItemMetadata())
    store.truncate_log(5)
    with store.database.write() as conn:  # what a copy into a new schema leaves behind
        conn.execute("ALTER SEQUENCE oplog_seq_seq RESTART WITH 1")
        conn.execute("ALTER SEQUENCE items_id_seq RESTART WITH 1")
    reopened = open_store()
    item_id, label, _ = reopened.upsert(None, unit(9), ItemMetadata())
    assert label == 6 and item_id == 6 and reopened.last_seq() == 6
