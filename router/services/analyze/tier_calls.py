"""One batch request's cheap-tier calls, gathered: the images of ``POST /v1/analyze/batch`` that
reach the cheap tier together go to it as one call (``predict_many``: one handle hop, one ONNX
Runtime run of the stacked images where the model's batch dimension allows), not one call each.

Each image still runs its own analyse pipeline (its own decode, budget, decision, trace); only
the cheap tier's call is shared. An image that has entered the pipeline and not yet reached the
cheap tier is *active*; the gathered calls go out as soon as no image is active (every image
that will call has called), when ``max_images`` are waiting, or after ``wait_s`` at the latest
(an image held back elsewhere, e.g. by the decode budget, never holds the others longer).
A failed call fails each of its images' calls alike: each image's cheap-tier stage records it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cascades.pipeline import TierResult
from router.services.backends import CheapTierClient


@dataclass(eq=False)
class _Waiting:
    tier: CheapTierClient
    image: np.ndarray
    future: asyncio.Future[TierResult]


@dataclass(eq=False)
class TierCalls:
    """The gathering point of one batch request (one event loop)."""

    max_images: int = 32
    wait_s: float = 0.02
    active: int = 0
    waiting: list[_Waiting] = field(default_factory=list)
    calls: int = 0  # cheap-tier calls made (tests and the bench read it)
    _timer: asyncio.TimerHandle | None = None
    _running: set[asyncio.Task[None]] = field(default_factory=set)

    def enter(self) -> Lane:
        """An image starts its pipeline: the gathered calls wait for it (up to ``wait_s``)."""
        self.active += 1
        return Lane(self)

    def _arrive(self, tier: CheapTierClient, image: np.ndarray) -> asyncio.Future[TierResult]:
        future: asyncio.Future[TierResult] = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(tier, image, future))
        self.active -= 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.wait_s, self.flush)
        self._maybe_flush()
        return future

    def _left(self) -> None:
        self.active -= 1
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self.waiting and (self.active <= 0 or len(self.waiting) >= self.max_images):
            self.flush()

    def flush(self) -> None:
        """Send what waits now: one call per cheap tier (a rollout may serve two)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self.waiting = self.waiting, []
        by_tier: dict[int, list[_Waiting]] = {}
        for one in waiting:
            by_tier.setdefault(id(one.tier), []).append(one)
        for group in by_tier.values():
            self.calls += 1
            task = asyncio.get_running_loop().create_task(_call(group))
            self._running.add(task)  # a reference until done (the loop keeps only weak ones)
            task.add_done_callback(self._running.discard)


class Lane:
    """One image's place in the gathering: its cheap-tier call joins the others'; ``leave``
    when its pipeline ends (an image that never called no longer holds the others)."""

    def __init__(self, calls: TierCalls) -> None:
        self.calls = calls
        self.active = True

    def bound(self, tier: CheapTierClient) -> Any:
        """``tier.predict`` for this image, gathered with the batch's other images."""

        async def predict(image_rgb: np.ndarray) -> TierResult:
            if not self.active:  # a second call of the same image (not made today): on its own
                return await tier.predict(image_rgb)
            self.active = False
            return await self.calls._arrive(tier, image_rgb)

        return predict

    def leave(self) -> None:
        if self.active:
            self.active = False
            self.calls._left()


async def _call(group: list[_Waiting]) -> None:
    tier, images = group[0].tier, [one.image for one in group]
    try:
        many = getattr(tier, "predict_many", None)
        if many is not None:
            results = list(await many(images))
        else:  # a tier without a batch call: its own calls, at once
            results = list(await asyncio.gather(*(tier.predict(image) for image in images)))
        if len(results) != len(images):
            raise RuntimeError(f"the cheap tier answered {len(results)} results for {len(images)} images")
    except BaseException as exc:  # every image's stage records the failure as its own
        for one in group:
            if not one.future.done():
                one.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
        if not isinstance(exc, Exception):
            raise
        return
    for one, result in zip(group, results, strict=True):
        if not one.future.done():
            one.future.set_result(result)
