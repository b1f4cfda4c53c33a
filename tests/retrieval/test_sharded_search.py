"""ShardedSearch (router/services/sharded_search.py): the service's search over N shards answers
as one index does: real SearchServices over one store, the real ConSE embedder, real photos."""

from __future__ import annotations

import asyncio

import pytest

from retrieval.config import IndexConfig, RetrievalConfig
from retrieval.service import SearchService
from router.services.backends import LocalSearch
from router.services.sharded_search import ShardedSearch

SHARDS = 3


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, conse_config, conse_embedder, photos):
    root = tmp_path_factory.mktemp("sharded")
    # max_staleness_s 0: every search catches up first, so writes made through one shard are
    # seen by all at once (the bound itself is tested in test_replicas.py)
    config = RetrievalConfig(
        index_dir=root, embedder=conse_config, index=IndexConfig(kind="exact", max_staleness_s=0.0)
    )
    shards = [
        SearchService(config, embedder=conse_embedder, replica_dir=root / f"shard{s}", shard=(s, SHARDS))
        for s in range(SHARDS)
    ]
    whole = SearchService(config, embedder=conse_embedder, replica_dir=root / "whole")
    sharded = ShardedSearch([LocalSearch(service) for service in shards])
    names = list(photos)
    ids = asyncio.run(
        sharded.call(
            "index_images",
            [photos[n] for n in names],
            [
                {
                    "tenant": "demo",
                    "tags": ["animal"] if n in ("chelsea", "horse") else [],
                    "extra": {"name": n},
                }
                for n in names
            ],
        )
    )
    yield sharded, LocalSearch(whole), dict(zip(names, ids)), photos
    for service in (*shards, whole):
        service.close()


def ranked(response: dict) -> list[tuple[int, float]]:
    return [(hit["id"], round(hit["score"], 6)) for hit in response["hits"]]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_text_image_and_id_searches_match_one_index(indexes, k):
    sharded, whole, ids, photos = indexes

    async def both(method: str, query, **options):
        return await sharded.call(method, query, k=k, **options), await whole.call(
            method, query, k=k, **options
        )

    for text in ("a cat", "a cup of coffee", "a rocket", "an astronaut"):
        split, one = asyncio.run(both("search_text", text))
        assert ranked(split) == ranked(one) and split["query"] == text
    split, one = asyncio.run(both("search_image", photos["coffee"]))
    assert ranked(split) == ranked(one)
    split, one = asyncio.run(both("search_by_id", ids["chelsea"]))
    assert ranked(split) == ranked(one) and split["query_id"] == ids["chelsea"]
    assert ids["chelsea"] not in [hit for hit, _ in ranked(split)]
    split, one = asyncio.run(both("search_text", "an animal", filters={"tags_any": ["animal"]}))
    assert ranked(split) == ranked(one) and {h for h, _ in ranked(split)} <= {ids["chelsea"], ids["horse"]}


def test_every_item_lives_in_exactly_one_shard_and_stats_add_up(indexes):
    sharded, _, ids, _ = indexes
    stats = asyncio.run(sharded.call("stats"))
    assert stats["items"] == len(ids)
    assert stats["stored_vectors"] == len(ids) == sum(s["stored_vectors"] for s in stats["shards"])
    assert len(stats["shards"]) == SHARDS


def test_a_delete_through_any_shard_is_gone_from_every_answer(indexes):
    sharded, whole, ids, _ = indexes
    asyncio.run(sharded.call("delete", ids["camera"]))
    split = asyncio.run(sharded.call("search_text", "a man with a camera", k=8))
    one = asyncio.run(whole.call("search_text", "a man with a camera", k=8))
    assert ids["camera"] not in [h for h, _ in ranked(split)]
    assert ranked(split) == ranked(one)


@pytest.mark.parametrize(
    "method, query, options, field",
    [
        ("search_text", "x" * 10_000, {}, "query"),
        ("search_text", "a cat", {"k": 0}, "k"),
        ("search_text", "a cat", {"filters": {"ids": [2**64]}}, "filters.ids.0"),
        ("search_image", b"GIF89a not really", {}, "image"),
        ("search_by_id", 2**63, {}, "id"),
    ],
)
def test_bad_input_through_the_shards_is_the_same_named_error(indexes, method, query, options, field):
    from visionroute.errors import InputError

    sharded, whole, _, _ = indexes
    errors = []
    for backend in (sharded, whole):
        with pytest.raises(InputError) as error:
            asyncio.run(backend.call(method, query, **options))
        errors.append((type(error.value), error.value.field))
    assert errors[0] == errors[1] and errors[0][1].startswith(field.split(".")[0])
