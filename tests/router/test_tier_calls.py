"""A batch request's cheap-tier calls gathered into one (router/services/analyze/tier_calls.py):
the service core over the colour model, a real SQLite review queue and budget ledger."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from router.services import VisionRouteService
from router.services.analyze.tier_calls import TierCalls
from router.services.backends import LocalOnnxTier
from router.services.batch import BatchImage
from tests.router.colour_model import colour_app_config, solid_png

RED, GREY = solid_png((255, 0, 0)), solid_png((128, 128, 128))
KEEP = {"privacy": {"faces": "keep", "text": "keep"}}


class ManyTier:
    """The colour tier, recording each batch call's size; ``fail`` makes every call raise."""

    def __init__(self, tier: LocalOnnxTier, fail: bool = False) -> None:
        self.tier, self.fail, self.sizes, self.single = tier, fail, [], 0

    async def predict(self, image_rgb):
        self.single += 1
        return await self.tier.predict(image_rgb)

    async def predict_many(self, images):
        self.sizes.append(len(images))
        if self.fail:
            raise ConnectionError("the tier replica went away")
        return await self.tier.predict_many(images)

    async def describe(self):
        return await self.tier.describe()


def build(tmp_path, fail: bool = False, **limits):
    config = colour_app_config(tmp_path, policies=KEEP)
    config = config.model_copy(update={"limits": config.limits.model_copy(update=limits)})
    tier = ManyTier(LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir), fail)
    return VisionRouteService.build(config, tiers={"colour": tier}), tier


def test_a_batch_makes_one_cheap_tier_call_and_each_image_keeps_its_own_answer(tmp_path):
    service, tier = build(tmp_path, batch_concurrency=8)
    images = [BatchImage(RED), BatchImage(GREY), BatchImage(b"no image"), BatchImage(RED), BatchImage(GREY)]

    async def both():
        batch = await service.batch.analyze_batch(images, "g1", None)
        alone = [
            await service.analyze.analyze(_request(i, image), None)
            for i, image in enumerate(images)
            if i != 2
        ]
        return batch, alone

    batch, alone = asyncio.run(both())
    assert tier.sizes[0] == 4 and tier.single == 4  # the batch: one call of its 4 images; alone: 4 calls
    answered = [item.analysis for item in batch.items if item.analysis is not None]
    assert [a.decision for a in answered] == [a.decision for a in alone]
    assert [a.detections.labels for a in answered] == [a.detections.labels for a in alone]
    assert [a.trace.request_id for a in answered] == ["g1:0", "g1:1", "g1:3", "g1:4"]
    assert batch.items[2].error is not None and batch.items[2].error.field == "images[2]"


def test_waves_under_the_concurrency_limit_are_one_call_each(tmp_path):
    service, tier = build(tmp_path, batch_concurrency=2)
    result = asyncio.run(service.batch.analyze_batch([BatchImage(RED)] * 4, "g2", None))
    assert result.succeeded == 4 and tier.sizes == [2, 2] and tier.single == 0


def test_a_failed_call_is_each_images_review_step_not_the_batchs_error(tmp_path):
    service, tier = build(tmp_path, fail=True)
    result = asyncio.run(service.batch.analyze_batch([BatchImage(RED), BatchImage(GREY)], "g3", None))
    assert tier.sizes == [2] and result.succeeded == 2
    for item in result.items:
        step = next(s for s in item.analysis.trace if s.stage.startswith("onnx:"))
        assert item.analysis.decision.value == "review" and "ConnectionError" in step.error


def test_an_image_held_elsewhere_delays_the_others_at_most_wait_s():
    class Echo:
        async def predict_many(self, images):
            return [float(image.sum()) for image in images]

    async def scenario():
        calls = TierCalls(max_images=8, wait_s=0.05)
        held, caller = calls.enter(), calls.enter()  # ``held`` never reaches the tier
        started = time.perf_counter()
        value = await caller.bound(Echo())(np.ones((2, 2)))
        waited = time.perf_counter() - started
        held.leave()
        return value, waited, calls.calls

    value, waited, made = asyncio.run(scenario())
    assert value == 4.0 and made == 1 and 0.04 <= waited < 1.0


def _request(index, image):
    from router.services.analyze import ImageRequest

    return ImageRequest(image.image_bytes, f"alone:{index}")
