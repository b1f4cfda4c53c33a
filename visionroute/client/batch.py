"""A list of images of any length through the batch API (``POST /v1/analyze/batch``, gRPC
``AnalyzeBatch``), in chunks the service takes; ``Operations.analyze_batch`` is its interface.

``BatchRun`` checks the whole list before anything is sent (each image is bytes or an existing
file, named ``images[i]`` when not), plans the chunks (at most ``batch_size`` images and
``max_batch_bytes`` each; an image larger than that goes alone and the service decides), builds
each chunk's ``Call`` when it is sent (a file is read then, not all at once), and gathers the
results, numbered in the caller's list (an image's error field too: ``images[40]``, not the
chunk's ``images[8]``), reporting progress after each chunk. The clients only
loop: send each chunk, ``add`` its answer.

Request ids: the service gives image ``i`` of a batch sent as ``R`` the id ``R:i`` and keys its
budget charge and review item on it. A list that fits one chunk is sent as the call's request
id ``R``; otherwise the chunk starting at image ``s`` is sent as ``R.s`` (its images: ``R.s:0``,
``R.s:1``...). So the same list sent again with the same ``request_id`` and ``batch_size`` is the
same per-image requests: nothing charged or queued twice, whatever was lost in between.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionroute.client import grpc_replies as replies
from visionroute.client import results
from visionroute.client.calls import (
    Call,
    GrpcRequest,
    HttpRequest,
    checked_path,
    given,
    image_bytes,
    image_part,
    request_id_for,
)
from visionroute.client.results import AnalyzeBatchResult, BatchItemResult
from visionroute.errors import InputError

DEFAULT_BATCH_SIZE = 32  # the service's limits.batch_max_images as shipped (router/config.py)
MAX_BATCH_SIZE = 1024  # the most limits.batch_max_images may be
DEFAULT_BATCH_BYTES = 48 << 20  # under limits.batch_max_body_bytes (64 MiB shipped), with room for the parts
MAX_REQUEST_ID_CHARS = 128  # a per-image id <chunk id>:<index> included (router/services/batch.py)
PATH = "/v1/analyze/batch"


@dataclass(frozen=True)
class BatchProgress:
    """After each chunk: images answered so far, of ``total``; how many of them failed; and the
    chunk's own results (to store as they come)."""

    done: int
    total: int
    failed: int
    items: tuple[BatchItemResult, ...]


@dataclass(frozen=True)
class Chunk:
    start: int  # the index of its first image in the caller's list
    request_id: str
    call: Call


def chunk_bounds(sizes: Sequence[int], batch_size: int, max_bytes: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk: consecutive images, at most ``batch_size`` of them and at
    most ``max_bytes`` together (an image larger than that alone)."""
    bounds, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and (index - start == batch_size or total + size > max_bytes):
            bounds.append((start, index))
            start, total = index, 0
        total += size
    if sizes:
        bounds.append((start, len(sizes)))
    return bounds


class BatchRun:
    def __init__(
        self,
        images: Sequence[bytes | str | Path] | None,
        image_urls: Sequence[str] | None,
        *,
        task: str | None,
        tenant: str | None,
        request_id: str | None,
        batch_size: int,
        max_batch_bytes: int,
        on_progress: Callable[[BatchProgress], None] | None,
    ) -> None:
        if (images is None) == (image_urls is None):
            raise InputError("give exactly one of images (bytes or paths) and image_urls", field="images")
        _check_count("batch_size", batch_size, MAX_BATCH_SIZE)
        _check_count("max_batch_bytes", max_batch_bytes, None)
        if on_progress is not None and not callable(on_progress):
            raise InputError(
                f"on_progress must be callable, got {type(on_progress).__name__}", field="on_progress"
            )
        self.images = list(images) if images is not None else None
        self.urls = (
            [_checked_url(url, i) for i, url in enumerate(image_urls)] if image_urls is not None else None
        )
        sizes = (
            [len(url) for url in self.urls]
            if self.urls is not None
            else [_size(i, v) for i, v in enumerate(self.images)]
        )
        self.task, self.tenant, self.on_progress = task, tenant, on_progress
        self.total = len(sizes)
        self.bounds = chunk_bounds(sizes, batch_size, max_batch_bytes)
        self.request_id = request_id_for(request_id)
        for start, stop in self.bounds:
            _check_room(self.chunk_request_id(start), stop - start)
        self.items: list[BatchItemResult] = []

    def chunk_request_id(self, start: int) -> str:
        return self.request_id if len(self.bounds) == 1 else f"{self.request_id}.{start}"

    def chunks(self) -> Iterator[Chunk]:
        for start, stop in self.bounds:
            yield Chunk(start, self.chunk_request_id(start), self._call(start, stop))

    def add(self, items: Sequence[BatchItemResult]) -> None:
        """A chunk's answer (its results already numbered in the caller's list); progress reported."""
        self.items.extend(items)
        if self.on_progress is not None:
            failed = sum(not item.ok for item in self.items)
            self.on_progress(BatchProgress(len(self.items), self.total, failed, tuple(items)))

    def result(self) -> AnalyzeBatchResult:
        return AnalyzeBatchResult(self.request_id, tuple(self.items))

    def _call(self, start: int, stop: int) -> Call:
        """One chunk: URLs as JSON, bytes as multipart (no base64); over gRPC the same images."""
        fields = given(task=self.task, tenant=self.tenant)
        if self.urls is not None:
            urls = self.urls[start:stop]
            http = HttpRequest("POST", PATH, json={"images": [{"image_url": url} for url in urls], **fields})
            images: list[dict[str, Any]] = [{"image_url": url} for url in urls]
        else:
            data = [
                image_bytes(image, f"images[{i}]") for i, image in enumerate(self.images[start:stop], start)
            ]
            http = HttpRequest("POST", PATH, files=[image_part(d) for d in data], data=fields)
            images = [{"image": d} for d in data]

        def message(pb: Any) -> Any:
            return pb.AnalyzeBatchRequest(
                images=[pb.BatchImage(**image) for image in images],
                task=self.task or "",
                tenant=self.tenant or "",
            )

        return Call(
            "analyze batch",
            http,
            GrpcRequest("AnalyzeBatch", message, replies.analyze_batch),
            lambda body: results.batch_items(body, first_index=start),
        )


def _size(index: int, image: Any) -> int:
    if isinstance(image, bytes | bytearray | memoryview):
        return len(image)
    return checked_path(image, f"images[{index}]").stat().st_size


def _checked_url(url: Any, index: int) -> str:
    if not isinstance(url, str) or not url:
        raise InputError(
            f"image_urls[{index}] must be a non-empty string, got {url!r}", field=f"image_urls[{index}]"
        )
    return url


def _check_count(field: str, value: Any, most: int | None) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 1
        or (most is not None and value > most)
    ):
        within = f"1..{most}" if most is not None else ">= 1"
        raise InputError(f"{field} must be a whole number {within}, got {value!r}", field=field)


def _check_room(chunk_id: str, count: int) -> None:
    """The service refuses a batch whose per-image ids ``<id>:<index>`` would pass 128 characters."""
    longest = f"{chunk_id}:{count - 1}"
    if len(longest) > MAX_REQUEST_ID_CHARS:
        raise InputError(
            f"request_id is too long for this batch: its images' ids ({longest!r}) pass "
            f"{MAX_REQUEST_ID_CHARS} characters; give a shorter one",
            field="request_id",
        )
