"""Work the answer does not need, off the request's path and bounded (docs/architecture.md).

- ``AfterResponseWork``: what a request spawns after its response (a rollout's shadow run, a
  drift embedding sample), at most ``limits.after_response_max_tasks`` in flight per replica;
  beyond that the work is shed and counted, never the request.
- ``IndexQueue``: analysed images on their way into the search index, written in batches (one
  ``SearchService.index_analyses`` call: one embedding pass and one durable write for many
  images) by one worker per replica, behind a queue of at most ``retrieval.index_queue.
  max_pending`` images; a full queue sheds the indexing and counts it. In ``eventual`` mode a
  batch lingers ``linger_ms`` for more images (a write costs a hop and a commit whatever its
  size); only the image's outcome and class probabilities cross to the search tier.

Both count what they shed in ``visionroute_after_response_shed_total{work}``.

Both stop with their replica (``stop``, from the Ingress's ``__del__``, which Ray Serve runs
after the replica's requests drained and before it removes the deployments the ingress calls):
from then on nothing new is admitted; what is queued or running gets a bounded wait; what is
left after it is dropped, counted and named in one log line (eventual indexing: the images'
requests were long answered; ``visionroute_search_index_dropped_total``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from retrieval.analysed import AnalysedImage, ProbabilitiesSource
from retrieval.config import RetrievalConfig
from router.services.analyze.context import Spawn
from router.services.backends import SearchBackend
from visionroute.records import Analysis
from visionroute.redaction import failure_summary

log = logging.getLogger("visionroute.service.analyze")

FLUSH_WAIT_S = 5.0  # a read waits at most this long for the replica's acknowledged index writes
STOPPED = "not indexed: the replica stopped before its batch was written"


class AfterResponseMetrics:
    """The shed counter and the index queue's depth, on the ingress's /metrics registry."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.shed = Counter(
            "visionroute_after_response_shed",
            "work after the response shed because its bound was reached (the request was served)",
            ["work"],
            registry=registry,
        )
        self.index_pending = Gauge(
            "visionroute_search_index_pending",
            "analysed images waiting on this replica to be written to the search index",
            registry=registry,
        )
        self.index_failed = Counter(
            "visionroute_search_index_failed",
            "analysed images whose batched index write failed (not indexed; the request was served)",
            registry=registry,
        )
        self.index_dropped = Counter(
            "visionroute_search_index_dropped",
            "analysed images still queued for the search index when their replica stopped (not indexed)",
            registry=registry,
        )


def _work_name(coroutine: Coroutine[Any, Any, Any]) -> str:
    """A spawned stage's class name (``RolloutEvidenceStage.run`` -> ``RolloutEvidenceStage``)."""
    parts = getattr(coroutine, "__qualname__", "work").split(".")
    return parts[-2] if len(parts) > 1 else parts[0]


class AfterResponseWork:
    """A bounded ``Spawn``: at most ``limit`` spawned coroutines run at once on this replica;
    one more is closed unrun and counted (``work``: the spawned stage's class). ``inner`` is
    where admitted work runs (``RolloutService.spawn``, so its ``drain`` waits for it too);
    None: tasks of this object's own."""

    def __init__(self, limit: int, metrics: AfterResponseMetrics, inner: Spawn | None = None) -> None:
        self.limit = limit
        self.metrics = metrics
        self.inner = inner
        self.in_flight = 0
        self.accepting = True  # False once the replica stops: nothing new starts
        self._tasks: set[asyncio.Task] = set()
        self._idle: asyncio.Event | None = None  # set when in_flight reaches 0 (``stop``)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if self.in_flight >= self.limit or not self.accepting:
            work = _work_name(coroutine)
            coroutine.close()  # never started: nothing half-done
            self.metrics.shed.labels(work).inc()
            why = "the replica is stopping" if not self.accepting else "the limit"
            log.debug("after-response work %s shed: %d in flight (%s)", work, self.in_flight, why)
            return
        self.in_flight += 1

        async def counted() -> None:
            try:
                await coroutine
            finally:
                self.in_flight -= 1
                if self.in_flight == 0 and self._idle is not None:
                    self._idle.set()

        if self.inner is not None:
            self.inner(counted())
            return
        task = asyncio.get_running_loop().create_task(counted())
        self._tasks.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the work spawned so far (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def close(self) -> None:
        """Admit nothing more (what is spawned from now on is shed, counted, never run)."""
        self.accepting = False

    async def stop(self, timeout_s: float) -> int:
        """``close``, then wait at most ``timeout_s`` for the work in flight; this object's own
        tasks still running after that are cancelled. Returns how many were still in flight."""
        self.close()
        if self.in_flight:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        left = self.in_flight
        if left:
            for task in list(self._tasks):
                task.cancel()  # work spawned into ``inner`` is left to its owner's drain
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
            log.warning(
                "stopping: %d after-response tasks still running after %.0f s were abandoned", left, timeout_s
            )
        return left


@dataclass(frozen=True)
class Indexed:
    """What became of one queued image: its search id and stored embedding, or why it has none."""

    search_id: int | None
    error: str | None = None
    vector: np.ndarray | None = field(default=None, compare=False, repr=False)  # (dim,) float32


class IndexQueue:
    """Analysed images to index, written in batches by one worker task per replica.

    ``submit`` never waits: it returns a future of the image's ``Indexed`` (never an exception),
    or None when the queue is full (shed, counted). The worker takes up to ``max_batch`` images
    per ``index_analysed`` call, in submission order, so a future resolving means every image
    submitted before it is written too (``flushed``). In ``eventual`` mode a batch that is not
    full waits ``linger_ms`` for more first (``flushed`` and ``stop`` cut the wait short).
    ``stop`` ends it with the replica.

    What crosses the hop is an ``AnalysedImage`` per image (retrieval/analysed.py): its outcome
    and class probabilities, without the pixels unless the search tier cannot reuse those
    probabilities (it answers ``pixels_needed`` once per kind of source; from then on this
    queue sends the pixels of images from that source)."""

    def __init__(
        self, search: SearchBackend | None, config: RetrievalConfig, metrics: AfterResponseMetrics
    ) -> None:
        self.enabled = search is not None and config.index_analysed
        self.search = search
        self.mode = config.index_queue.mode
        self.max_pending = config.index_queue.max_pending
        self.max_batch = config.index_queue.max_batch
        # Durable responses wait for their batch: they never linger.
        self.linger_s = config.index_queue.linger_ms / 1000.0 if self.mode == "eventual" else 0.0
        self.metrics = metrics
        self._pending: deque[tuple[Analysis, asyncio.Future]] = deque()
        self._writing: list[tuple[Analysis, asyncio.Future]] = []  # the batch being written
        self._worker: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None  # the worker's linger: set to write at once
        self.accepting = True  # False once the replica stops (``stop``)
        self._last: asyncio.Future | None = None  # the newest submitted image's future
        self._pixels_for: set[ProbabilitiesSource] = set()  # sources the search tier cannot reuse
        self._readers = 0  # ``flushed`` calls waiting now

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, analysis: Analysis) -> asyncio.Future | None:
        if len(self._pending) >= self.max_pending or not self.accepting:
            self.metrics.shed.labels("search_index").inc()
            return None
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((analysis, future))
        self._last = future
        self.metrics.index_pending.set(len(self._pending))
        worker = self._worker
        if worker is None or worker.done() or worker.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._write_batches())
        elif len(self._pending) >= self.max_batch:
            self._write_now()
        return future

    def _write_now(self) -> None:
        """End the worker's linger (a full batch, a read waiting for it, the replica stopping)."""
        if self._wake is not None:
            self._wake.set()

    async def _linger(self) -> None:
        if (
            self.linger_s <= 0
            or len(self._pending) >= self.max_batch
            or not self.accepting
            or self._readers  # a read waits for what is queued
        ):
            return
        self._wake.clear()  # every reason to write at once is checked above; a new one sets it
        try:
            await asyncio.wait_for(self._wake.wait(), self.linger_s)
        except asyncio.TimeoutError:
            pass

    async def _write_batches(self) -> None:
        while self._pending:
            await self._linger()
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            self._writing = batch
            self.metrics.index_pending.set(len(self._pending))
            try:
                answer = await self._index([analysis for analysis, _ in batch])
                vectors = answer.get("vectors")
                outcomes = [
                    Indexed(None if i is None else int(i), vector=None if vectors is None else vectors[n])
                    for n, i in enumerate(answer["ids"])
                ]
            except Exception as exc:  # the requests are long answered: recorded, counted, logged
                error = failure_summary(exc)
                when = " while the replica stops" if not self.accepting else ""
                log.warning("indexing %d analysed images for search failed%s: %s", len(batch), when, error)
                self.metrics.index_failed.inc(len(batch))
                outcomes = [Indexed(None, error)] * len(batch)
            self._writing = []
            for (_, future), outcome in zip(batch, outcomes):
                if not future.done():
                    future.set_result(outcome)

    def _compact(self, analysis: Analysis) -> AnalysedImage:
        image = AnalysedImage.from_analysis(analysis, with_pixels=False)
        if image.image_rgb is None and image.source in self._pixels_for:
            return AnalysedImage.from_analysis(analysis, with_pixels=True)
        return image

    async def _index(self, analyses: list[Analysis]) -> dict[str, Any]:
        """One batch through ``SearchService.index_analysed``: ``{"ids", "vectors"}``."""
        images = [self._compact(analysis) for analysis in analyses]
        answer = await self.search.call("index_analysed", images)
        needed = answer.get("pixels_needed")
        if needed:
            sources = {images[i].source for i in needed}
            log.info("the search tier embeds images from %s from their pixels: sending them", list(sources))
            self._pixels_for |= sources
            images = [self._compact(analysis) for analysis in analyses]
            answer = await self.search.call("index_analysed", images)
            if answer.get("pixels_needed"):
                raise RuntimeError(f"the search tier still asks for pixels: {answer['pixels_needed']}")
        return answer

    async def stop(self, timeout_s: float) -> int:
        """Stop with the replica: admit nothing more (``submit`` sheds), give the worker at most
        ``timeout_s`` to write what is queued, then cancel it. Every image not written by then
        gets ``Indexed(None, STOPPED)``, is counted in ``index_dropped`` and its request id is
        logged on one line (eventual: its request was answered ``queued``; the image is
        searchable once indexed again, e.g. by analysing it again). Returns how many."""
        self.accepting = False
        self._write_now()  # a lingering batch is written now
        worker = self._worker
        if worker is not None and not worker.done() and worker.get_loop() is asyncio.get_running_loop():
            done, _ = await asyncio.wait({worker}, timeout=timeout_s)
            if not done:
                worker.cancel()  # its search call is cancelled with it; never awaited past this
                await asyncio.wait({worker}, timeout=1.0)
        dropped = [entry for entry in (*self._writing, *self._pending) if not entry[1].done()]
        self._writing = []
        self._pending.clear()
        self.metrics.index_pending.set(0)
        for _, future in dropped:
            future.set_result(Indexed(None, STOPPED))
        if dropped:
            self.metrics.index_dropped.inc(len(dropped))
            ids = [analysis.trace.request_id for analysis, _ in dropped]
            shown = ", ".join(ids[:20]) + (f" (+{len(ids) - 20} more)" if len(ids) > 20 else "")
            log.warning(
                "stopping: %d analysed images queued for search were not indexed (%s mode, waited %.0f s): "
                "requests %s",
                len(dropped),
                self.mode,
                timeout_s,
                shown,
            )
        return len(dropped)

    async def flushed(self, timeout_s: float = FLUSH_WAIT_S) -> None:
        """Wait (at most ``timeout_s``) until every image submitted so far is written or failed:
        a read after this sees what this replica acknowledged before it."""
        last = self._last
        if last is None or last.done():
            return
        if last.get_loop() is not asyncio.get_running_loop():
            return  # another loop's queue (tests); nothing to wait for here
        self._readers += 1  # no batch lingers while a read waits for it
        self._write_now()
        try:
            await asyncio.wait_for(asyncio.shield(last), timeout_s)
        except asyncio.TimeoutError:
            log.warning("search read went ahead with %d images still waiting to be indexed", self.pending)
        finally:
            self._readers -= 1


class ReadYourWrites:
    """A ``SearchBackend`` whose every call first waits for this replica's queued index writes
    (``IndexQueue.flushed``): a search, a read or a review label through the same ingress replica
    sees every analysed image it acknowledged before the call (eventual across replicas)."""

    def __init__(self, backend: SearchBackend, queue: IndexQueue) -> None:
        self.backend = backend
        self.queue = queue

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        await self.queue.flushed()
        return await self.backend.call(method, *args, **kwargs)
