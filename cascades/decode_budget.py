"""A per-replica budget of decoded pixels, and decoding at the size the model needs.

Decoded pixels, not request bytes, are what costs memory: a 131 KB PNG of 6320x6320 decodes
to 40 million pixels (120 MB as RGB, about twice that while PIL decodes it), and eight of them
at once took an ingress replica to 2.4 GB. So each replica admits decodes against a budget of
pixels in flight (``limits.decode.pixels_in_flight``): an image holds its full pixel count
while it decodes and its working size until its answer is made. A request that finds no room
waits, first come first served, up to ``limits.decode.wait_s``, then gets 503 with
Retry-After (BackendUnavailable, field ``image``), so memory stays bounded and nothing waits
forever. An image larger than the whole budget waits for the budget to empty, then runs alone.

Images above ``limits.decode.reduce_above_pixels`` are decoded no larger than the cheap tier
needs: a JPEG at 1/2, 1/4 or 1/8 scale by the JPEG decoder itself (DCT scaling), other formats
decoded whole and then reduced by an integer factor. The answer's boxes are mapped back to the
file's own pixels, and the trace's input step records both sizes. Tasks with a VLM keep the
full image (a VLM may need the detail). A JPEG of any size is decoded at the tier's size
too when that is half its size or less (``limits.decode.jpeg_at_model_size``, on by default):
the JPEG decoder's DCT scaling costs less CPU than a full decode, and the tier resizes the image
to its input anyway (the answers it changes: python -m evals.benchmarks.decode_agreement). Not
for a tenant whose privacy rule redacts (its review items' redaction needs the file's own pixels
and would decode the file a second time), nor for a task with a shift guard or a learned router
(their references were measured on whole decodes): router/services/analyze/stages.py decides.

No FastAPI or Ray here: the service core (router/services/analyze.py) calls it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cascades.images import DecodedImage, decode_image, probe_image
from visionroute.errors import BackendUnavailable
from visionroute.records import Detections


class DecodeBudgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pixels_in_flight: int = Field(
        48_000_000,
        gt=0,
        description="decoded pixels one replica holds at once (plan about 9 bytes of memory each at the peak of a "
        "decode); docs/operations.md gives the memory figure",
    )
    wait_s: float = Field(
        10.0, ge=0, le=300, description="how long a request waits for room before 503 + Retry-After"
    )
    retry_after_s: int = Field(1, ge=1, le=3600, description="the Retry-After a refused request gets")
    reduce_above_pixels: int = Field(
        4_194_304,
        ge=0,
        description="images larger than this are decoded no larger than the cheap tier needs; 0: never",
    )
    jpeg_at_model_size: bool = Field(
        True,
        description="a JPEG of any size at least twice the cheap tier's input in both sides is decoded at 1/2, "
        "1/4 or 1/8 scale by the JPEG decoder (DCT scaling: less CPU, other pixels; every accept of "
        "python -m evals.benchmarks.decode_agreement unchanged, docs/operations.md), unless the tenant's privacy "
        "rule redacts (a review item's redaction would decode it again) or the task has a shift guard or a learned "
        "router (references measured on whole decodes); false: only above reduce_above_pixels",
    )


@dataclass(frozen=True)
class InputNeed:
    """The smallest image a cheap tier loses nothing on: a fixed input, or a longest side."""

    side: int | None = None  # the model's fixed input is at most side x side
    max_side: int | None = None  # the model scales the longest side down to this

    def min_size(self, width: int, height: int) -> tuple[int, int] | None:
        """(width, height) the decoded image must keep at least; None: the full image."""
        if self.side:
            return (self.side, self.side)
        if self.max_side:
            longest = max(width, height)
            scale = self.max_side / longest
            return (math.ceil(width * scale), math.ceil(height * scale))
        return None


def input_need(tier: Any, models_dir: Path | None, *, has_vlm: bool) -> InputNeed:
    """What a cascade's cheap tier needs, from its config (``size_hw``) or its model's sidecar
    (``preprocess.size_hw`` / ``max_side``). Nothing known, or a VLM behind it: the full image."""
    if has_vlm:
        return InputNeed()
    if getattr(tier, "size_hw", None):
        return InputNeed(side=max(tier.size_hw))
    model = str(tier.model)
    if model.startswith("hf://"):
        return InputNeed()
    path = Path(model).expanduser()
    if not (path.suffix == ".onnx" or path.is_absolute() or "/" in model):
        path = Path(models_dir or ".") / f"{model}.onnx"
    try:
        preprocess = json.loads(path.with_suffix(".json").read_text()).get("preprocess") or {}
    except (OSError, ValueError):
        return InputNeed()
    if preprocess.get("size_hw"):
        return InputNeed(side=max(int(v) for v in preprocess["size_hw"]))
    if preprocess.get("max_side"):
        return InputNeed(max_side=int(preprocess["max_side"]))
    return InputNeed()


class DecodeBudget:
    """Pixels in flight on one replica; FIFO waiting with a bound. One per event loop user."""

    def __init__(self, config: DecodeBudgetConfig | None = None) -> None:
        self.config = config or DecodeBudgetConfig()
        self.capacity = self.config.pixels_in_flight
        self.in_flight = 0
        self._queue: deque[object] = deque()
        self._condition: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _cond(self) -> asyncio.Condition:
        """The condition of the running loop (a replica has one; tests may run several in turn)."""
        loop = asyncio.get_running_loop()
        if self._condition is None or self._loop is not loop:
            self._condition, self._loop = asyncio.Condition(), loop
        return self._condition

    async def acquire(self, pixels: int, *, what: str = "image", field: str = "image") -> int:
        """Take ``pixels`` (at most the whole budget) or raise BackendUnavailable after wait_s."""
        pixels = min(pixels, self.capacity)
        if not self._queue and self.in_flight + pixels <= self.capacity:
            self.in_flight += pixels  # room and nobody waiting: no wait (one event loop, no await)
            return pixels
        condition = self._cond()
        ticket = object()
        async with condition:
            self._queue.append(ticket)
            try:
                await asyncio.wait_for(
                    condition.wait_for(
                        lambda: self._queue[0] is ticket and self.in_flight + pixels <= self.capacity
                    ),
                    timeout=self.config.wait_s,
                )
            except TimeoutError:
                error = BackendUnavailable(
                    f"too many large images are being decoded on this replica: {what} needs "
                    f"{pixels} pixels, {self.in_flight} of the {self.capacity} pixel budget are in "
                    f"use and {len(self._queue) - 1} requests are waiting; it waited "
                    f"{self.config.wait_s:g} s (limits.decode). Retry later",
                    field=field,
                )
                error.retry_after_s = self.config.retry_after_s  # read by router/errors.py
                raise error from None
            finally:
                self._queue.remove(ticket)
                condition.notify_all()
            self.in_flight += pixels
        return pixels

    async def release(self, pixels: int) -> None:
        if pixels <= 0:
            return
        if not self._queue:  # nobody waiting to wake
            self.in_flight = max(0, self.in_flight - pixels)
            return
        condition = self._cond()
        async with condition:
            self.in_flight = max(0, self.in_flight - pixels)
            condition.notify_all()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[BudgetSession]:
        """One request's share of the budget; whatever it still holds is given back on exit."""
        session = BudgetSession(self)
        try:
            yield session
        finally:
            await self.release(session.held)
            session.held = 0


class BudgetSession:
    def __init__(self, budget: DecodeBudget) -> None:
        self.budget = budget
        self.held = 0

    async def decode(
        self,
        data: bytes,
        *,
        need: InputNeed | None = None,
        field: str = "image",
        max_bytes: int = 20 << 20,
        max_pixels: int = 40_000_000,
        allowed_formats: tuple[str, ...] | None = None,
        jpeg_at_model_size: bool = True,
    ) -> DecodedImage:
        """Check the header (4xx before any wait), wait for room, decode in a worker thread at
        the size ``need`` allows, then keep only the working image's pixels reserved.
        ``jpeg_at_model_size`` False: this request keeps a JPEG below ``reduce_above_pixels``
        whole, whatever the config says (the caller will need its pixels)."""
        limits: dict[str, Any] = {"field": field, "max_bytes": max_bytes, "max_pixels": max_pixels}
        if allowed_formats is not None:
            limits["allowed_formats"] = allowed_formats
        header = probe_image(data, **limits)
        config = self.budget.config
        min_size = None
        if need is not None and (
            (config.reduce_above_pixels and header.pixels > config.reduce_above_pixels)
            or (config.jpeg_at_model_size and jpeg_at_model_size and header.format == "JPEG")
        ):  # decode_image reduces only by a factor of 2 or more, so a small image stays whole
            min_size = need.min_size(header.width, header.height)
        self.held += await self.budget.acquire(
            header.pixels, what=f"this {header.width}x{header.height} {header.format}", field=field
        )
        decoded = await asyncio.to_thread(
            decode_image, data, min_size=min_size, opened=header.opened, **limits
        )
        working = min(int(decoded.rgb.shape[0]) * int(decoded.rgb.shape[1]), self.budget.capacity)
        await self.budget.release(self.held - working)
        self.held = working
        return decoded


def in_file_pixels(detections: Detections | None, decoded: DecodedImage) -> Detections | None:
    """``detections`` found on a reduced image, with boxes in the file's own pixels."""
    if detections is None or not decoded.is_reduced or not len(detections):
        return detections
    height, width = decoded.rgb.shape[:2]
    scale = np.array(
        [decoded.width / width, decoded.height / height, decoded.width / width, decoded.height / height],
        dtype=np.float32,
    )
    xyxy = np.minimum(
        detections.xyxy * scale,
        np.array([decoded.width, decoded.height, decoded.width, decoded.height], dtype=np.float32),
    )
    return dataclasses.replace(detections, xyxy=xyxy)
