"""Analyse many images in one request: each through the same analyse pipeline, concurrently
(in waves of ``limits.batch_concurrency``), answered in order (docs/api.md, batch).

The images' cheap-tier calls are gathered into one call (one handle hop, one ONNX Runtime run
of the stacked images: router/services/analyze/tier_calls.py). Each image is its own analyse
request otherwise: its own decision, budget charge, review item and trace,
under its own request id ``<batch id>:<index>``, so a retried batch with the same id is the same
per-image requests again (a review item is never made twice). One image's failure (bytes that
are not an image, a budget refusal, a queue that cannot store) is that image's error with the
field and reason, never the batch's; only what is wrong with the batch itself (no images, more
than ``limits.batch_max_images``, an unknown task, a malformed tenant or one the key may not act
for) fails the request. The faces read the images and translate the ``BatchResult``; no FastAPI
or Ray here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from router.auth.principal import Principal, resolve_tenant
from router.config import LimitsConfig
from router.services.analyze import AnalyzeService, ImageRequest
from router.services.analyze.tier_calls import TierCalls
from router.services.common import checked_tenant
from visionroute.errors import InputError, RouterError
from visionroute.records import Analysis

log = logging.getLogger("visionroute.service.batch")

MAX_REQUEST_ID_CHARS = 128  # router/services/common.py REQUEST_ID_PATTERN


@dataclass(frozen=True)
class BatchImage:
    """One image as a face read it: its bytes, or why it could not be read (its error)."""

    image_bytes: bytes | None = None
    error: RouterError | None = None


@dataclass(frozen=True)
class BatchItem:
    """One image's outcome: its analysis, or its error (a ``RouterError`` naming the image's
    field, or an unexpected exception the face answers generically)."""

    index: int
    request_id: str
    analysis: Analysis | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class BatchResult:
    request_id: str
    items: tuple[BatchItem, ...]

    @property
    def succeeded(self) -> int:
        return sum(item.error is None for item in self.items)

    @property
    def failed(self) -> int:
        return len(self.items) - self.succeeded


def image_field(index: int, field: str | None) -> str:
    """An image's own field inside the batch: ``image`` -> ``images[3]``, ``image_url`` ->
    ``images[3].image_url``; other fields (``budget``, ``review_queue``...) stay as they are."""
    if field in (None, "image", "body"):
        return f"images[{index}]"
    if field.startswith("image"):
        return f"images[{index}].{field}"
    return field


class BatchService:
    def __init__(self, analyze: AnalyzeService, limits: LimitsConfig) -> None:
        self.analyze = analyze
        self.limits = limits

    def check_count(self, count: int, field: str = "images") -> None:
        """A batch carries 1..``limits.batch_max_images`` images; else an InputError naming
        ``field`` (before any image is read further)."""
        limit = self.limits.batch_max_images
        if count < 1:
            raise InputError(f"a batch needs at least one image in {field!r}; got none", field=field)
        if count > limit:
            raise InputError(
                f"a batch carries at most {limit} images (limits.batch_max_images); got {count}", field=field
            )

    def _check_request_id(self, request_id: str, count: int, field: str) -> None:
        longest = len(f"{request_id}:{count - 1}")
        if longest > MAX_REQUEST_ID_CHARS:
            room = MAX_REQUEST_ID_CHARS - len(f":{count - 1}")
            raise InputError(
                f"each image's request id is <{field}>:<index>, at most {MAX_REQUEST_ID_CHARS} characters; "
                f"for {count} images the {field} may have {room} characters, got {len(request_id)}",
                field=field,
            )

    async def analyze_batch(
        self,
        images: Sequence[BatchImage],
        request_id: str,
        caller: Principal | None,
        *,
        task: str | None = None,
        tenant: str | None = None,
        request_id_field: str = "X-Request-Id",
    ) -> BatchResult:
        """Every image through ``AnalyzeService.analyze``; the results in the images' order."""
        self.check_count(len(images))
        self._check_request_id(request_id, len(images), request_id_field)
        tasks = self.analyze.tiers
        if task is not None and task not in tasks:
            raise InputError(f"unknown task {task!r}; expected one of {sorted(tasks)}", field="task")
        # another tenant's name fails the batch (403 naming tenant), not each image one by one
        resolve_tenant(caller, checked_tenant(tenant))
        wave = min(self.limits.batch_concurrency, len(images))

        async def one(index: int, image: BatchImage, gathered: TierCalls) -> BatchItem:
            item_id = f"{request_id}:{index}"
            if image.error is not None:
                return BatchItem(index, item_id, error=_for_image(index, image.error))
            lane = gathered.enter()
            try:
                analysis = await self.analyze.analyze(
                    ImageRequest(image.image_bytes or b"", item_id, task=task, tenant=tenant), caller, lane
                )
            except RouterError as error:
                return BatchItem(index, item_id, error=_for_image(index, error))
            except Exception as exc:  # a bug or a dead backend: this image's, logged here
                log.exception("batch %s: image %d failed", request_id, index)
                return BatchItem(index, item_id, error=exc)
            finally:
                lane.leave()
            return BatchItem(index, item_id, analysis=analysis)

        # Waves of ``batch_concurrency`` images: each wave's cheap-tier calls are one call (a
        # sliding window would free one slot at a time and send the next images one by one).
        items: list[BatchItem] = []
        for start in range(0, len(images), wave):
            gathered = TierCalls(max_images=wave)
            chunk = enumerate(images[start : start + wave], start)
            items += await asyncio.gather(*(one(index, image, gathered) for index, image in chunk))
        return BatchResult(request_id, tuple(items))


def _for_image(index: int, error: RouterError) -> RouterError:
    error.field = image_field(index, error.field)
    return error
