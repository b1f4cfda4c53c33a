"""The embeddings drift monitor is fed in the running service core: a sampled share of the images
indexed for search have their embedding read back from the search tier after the response."""

from __future__ import annotations

import asyncio

from retrieval.service import SearchService
from router.config import parse_app_config
from router.services import ImageRequest, VisionRouteService
from router.services.backends import LocalOnnxTier, LocalSearch
from tests.router.colour_model import LABELS, solid_png, write_colour_model
from tests.router.test_tenancy_and_identity import MeanColourEmbedder


def test_indexed_images_feed_the_embeddings_monitor(tmp_path):
    model = write_colour_model(tmp_path / "colour.onnx")
    config = parse_app_config(
        {
            "models_dir": str(tmp_path),
            "default_task": "colour",
            "cascades": {
                "colour": {
                    "tier": {"model": str(model), "decoder": "classifier", "labels": LABELS, "size_hw": 32},
                    "policy": {"version": "colour-v1", "accept_threshold": 0.9, "escalate_threshold": 0.2},
                }
            },
            "review": {"path": str(tmp_path / "review")},
            "retrieval": {"enabled": True, "index_dir": str(tmp_path / "index"), "index_analysed": True},
            "drift": {"embedding_fraction": 1.0, "reference_size": 20, "window_size": 20, "every": 5},
        }
    )
    search = SearchService(config.retrieval, embedder=MeanColourEmbedder())
    tier = LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir)
    service = VisionRouteService.build(config, tiers={"colour": tier}, search=LocalSearch(search))

    async def scenario():
        for i in range(30):
            image = solid_png((200 + i % 40, 10 + i, 30))
            await service.analyze.analyze(ImageRequest(image, f"r{i}"), None)
        await service.rollouts.drain()

    try:
        asyncio.run(scenario())
        service.drift.drain()
        (row,) = [r for r in service.drift.report().to_json()["monitors"] if r["monitor"] == "embeddings"]
        assert row["observed"] == 30 and row["n_window"] >= 10, row
    finally:
        service.drift.close()
        search.close()
