"""Sharding a collection over N indexes: which shard holds a vector, and one top-k from N.

Pure functions (no Ray, no I/O), so the Ray layer can scatter queries and gather results with
them, and tests can check them without a cluster.

Shards are by FAISS label, not by item id: every shard of an index shares one store and one
log, and shard ``s`` of ``n`` indexes the vectors whose label ``% n == s`` (a label is the seq
of the log entry that added the vector, so it is known when the entry is read). A re-added
item gets a new label and may move shard: its remove entry names the old label (the old shard
drops it) and its add entry the new one. Writes may therefore go to any shard.

- ``ShardMap(n).shard_of(label)``: the shard holding a label (stable: the same label always
  goes to the same shard, whichever node asks); ``holds(labels, shard)``: a mask of them;
- ``scatter(labels, n)``: the positions of a batch that each shard holds;
- ``merge(per_shard, k)``: the per-shard top-k lists as one top-k, best score first and ties
  broken by item id (ascending);
- ``search_with_ties(search, k, limit)``: one shard's top-k with the same tie rule. FAISS cuts a
  run of equal scores wherever its heap happens to; asking for more until the run has ended
  makes the cut the lowest ids, so an exact index split over N shards answers exactly as one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShardMap:
    n_shards: int

    def __post_init__(self) -> None:
        if isinstance(self.n_shards, bool) or not isinstance(self.n_shards, int) or self.n_shards < 1:
            raise ValueError(f"n_shards must be an integer >= 1, got {self.n_shards!r}")

    def shard_of(self, label: int) -> int:
        """The shard holding FAISS label ``label`` (Python's ``%`` is never negative for n > 0)."""
        return int(label) % self.n_shards

    def holds(self, labels: np.ndarray, shard: int) -> np.ndarray:
        """A boolean mask: which of ``labels`` shard ``shard`` holds (the rule of ``shard_of``)."""
        return np.asarray(labels, np.int64) % self.n_shards == shard

    def scatter(self, labels: Iterable[int]) -> list[list[int]]:
        """For each shard, the positions in ``labels`` that it holds (in input order)."""
        positions: list[list[int]] = [[] for _ in range(self.n_shards)]
        for position, label in enumerate(labels):
            positions[self.shard_of(label)].append(position)
        return positions


def scatter(labels: Iterable[int], n_shards: int) -> list[list[int]]:
    return ShardMap(n_shards).scatter(labels)


def ranked(scores: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """The order that puts the best score first and breaks ties by the lower item id."""
    return np.lexsort((np.asarray(item_ids, np.int64), -np.asarray(scores, np.float64)))


def merge(per_shard: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """One top-k (scores, item ids) from each shard's (scores, item ids), 1-D each.

    FAISS's ``-1`` padding is dropped. Exact when every shard sent its own top-k under the same
    tie rule (``search_with_ties``): an item of the global top-k is in its shard's top-k."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores = np.concatenate([np.asarray(s, np.float32).reshape(-1) for s, _ in per_shard] or [np.zeros(0)])
    ids = np.concatenate(
        [np.asarray(i, np.int64).reshape(-1) for _, i in per_shard] or [np.zeros(0, np.int64)]
    )
    real = ids >= 0
    scores, ids = scores[real], ids[real]
    order = ranked(scores, ids)[:k]
    return scores[order].astype(np.float32), ids[order]


def merge_hits(per_shard: Sequence[Sequence], k: int, *, score: Callable, item_id: Callable) -> list:
    """``merge`` for result objects (e.g. the API's hits: ``score=lambda h: h.score,
    item_id=lambda h: h.id``)."""
    hits = [hit for shard in per_shard for hit in shard]
    hits.sort(key=lambda hit: (-float(score(hit)), int(item_id(hit))))
    return hits[:k]


def search_with_ties(
    search: Callable[[int], tuple[np.ndarray, np.ndarray]], k: int, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) from ``search(n)`` (best first, 1-D, ``-1`` padded) holding the top ``k``
    and every result tied with the k-th: asks for one more than k, and doubles while the last
    result still ties, up to ``limit`` (the number of vectors searched)."""
    n = min(k + 1, max(1, limit))
    while True:
        scores, ids = search(n)
        scores, ids = np.asarray(scores).reshape(-1), np.asarray(ids).reshape(-1)
        found = ids >= 0
        scores, ids = scores[found], ids[found]
        exhausted = len(ids) < n or n >= limit
        if exhausted or len(ids) <= k or scores[-1] != scores[k - 1]:
            return scores, ids
        n = min(2 * n, limit)
