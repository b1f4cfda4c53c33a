"""The HTTP face of the batch API (POST /v1/analyze/batch): reading a batch's images, and its
``BatchResult`` as JSON (router/services/batch.py holds the logic; docs/api.md the contract).

Input as /v1/analyze takes it, several times over: ``multipart/form-data`` with one ``image``
file part per image (and optional ``task``, ``tenant``), or JSON ``{"images": [{"image_base64":
...} | {"image_url": ...}, ...], "task": ..., "tenant": ...}``. What is wrong with one image
(not base64, both or neither of its fields, a URL that cannot be fetched) is that image's error.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field, model_validator
from starlette.datastructures import UploadFile

from router.errors import error_body, http_status, retry_after_s, unexpected_error
from router.http.inputs import image_body, json_image, parsed, validated
from router.schemas import AnalyzeResponse, Edge
from router.services import response_body
from router.services.batch import BatchImage, BatchItem, BatchResult, BatchService
from router.url_fetch import UrlFetchConfig
from visionroute.errors import InputError, RouterError
from visionroute.redaction import failure_summary


class AnalyzeBatchJson(Edge):
    images: list[Any] = Field(
        description="one object per image: {'image_base64': ...} or {'image_url': ...}, as /v1/analyze takes it"
    )
    task: str | None = Field(None, description="a configured cascade; default: the config's default_task")
    tenant: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="default: the API key's tenant",
    )


class BatchItemError(BaseModel):
    error: str
    field: str | None
    reason: str
    request_id: str
    retry_after_s: int | None = None


class BatchItemOut(BaseModel):
    index: int
    request_id: str = Field(description="this image's own request id: <batch request id>:<index>")
    status: int = Field(description="the HTTP status /v1/analyze would have answered for this image")
    response: AnalyzeResponse | None = Field(None, description="set when status is 200")
    error: BatchItemError | None = Field(None, description="set otherwise")


class AnalyzeBatchResponse(BaseModel):
    request_id: str
    succeeded: int
    failed: int
    results: list[BatchItemOut] = Field(description="one per image, in the order sent")


async def batch_images(
    request: Request, batch: BatchService, max_bytes: int, max_image_bytes: int, url_fetch: UrlFetchConfig
) -> tuple[list[BatchImage], str | None, str | None]:
    """(the images, task, tenant) of a batch request; the count is checked before any image is
    decoded or fetched."""
    content_type, body = await image_body(
        request,
        max_bytes,
        "multipart/form-data with one 'image' file per image or application/json with 'images'",
    )
    if content_type == "application/json":
        payload = parsed(AnalyzeBatchJson, body)
        batch.check_count(len(payload.images), "images")
        images = await asyncio.gather(
            *(_json_image(value, max_image_bytes, url_fetch) for value in payload.images)
        )
        return list(images), payload.task, payload.tenant
    limit = batch.limits.batch_max_images
    try:
        form = await request.form(max_files=limit + 1)  # one more: the count's own error names it
    except Exception as exc:  # starlette raises its own multipart errors
        if "too many files" in str(exc).lower():
            batch.check_count(limit + 1, "image")
        raise InputError(f"malformed multipart body: {failure_summary(exc)}", field="body") from None
    parts = form.getlist("image")
    batch.check_count(len(parts), "image")
    images = []
    for part in parts:
        if isinstance(part, UploadFile):
            images.append(BatchImage(await part.read()))
        else:
            images.append(BatchImage(error=InputError("an 'image' part must be a file", field="image")))
    tenant, task = form.get("tenant"), form.get("task")
    return images, (str(task) if task else None), (str(tenant) if tenant else None)


class _ImageJson(Edge):
    """One image of a JSON batch, checked as /v1/analyze checks its body (AnalyzeJson)."""

    image_base64: str | None = Field(None, min_length=1)
    image_url: str | None = Field(None, min_length=1, max_length=2048)

    @model_validator(mode="after")
    def _one_image(self) -> _ImageJson:
        if (self.image_base64 is None) == (self.image_url is None):
            raise ValueError("send exactly one of image_base64 and image_url")
        return self


async def _json_image(value: Any, max_bytes: int, url_fetch: UrlFetchConfig) -> BatchImage:
    try:
        if not isinstance(value, dict):
            raise InputError(
                f"each image must be an object with image_base64 or image_url, got {type(value).__name__}",
                field="image",
            )
        item = validated(_ImageJson, value, "image")
        return BatchImage(await json_image(item.image_base64, item.image_url, max_bytes, url_fetch))
    except RouterError as error:
        return BatchImage(error=error)


def item_status(item: BatchItem) -> tuple[int, dict[str, Any] | None]:
    """An image's HTTP status and, when it failed, its error body (the one both faces use)."""
    if item.error is None:
        return 200, None
    error = unexpected_error(item.error)
    body = error_body(error, item.request_id)
    return http_status(error), {**body, "retry_after_s": retry_after_s(error)}


def batch_json(result: BatchResult) -> dict[str, Any]:
    results = []
    for item in result.items:
        status, error = item_status(item)
        results.append(
            {
                "index": item.index,
                "request_id": item.request_id,
                "status": status,
                "response": response_body(item.analysis) if item.analysis is not None else None,
                "error": error,
            }
        )
    return {
        "request_id": result.request_id,
        "succeeded": result.succeeded,
        "failed": result.failed,
        "results": results,
    }
