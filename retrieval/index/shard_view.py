"""What one shard of an index reads from the shared store: its own items and log entries.

``shard=(s, n)`` makes a replica hold only shard ``s`` of ``n`` (``retrieval.shards``). All
shards share the store and the log; a shard reads both through ``ShardStore``, which keeps only
the items and log entries whose FAISS label ``% n == s``, so its builds, replays, counts and
exact scans see its own vectors alone. Writes, ``get`` and ``find`` stay store-level.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from retrieval.schemas import SearchFilters
from retrieval.shards import ShardMap
from retrieval.store import BATCH, MetadataStore, Op, StoreReader
from visionroute.errors import ConfigError


def check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    """``(index, count)`` as ints; None is ``(0, 1)`` (everything)."""
    if shard is None:
        return 0, 1
    valid = (
        isinstance(shard, (tuple, list))
        and len(shard) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shard)
        and shard[1] >= 1
        and 0 <= shard[0] < shard[1]
    )
    if not valid:
        raise ConfigError(
            f"shard must be (index, count) with 0 <= index < count, got {shard!r}", field="shard"
        )
    return int(shard[0]), int(shard[1])


class ShardReader(StoreReader):
    """The store's reads as shard ``shard`` of ``shards`` sees them: only items and log entries
    whose label it holds. Everything else (log bounds, items by label, settings) is inherited
    unchanged, store-level."""

    def __init__(self, conn, shards: ShardMap, shard: int) -> None:
        super().__init__(conn)
        self.shards, self.shard = shards, shard

    def count(self) -> int:
        # In SQL: a search counts on every call, and the count needs no rows.
        return int(
            self.conn.execute(
                "SELECT COUNT(*) FROM items WHERE label % ? = ?", (self.shards.n_shards, self.shard)
            ).fetchone()[0]
        )

    def live_labels(self) -> np.ndarray:
        labels = super().live_labels()
        return labels[self.shards.holds(labels, self.shard)]

    def iter_vectors(self, batch: int = BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for labels, vectors in super().iter_vectors(batch):
            mine = self.shards.holds(labels, self.shard)
            if mine.any():
                yield labels[mine], vectors[mine]

    def ops_after(self, seq: int, batch: int = 1000) -> Iterator[Op]:
        # A remove names the label its add gave, so both entries of a vector reach one shard.
        for op in super().ops_after(seq, batch):
            if self.shards.shard_of(op.label) == self.shard:
                yield op

    def matching(self, filters: SearchFilters, *, with_vectors: bool) -> tuple[np.ndarray, np.ndarray | None]:
        labels, vectors = super().matching(filters, with_vectors=with_vectors)
        mine = self.shards.holds(labels, self.shard)
        if vectors is not None:
            vectors = vectors[mine] if mine.any() else None  # None when none, like the store
        return labels[mine], vectors

    def count_matching(self, filters: SearchFilters) -> int:
        return len(self.matching(filters, with_vectors=False)[0])


class ShardStore:
    """The read-only face of a shared ``MetadataStore`` that one shard builds, replays and
    scans through (what ``VectorIndex`` reads for its own vectors)."""

    def __init__(self, store: MetadataStore, shard: tuple[int, int]) -> None:
        self.store = store
        self.shards, self.shard = ShardMap(shard[1]), shard[0]

    @contextmanager
    def consistent_view(self) -> Iterator[ShardReader]:
        with self.store.consistent_view() as view:
            yield ShardReader(view.conn, self.shards, self.shard)

    @contextmanager
    def _reader(self) -> Iterator[ShardReader]:
        with self.store.database.read() as conn:
            yield ShardReader(conn, self.shards, self.shard)

    def count(self) -> int:
        with self._reader() as reader:
            return reader.count()

    def count_matching(self, filters: SearchFilters) -> int:
        with self._reader() as reader:
            return reader.count_matching(filters)

    def matching(self, filters: SearchFilters, *, with_vectors: bool) -> tuple[np.ndarray, np.ndarray | None]:
        with self._reader() as reader:
            return reader.matching(filters, with_vectors=with_vectors)


def own_view(store: MetadataStore | None, shard: tuple[int, int]) -> MetadataStore | ShardStore | None:
    """What a replica of ``shard`` indexes: the store itself, or only its shard of it (None
    once the store is closed)."""
    if shard[1] == 1 or store is None:
        return store
    return ShardStore(store, shard)
