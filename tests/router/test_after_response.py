"""Work the answer does not need: batched, bounded indexing and bounded after-response work
(router/services/analyze/after_response.py), and the batched index write underneath it."""

from __future__ import annotations

import asyncio
import warnings

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from retrieval.config import RetrievalConfig
from retrieval.embedders.base import l2_normalise
from retrieval.service import SearchService
from router.services.analyze.after_response import (
    AfterResponseMetrics,
    AfterResponseWork,
    IndexQueue,
    ReadYourWrites,
)
from router.services.analyze.context import ImageRequest, RequestContext
from router.services.analyze.stages import DriftEmbeddingStage, SearchIndexStage
from tests.router.colour_model import colour_app_config
from visionroute.records import Analysis, Decision, Step, Trace


def analysis(request_id: str, colour=(10, 20, 30), tenant: str = "t") -> Analysis:
    image = np.full((8, 8, 3), colour, np.uint8)
    made = Analysis(
        image_rgb=image, image_sha256=f"sha-{colour}", task="colour", tenant=tenant, trace=Trace(request_id)
    )
    made.trace.append(Step(stage="policy:thresholds", decision=Decision.ACCEPT))
    return made


def context(request_id: str) -> RequestContext:
    ctx = RequestContext(ImageRequest(b"png", request_id), None)
    ctx.analysis = analysis(request_id)
    return ctx


def retrieval(tmp_path, mode: str = "eventual", **queue) -> RetrievalConfig:
    return RetrievalConfig.model_validate(
        {
            "index_dir": str(tmp_path / "index"),
            "index_analysed": True,
            "index_queue": {"mode": mode, **queue},
        }
    )


class GatedSearch:
    """Records each index_analysed batch; holds every write until ``gate`` is set."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.next_id = 0

    async def call(self, method, *args):
        assert method == "index_analysed"
        await self.gate.wait()
        self.batches.append([a.request_id for a in args[0]])
        ids = list(range(self.next_id, self.next_id + len(args[0])))
        self.next_id += len(args[0])
        return {"ids": ids, "vectors": None}


def shed_count(registry: CollectorRegistry, work: str) -> float:
    return registry.get_sample_value("visionroute_after_response_shed_total", {"work": work}) or 0.0


def test_eventual_indexing_never_waits_batches_the_backlog_and_sheds_when_full(tmp_path):
    registry = CollectorRegistry()
    metrics = AfterResponseMetrics(registry)
    search = GatedSearch()
    queue = IndexQueue(search, retrieval(tmp_path, max_pending=4, max_batch=8, linger_ms=0), metrics)
    stage = SearchIndexStage(queue)

    async def scenario():
        contexts = [context(f"r{n}") for n in range(6)]
        for ctx in contexts:  # the write is held: none of these may wait for it
            await asyncio.wait_for(stage.run(ctx), 1.0)
        steps = [ctx.analysis.trace.steps[-1] for ctx in contexts]
        # r0 went to the worker at once; r1-r4 fill the queue (4); r5 is shed, the request served
        assert [s.details["search_index"]["status"] for s in steps] == ["queued"] * 5 + ["shed"]
        assert all(s.details["search_index"]["mode"] == "eventual" for s in steps)
        assert all(s.details["search_id"] is None and s.decision is None for s in steps)
        assert steps[-1].error and contexts[-1].search_indexed is None
        assert shed_count(registry, "search_index") == 1
        assert registry.get_sample_value("visionroute_search_index_pending") == 4
        reader = ReadYourWrites(SimpleBackend(), queue)
        read = asyncio.create_task(reader.call("search_text", "x"))
        await asyncio.sleep(0.05)
        assert not read.done()  # a read waits for what this replica acknowledged before it
        search.gate.set()
        assert await read == "search_text"
        ids = [(await ctx.search_indexed).search_id for ctx in contexts[:5]]
        assert ids == [0, 1, 2, 3, 4]  # in submission order
        assert search.batches == [["r0"], ["r1", "r2", "r3", "r4"]]  # the backlog in one write

    asyncio.run(scenario())


class SimpleBackend:
    async def call(self, method, *args):
        return method


def test_durable_indexing_waits_for_its_batch_and_a_failed_write_is_recorded(tmp_path):
    metrics = AfterResponseMetrics(CollectorRegistry())

    class Failing:
        async def call(self, method, *args):
            raise ConnectionError("search replica gone")

    async def scenario():
        ok, failed = context("ok"), context("failed")
        search = GatedSearch()
        search.gate.set()
        await SearchIndexStage(IndexQueue(search, retrieval(tmp_path, "durable"), metrics)).run(ok)
        await SearchIndexStage(IndexQueue(Failing(), retrieval(tmp_path, "durable"), metrics)).run(failed)
        return ok, failed

    ok, failed = asyncio.run(scenario())
    (step,) = ok.analysis.trace.steps[-1:]
    assert ok.search_id == 0 and step.details == {
        "search_id": 0,
        "search_index": {"mode": "durable", "status": "indexed"},
    }
    step = failed.analysis.trace.steps[-1]
    assert failed.search_id is None and "ConnectionError" in step.error and step.decision is None
    assert step.details["search_index"] == {"mode": "durable", "status": "failed"}


def test_after_response_work_is_bounded_and_what_it_sheds_never_runs():
    registry = CollectorRegistry()
    work = AfterResponseWork(2, AfterResponseMetrics(registry))
    ran: list[int] = []

    class RolloutEvidenceStage:
        async def run(self, n: int, gate: asyncio.Event) -> None:
            await gate.wait()
            ran.append(n)

    async def scenario():
        gate = asyncio.Event()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a shed coroutine is closed, never left un-awaited
            for n in range(4):
                work.spawn(RolloutEvidenceStage().run(n, gate))
        assert work.in_flight == 2
        gate.set()
        await work.drain()

    asyncio.run(scenario())
    assert sorted(ran) == [0, 1] and work.in_flight == 0
    assert shed_count(registry, "RolloutEvidenceStage") == 2


def test_drift_embedding_of_an_eventually_indexed_image_is_read_once_written(tmp_path):
    config = colour_app_config(tmp_path)
    config = config.model_copy(update={"drift": config.drift.model_copy(update={"embedding_fraction": 1.0})})
    seen = []

    class Drift:
        def observe_embedding(self, task, vector):
            seen.append((task, vector))

    class Search(GatedSearch):
        async def call(self, method, *args):
            if method == "query_vector":
                return {"vector": [float(args[1])]}
            return await super().call(method, *args)

    async def scenario():
        search = Search()
        search.gate.set()
        queue = IndexQueue(search, retrieval(tmp_path, "eventual"), AfterResponseMetrics(None))
        ctx = context("r")
        await SearchIndexStage(queue).run(ctx)
        stage = DriftEmbeddingStage(config, Drift(), search)
        assert stage.wants(ctx)
        await stage.run(ctx)

    asyncio.run(scenario())
    assert seen == [("colour", [0.0])]


class FlatEmbedder:
    space, dim = "test-flat", 3

    def __init__(self) -> None:
        self.calls = 0

    def embed_images(self, images_rgb):
        self.calls += 1
        return l2_normalise(np.array([img.reshape(-1, 3).mean(0) + 1.0 for img in images_rgb]))

    def embed_texts(self, texts):
        return l2_normalise(np.ones((len(texts), self.dim)))


def test_index_analyses_embeds_once_writes_once_and_keeps_one_entry_per_image(tmp_path):
    embedder = FlatEmbedder()
    config = RetrievalConfig(index_dir=tmp_path / "index", index_analysed=True)
    with SearchService(config, embedder=embedder) as service:
        red, blue = (200, 0, 0), (0, 0, 200)
        batch = [analysis("a", red), analysis("b", blue), analysis("c", red), analysis("d", red, tenant="u")]
        ids = service.index_analyses(batch)
        assert embedder.calls == 1
        assert ids[0] == ids[2] and len(set(ids)) == 3  # the same image of one tenant: one entry
        assert service.get(ids[0])["metadata"]["extra"] == {"request_id": "c"}  # the later one's
        assert service.index.store.last_seq() == 3  # three adds, nothing replaced within the batch
        again = service.index_analyses([analysis("e", blue)])
        assert again == [ids[1]] and len(service.index) == 3  # replaced, not doubled
        assert service.index_analyses([]) == []


@pytest.mark.parametrize("mode", ["eventual", "durable"])
def test_index_queue_config_names_the_field_on_bad_values(tmp_path, mode):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_pending"):
        retrieval(tmp_path, mode, max_pending=0)
