"""The work after responses stops with its replica (after_response.py ``stop``, called from the
Ingress's ``__del__``): nothing new is admitted, what is queued gets a bounded wait, what is left
is dropped, counted and logged on one line, and no search call is left running."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from router.services.analyze.after_response import (
    STOPPED,
    AfterResponseMetrics,
    AfterResponseWork,
    IndexQueue,
)
from tests.router.test_after_response import GatedSearch, analysis, retrieval, shed_count


class Search(GatedSearch):
    """GatedSearch that also records each call's start and whether it was cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.started = 0
        self.cancelled = 0

    async def call(self, method, *args):
        self.started += 1
        try:
            return await super().call(method, *args)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def test_stop_writes_what_is_queued_within_the_wait_and_then_admits_nothing(tmp_path):
    registry = CollectorRegistry()
    search = Search()
    queue = IndexQueue(search, retrieval(tmp_path, max_batch=2), AfterResponseMetrics(registry))

    async def scenario():
        futures = [queue.submit(analysis(f"r{n}")) for n in range(5)]
        stopping = asyncio.create_task(queue.stop(timeout_s=5.0))
        await asyncio.sleep(0.05)
        assert not stopping.done()  # the queued images are still being written: it waits
        assert queue.submit(analysis("late")) is None  # ... but admits nothing new
        search.gate.set()
        dropped = await stopping
        return dropped, [f.result() for f in futures]

    dropped, outcomes = asyncio.run(scenario())
    assert dropped == 0
    assert [o.search_id for o in outcomes] == [0, 1, 2, 3, 4] and all(o.error is None for o in outcomes)
    assert search.batches == [["r0", "r1"], ["r2", "r3"], ["r4"]]  # in order, max_batch each
    assert shed_count(registry, "search_index") == 1  # the late one, counted like a full queue
    assert (registry.get_sample_value("visionroute_search_index_dropped_total") or 0.0) == 0.0


def test_stop_after_its_wait_cancels_the_write_and_records_every_image_it_drops(tmp_path, caplog):
    registry = CollectorRegistry()
    search = Search()  # the gate never opens: a search deployment that no longer answers
    queue = IndexQueue(search, retrieval(tmp_path, max_batch=2), AfterResponseMetrics(registry))

    async def scenario():
        futures = [queue.submit(analysis(f"r{n}")) for n in range(3)]
        await asyncio.sleep(0)  # the worker takes r0, r1 (the batch in flight); r2 waits
        with caplog.at_level(logging.WARNING, logger="visionroute.service.analyze"):
            dropped = await asyncio.wait_for(queue.stop(timeout_s=0.2), 5.0)
        return dropped, [f.result() for f in futures]

    dropped, outcomes = asyncio.run(scenario())
    assert dropped == 3 and all(o == outcomes[0] for o in outcomes)
    assert outcomes[0].search_id is None and outcomes[0].error == STOPPED
    assert search.started == 1 and search.cancelled == 1  # the write in flight was cancelled, no more began
    assert queue.pending == 0 and queue._worker.done()
    assert registry.get_sample_value("visionroute_search_index_dropped_total") == 3
    assert registry.get_sample_value("visionroute_search_index_pending") == 0
    lines = [r for r in caplog.records if "not indexed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None  # one line, no traceback
    assert all(f"r{n}" in lines[0].getMessage() for n in range(3))  # which requests' images


def test_a_failed_write_while_stopping_is_one_line_without_a_traceback(tmp_path, caplog):
    registry = CollectorRegistry()

    class Gone:
        async def call(self, method, *args):
            raise RuntimeError("Deployment 'search' is being deleted")

    queue = IndexQueue(Gone(), retrieval(tmp_path), AfterResponseMetrics(registry))

    async def scenario():
        future = queue.submit(analysis("r0"))  # written only once stop() waits: it fails then
        with caplog.at_level(logging.WARNING, logger="visionroute.service.analyze"):
            dropped = await queue.stop(timeout_s=1.0)
        return dropped, future.result()

    dropped, outcome = asyncio.run(scenario())
    assert dropped == 0 and outcome.search_id is None and "being deleted" in outcome.error
    (line,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "while the replica stops" in line.getMessage() and line.exc_info is None
    assert registry.get_sample_value("visionroute_search_index_failed_total") == 1


def test_after_response_work_stops_admitting_waits_bounded_then_cancels():
    registry = CollectorRegistry()
    work = AfterResponseWork(10, AfterResponseMetrics(registry))
    finished: list[str] = []

    class DriftEmbeddingStage:
        async def run(self, name: str, delay_s: float) -> None:
            await asyncio.sleep(delay_s)
            finished.append(name)

    async def scenario():
        work.spawn(DriftEmbeddingStage().run("quick", 0.01))
        work.spawn(DriftEmbeddingStage().run("stuck", 60.0))
        abandoned = await asyncio.wait_for(work.stop(timeout_s=0.3), 5.0)
        work.spawn(DriftEmbeddingStage().run("late", 0.0))  # closed unrun (no un-awaited warning)
        await asyncio.sleep(0.05)
        return abandoned

    abandoned = asyncio.run(scenario())
    assert abandoned == 1 and finished == ["quick"] and work.in_flight == 0
    assert shed_count(registry, "DriftEmbeddingStage") == 1  # the late one
