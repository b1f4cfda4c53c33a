"""One search backend over N shards: the query embedded once, scattered, the top-k merged.

Every shard is a ``SearchBackend`` (a SearchTier deployment, or a SearchService in process)
holding the vectors whose FAISS label falls in its shard, over ONE shared store. So:

- a search embeds the query on one shard (``query_vector``), asks every shard for its top
  ``k`` of that vector (``search_vector``) and merges them, best score first and ties broken
  by the lower item id: for the exact index the answer is the one a single shard would give;
- a write (index, delete, review label) goes to one shard: it commits to the shared store and
  the shard holding the new label applies it when it next catches up (within the index's
  ``max_staleness_s``);
- maintenance (snapshot, compact, reload) runs on every shard; ``stats`` adds them up.

It is a ``SearchBackend`` like any other, so ``call`` answers what a single index answers
(JSON values, as they cross a Ray hop); inside, the shards' answers are validated into
retrieval's ``SearchResponse`` and merged as typed hits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from retrieval.schemas import SearchResponse
from retrieval.shards import merge_hits
from router.services.backends import SearchBackend

SEARCHES = ("search_text", "search_image", "search_by_id")
EVERY_SHARD = ("snapshot", "compact", "reload")


class ShardedSearch:
    def __init__(self, shards: Sequence[SearchBackend]) -> None:
        if not shards:
            raise ValueError("ShardedSearch needs at least one shard")
        self.shards = list(shards)
        self._next = 0

    def _one(self) -> SearchBackend:
        """Round-robin, so embedding and writes spread over the shards' replicas."""
        self._next = (self._next + 1) % len(self.shards)
        return self.shards[self._next]

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method in SEARCHES:
            return (await self._search(method, *args, **kwargs)).model_dump()
        if method in EVERY_SHARD:
            return await asyncio.gather(*(shard.call(method, *args, **kwargs) for shard in self.shards))
        if method == "stats":
            return await self._stats(*args, **kwargs)
        return await self._one().call(method, *args, **kwargs)

    async def _search(
        self, method: str, query: Any, k: int = 10, filters: Any = None, params: Any = None
    ) -> SearchResponse:
        started = time.perf_counter()
        asked = await self._one().call("query_vector", method, query, k, filters, params)
        answers = [
            SearchResponse.model_validate(answer)
            for answer in await asyncio.gather(
                *(
                    shard.call("search_vector", asked["vector"], k, filters, params, asked["exclude"])
                    for shard in self.shards
                )
            )
        ]
        hits = merge_hits([a.hits for a in answers], k, score=lambda h: h.score, item_id=lambda h: h.id)
        return SearchResponse(
            hits=hits,
            k=k,
            index_kind=answers[0].index_kind,
            exact=all(a.exact for a in answers),
            took_ms=round((time.perf_counter() - started) * 1000, 3),
            query=asked["echo"].get("query"),
            query_id=asked["echo"].get("query_id"),
        )

    async def _stats(self, tenant: str | None = None) -> dict[str, Any]:
        if tenant is not None:  # a tenant's view is store-level: every shard gives the same
            return await self._one().call("stats", tenant)
        parts = await asyncio.gather(*(shard.call("stats") for shard in self.shards))
        return {
            **parts[0],  # "items" counts the shared store: the same on every shard
            "stored_vectors": sum(int(p.get("stored_vectors", 0)) for p in parts),
            "index_bytes": sum(int(p.get("index_bytes", 0)) for p in parts),
            "shards": parts,
        }
