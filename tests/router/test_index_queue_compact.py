"""What crosses the hop to the search tier when analysed images are indexed (issue 24): the
outcome and the class probabilities, the pixels only where the embedder cannot reuse those; the
write answers with the stored embeddings (the drift monitor's sample needs no read back); an
``eventual`` batch lingers for more images, but never while a read waits for it."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from retrieval.config import RetrievalConfig
from retrieval.embedders.base import l2_normalise
from retrieval.service import SearchService
from router.services.analyze.after_response import AfterResponseMetrics, IndexQueue, ReadYourWrites
from router.services.analyze.stages import DriftEmbeddingStage, SearchIndexStage
from router.services.backends import LocalSearch
from tests.router.colour_model import colour_app_config
from tests.router.test_after_response import GatedSearch, analysis, context, retrieval
from visionroute.records import ClassProbabilities, Detections

CLASSES = ("red", "green", "blue")
OURS = "a" * 64  # the model file the embedder would run itself


class ProbabilityEmbedder:
    """Embeds pixels by mean colour and reuses probabilities made by the ``OURS`` model only."""

    space, dim = "test-probabilities", 3

    def __init__(self) -> None:
        self.pixel_images = 0

    def reuses(self, probabilities):
        return probabilities is not None and probabilities.model_sha256 == OURS

    def embed_probabilities(self, probabilities):
        return l2_normalise(np.asarray(probabilities) + 0.1)

    def embed_images(self, images_rgb):
        self.pixel_images += len(images_rgb)
        return l2_normalise(np.array([img.reshape(-1, 3).mean(0) + 1.0 for img in images_rgb]))

    def embed_texts(self, texts):
        return l2_normalise(np.ones((len(texts), self.dim)))


def classified(request_id: str, model_sha256: str | None, colour=(10, 20, 30), tenant: str = "t"):
    made = analysis(request_id, colour, tenant)
    values = np.array([0.7, 0.2, 0.1]) if model_sha256 == OURS else np.array([0.1, 0.3, 0.6])
    detections = Detections.from_class_probabilities(values, CLASSES, width=8, height=8, top_k=1)
    made.detections = dataclasses.replace(
        detections, class_probabilities=ClassProbabilities(values, "stretch-8", model_sha256)
    )
    return made


class Recording(LocalSearch):
    """The real service in process, recording which images crossed with their pixels."""

    def __init__(self, service) -> None:
        super().__init__(service)
        self.calls: list[list[tuple[str, bool]]] = []
        self.methods: list[str] = []

    async def call(self, method, *args, **kwargs):
        self.methods.append(method)
        if method == "index_analysed":
            self.calls.append([(a.request_id, a.image_rgb is not None) for a in args[0]])
        return await super().call(method, *args, **kwargs)


def test_pixels_cross_only_where_the_probabilities_cannot_be_reused(tmp_path):
    embedder = ProbabilityEmbedder()
    config = RetrievalConfig(index_dir=tmp_path / "index", index_analysed=True)
    with SearchService(config, embedder=embedder) as service:
        search = Recording(service)
        queue = IndexQueue(search, retrieval(tmp_path, "durable"), AfterResponseMetrics(None))

        async def scenario():
            first = [
                queue.submit(classified("ours", OURS, (200, 0, 0))),
                queue.submit(classified("other", "b" * 64, (0, 200, 0))),
                queue.submit(analysis("none", (0, 0, 200))),  # no probabilities: its pixels, always
            ]
            first = [await f for f in first]
            second = [
                await queue.submit(classified("ours-2", OURS, (100, 0, 0))),
                await queue.submit(classified("other-2", "b" * 64, (0, 100, 0))),
            ]
            return first, second

        first, second = asyncio.run(scenario())
        assert all(o.error is None and o.search_id is not None for o in first + second)
        # The first batch was refused once (nothing written), then sent with the other model's pixels;
        # from then on that model's images carry their pixels at once, ours never do.
        assert search.calls == [
            [("ours", False), ("other", False), ("none", True)],
            [("ours", False), ("other", True), ("none", True)],
            [("ours-2", False)],
            [("other-2", True)],
        ]
        assert service.reused_embeddings == 2 and embedder.pixel_images == 3
        assert len(service.index) == 5 and service.index.store.last_seq() == 5  # written once each
        for outcome in first + second:  # the answer's embedding is the stored one
            _, stored = service.index.get(outcome.search_id)
            np.testing.assert_array_equal(outcome.vector, stored)


def test_the_drift_sample_takes_the_embedding_the_write_answered_with(tmp_path):
    config = colour_app_config(tmp_path)
    config = config.model_copy(update={"drift": config.drift.model_copy(update={"embedding_fraction": 1.0})})
    seen = []

    class Drift:
        def observe_embedding(self, task, vector):
            seen.append((task, np.asarray(vector).tolist()))

    embedder = ProbabilityEmbedder()
    retrieval_config = RetrievalConfig(index_dir=tmp_path / "index", index_analysed=True)
    with SearchService(retrieval_config, embedder=embedder) as service:
        search = Recording(service)
        queue = IndexQueue(search, retrieval(tmp_path, "eventual", linger_ms=0), AfterResponseMetrics(None))

        async def scenario():
            ctx = context("r")
            ctx.analysis = classified("r", OURS)
            await SearchIndexStage(queue).run(ctx)
            stage = DriftEmbeddingStage(config, Drift(), search)
            assert stage.wants(ctx)
            await stage.run(ctx)
            return (await ctx.search_indexed).search_id

        search_id = asyncio.run(scenario())
        _, stored = service.index.get(search_id)
    assert search.methods == ["index_analysed"]  # no query_vector hop to read it back
    assert seen == [("colour", stored.tolist())]


def test_the_same_image_is_found_per_tenant_in_one_lookup(tmp_path):
    config = RetrievalConfig(index_dir=tmp_path / "index", index_analysed=True)
    with SearchService(config, embedder=ProbabilityEmbedder()) as service:
        red = (200, 0, 0)
        first = service.index_analyses([analysis("a", red, tenant="t"), analysis("b", red, tenant="u")])
        assert first[0] != first[1]  # one image, two tenants: two entries
        again = service.index_analyses([analysis("c", red, tenant="u"), analysis("d", (0, 9, 0), tenant="t")])
        assert again[0] == first[1] and again[1] not in first  # u's replaced, t's new image added
        assert service.get(first[0])["metadata"]["extra"] == {"request_id": "a"}  # t's untouched
        assert service.get(first[1])["metadata"]["extra"] == {"request_id": "c"}
        assert service.index.find_images([("t", f"sha-{red}"), ("v", f"sha-{red}")]) == {
            ("t", f"sha-{red}"): first[0]
        }


class Echo:
    async def call(self, method, *args):
        return method


@pytest.mark.parametrize("mode", ["eventual", "durable"])
def test_a_batch_lingers_for_more_images_in_eventual_mode_only_and_never_for_a_read(tmp_path, mode):
    search = GatedSearch()
    search.gate.set()
    queue = IndexQueue(search, retrieval(tmp_path, mode, linger_ms=300), AfterResponseMetrics(None))

    async def scenario():
        first = queue.submit(analysis("r0"))
        await asyncio.sleep(0.05)  # within the linger: r1 joins r0's batch (eventual)
        queue.submit(analysis("r1"))
        await asyncio.sleep(0.05)
        queue.submit(analysis("r2"))
        read = asyncio.get_running_loop().time()
        assert await ReadYourWrites(Echo(), queue).call("search_text") == "search_text"  # written first
        waited = asyncio.get_running_loop().time() - read
        await first
        return waited

    waited = asyncio.run(scenario())
    if mode == "eventual":
        assert search.batches == [["r0", "r1", "r2"]] and waited < 0.25
    else:  # a durable response waits for its batch: it never lingers
        assert search.batches[0] == ["r0"]


def test_linger_is_validated_with_its_field_named(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="linger_ms"):
        retrieval(tmp_path, linger_ms=-1)
