"""The cheap tier batched across one actor's concurrent analyses (the batch job's ``serve.batch``).

The actor runs a Ray Data batch's analyses concurrently; each reaches ``predict`` after its own
decode. Waiting a fixed time for company (as serve.batch does) either wastes that time or cuts
batches short, but here the actor knows how many analyses may still come: it ``expect``s them,
each either calls ``predict`` or ``leave``s (failed before the tier, or served by another one),
and a batch runs as soon as it is full or nobody else can join it. An image never waits longer
than ``max_wait_s`` for company: an analysis held up before the tier (the decode budget's wait
for pixels in flight) cannot hold the others back.
"""

from __future__ import annotations

import asyncio
import contextvars
from pathlib import Path
from typing import Any

import numpy as np

from cascades.pipeline import TierResult

_reached_tier: contextvars.ContextVar[bool] = contextvars.ContextVar("reached_tier", default=False)


class GatheredOnnxTier:
    """A ``CheapTierClient`` over one ONNX stage whose concurrent calls share ONNX Runtime runs."""

    def __init__(
        self, stage_config: dict[str, Any], models_dir: Path, max_batch_size: int, max_wait_s: float = 0.1
    ) -> None:
        from cascades.onnx_stage import OnnxStage, OnnxStageConfig

        self.stage = OnnxStage(OnnxStageConfig(**stage_config), models_dir=Path(models_dir))
        self.max_batch_size = max(1, int(max_batch_size))
        self.info = self.stage.describe()
        self._waiting: list[tuple[np.ndarray, asyncio.Future]] = []
        self._expected = 0  # analyses that may still call predict
        self._running: set[asyncio.Task] = set()  # asyncio holds tasks weakly: these are ours
        self.max_wait_s = max_wait_s
        self._timer: asyncio.TimerHandle | None = None  # runs what waits, at most max_wait_s on
        self._one_run: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self.runs = 0  # ONNX Runtime calls made (the tests and the summary read it)

    # -- the actor's side ----------------------------------------------------------------------

    def expect(self, count: int) -> None:
        """``count`` more analyses are starting; each will ``predict`` or ``leave``."""
        self._expected += count

    def leave(self) -> None:
        """One expected analysis will not call ``predict`` (it ended, or failed, before it)."""
        self._expected -= 1
        self._flush_if_ready()

    @staticmethod
    def reached() -> bool:
        """Whether the current analysis (task) called ``predict``."""
        return _reached_tier.get()

    # -- CheapTierClient -----------------------------------------------------------------------

    async def predict(self, image_rgb: np.ndarray) -> TierResult:
        _reached_tier.set(True)
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((image_rgb, future))
        self._expected -= 1
        self._flush_if_ready()
        return await future

    async def describe(self) -> dict[str, Any]:
        return {**self.info, "placement": "batch"}

    # -- batching ------------------------------------------------------------------------------

    def _flush_if_ready(self, force: bool = False) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting and (force or len(self._waiting) >= self.max_batch_size or self._expected <= 0):
            batch, self._waiting = self._waiting[: self.max_batch_size], self._waiting[self.max_batch_size :]
            task = loop.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        if self._waiting and self._timer is None:
            self._timer = loop.call_later(self.max_wait_s, self._waited_enough)
        elif not self._waiting and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _waited_enough(self) -> None:
        self._timer = None
        self._flush_if_ready(force=True)

    def _run_lock(self) -> asyncio.Lock:
        """One ONNX Runtime run at a time (its intra-op threads already use the cores; as
        serve.batch runs one batch at a time per replica); one lock per event loop."""
        loop = asyncio.get_running_loop()
        if self._one_run is None or self._one_run[0] is not loop:
            self._one_run = (loop, asyncio.Lock())
        return self._one_run[1]

    async def _run(self, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        self.runs += 1
        try:
            async with self._run_lock():
                # ONNX Runtime releases the GIL: the next images decode while this batch runs
                detections, latency_ms = await asyncio.to_thread(
                    self.stage.predict, [image for image, _ in batch]
                )
        except Exception as exc:  # every image of the batch fails the way a lone one would
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), found in zip(batch, detections):
            if not future.done():
                future.set_result(
                    TierResult(
                        detections=found,
                        model=self.info["model"],
                        model_version=self.info["model_version"],
                        latency_ms=latency_ms,
                        cost_units=self.stage.config.cost_units,
                        calibration=self.info["calibration"],
                    )
                )
