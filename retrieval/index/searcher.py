"""Answering one query over a replica's vectors: ANN with a selector, or an exact scan.

Filters matching few items are answered by an exact scan over those items' vectors; otherwise
the ANN search runs with a selector, and if the selector starved it (HNSW or IVF may return
fewer than k under a selective filter) the exact scan answers instead, so a filter with at
least k matches always yields k results. Equal scores are ordered by item id, and the k-th
place goes to the lowest id among those tied for it (what makes results merged over shards
equal to one index's). Results never hold FAISS's ``-1`` padding, tombstones, excluded labels
or labels whose item a write this replica has not applied yet removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from retrieval import ann
from retrieval.index.faiss_index import FaissIndex
from retrieval.schemas import SearchFilters, SearchParams
from retrieval.shards import search_with_ties
from retrieval.store import Item

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredItem:
    item: Item
    score: float


@dataclass(frozen=True)
class SearchResult:
    hits: list[ScoredItem]  # best first (ties: lower item id first), never padding, at most k
    exact: bool


class FilterSource(Protocol):
    """The items a replica indexes (the store, or its shard's view): counts and filter matches."""

    def count(self) -> int: ...

    def count_matching(self, filters: SearchFilters) -> int: ...

    def matching(
        self, filters: SearchFilters, *, with_vectors: bool
    ) -> tuple[np.ndarray, np.ndarray | None]: ...


def search_replica(
    index: FaissIndex,
    source: FilterSource,
    items_by_label: Callable[[list[int]], dict[int, Item]],
    query: np.ndarray,
    k: int,
    filters: SearchFilters,
    params: SearchParams,
    exclude_labels: frozenset[int],
    *,
    exact_filter_max_items: int,
) -> SearchResult:
    """The k best live items for ``query`` (shape (1, dim), unit norm) among ``source``'s items
    that satisfy ``filters``, ``exclude_labels`` left out (labels ``source`` holds)."""
    want = k + len(exclude_labels)
    if filters.is_empty():
        n_allowed, filtered = source.count(), False
    else:
        n_allowed, filtered = source.count_matching(filters), True
    expected = min(k, max(0, n_allowed - len(exclude_labels)))
    if n_allowed == 0:
        return SearchResult([], exact=False)
    if not (params.exact or (filtered and n_allowed <= exact_filter_max_items)):
        allowed = source.matching(filters, with_vectors=False)[0] if filtered else None
        ann_search = index.searcher(query, index.request_params(params), allowed)
        scores, labels = search_with_ties(ann_search, want, max(1, index.ntotal))
        hits = _hits(index, items_by_label, scores, labels, exclude_labels, k)
        if len(hits) >= expected:
            return SearchResult(hits, exact=False)
        log.debug("ANN returned %d of %d under filters; exact scan", len(hits), expected)
    labels, vectors = source.matching(filters, with_vectors=True)
    if vectors is None:
        vectors = np.zeros((0, query.shape[1]), np.float32)

    def exact_search(n: int) -> tuple[np.ndarray, np.ndarray]:
        scores, found = ann.exact_search(vectors, labels, query, n)
        return scores[0], found[0]

    scores, found = search_with_ties(exact_search, want, max(1, len(labels)))
    return SearchResult(_hits(index, items_by_label, scores, found, exclude_labels, k), exact=True)


def _hits(
    index: FaissIndex,
    items_by_label: Callable[[list[int]], dict[int, Item]],
    scores: np.ndarray,
    labels: np.ndarray,
    exclude: frozenset[int],
    k: int,
) -> list[ScoredItem]:
    # -1 is FAISS's padding when fewer than k results exist; tombstones are deleted items;
    # a label without an item was removed by a write this replica has not applied yet.
    keep = [
        (float(score), int(label))
        for score, label in zip(scores, labels)
        if label >= 0 and int(label) not in exclude and int(label) not in index.tombstones
    ]
    items = items_by_label([label for _, label in keep])
    hits = [ScoredItem(items[label], score) for score, label in keep if label in items]
    hits.sort(key=lambda hit: (-hit.score, hit.item.id))
    return hits[:k]
