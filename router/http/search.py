"""HTTP routes for visual search; the operations live in router/services/search.py, which
returns typed results (router/services/results.py) that these routes send as JSON."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from router.auth.principal import current_principal
from router.http.deps import service_of
from router.http.inputs import decoded_base64, multipart_image, parsed, read_body_limited
from router.schemas import IndexRequest, SearchRequest
from router.services.common import parsed_json
from visionroute.errors import InputError
from visionroute.redaction import shown

router = APIRouter(prefix="/v1/search", tags=["search"])


def _service(request: Request):
    return service_of(request)


def _operations(request: Request):
    return _service(request).search


async def _body(request: Request) -> bytes:
    return await read_body_limited(request, _service(request).config.limits.max_body_bytes)


@router.post("", summary="Search by text, example image or item id")
async def search(request: Request) -> dict[str, Any]:
    body = parsed(SearchRequest, await _body(request))
    image = decoded_base64(body.image_base64, "image_base64") if body.image_base64 is not None else None
    result = await _operations(request).search(
        current_principal(),
        text=body.text,
        image=image,
        item_id=body.id,
        k=body.k,
        filters=body.filters,
        params=body.params,
        tenant=body.tenant,
    )
    return result.model_dump()


@router.post("/items", summary="Index an image with metadata")
async def index_item(request: Request) -> dict[str, Any]:
    """multipart (``image`` file, optional ``metadata`` JSON string) or JSON (``image_base64``, ``metadata``)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/json", "multipart/form-data"):
        raise InputError(
            f"content type {shown(content_type or 'none')}: send multipart/form-data or application/json",
            field="content-type",
        )
    raw = await _body(request)
    if content_type == "application/json":
        body = parsed(IndexRequest, raw)
        image, metadata = decoded_base64(body.image_base64, "image_base64"), body.metadata
    else:
        form, image = await multipart_image(request)
        field = form.get("metadata")
        if isinstance(field, UploadFile):
            field = await field.read()  # a metadata file part: its bytes are the JSON
        metadata = parsed_json(field, "metadata") if field else None
        if metadata is not None and not isinstance(metadata, dict):
            raise InputError(
                f"metadata must be a JSON object, got {type(metadata).__name__}", field="metadata"
            )
    return (await _operations(request).index(current_principal(), image, metadata)).to_json()


@router.get("/items/{item_id}", summary="One indexed item's metadata")
async def get_item(request: Request, item_id: int) -> dict[str, Any]:
    return (await _operations(request).get(current_principal(), item_id)).to_json()


@router.delete("/items/{item_id}", summary="Delete an indexed item")
async def delete_item(request: Request, item_id: int) -> dict[str, Any]:
    return (await _operations(request).delete(current_principal(), item_id)).to_json()


@router.get("/stats", summary="Index size, kind and embedder")
async def stats(request: Request) -> dict[str, Any]:
    return (await _operations(request).stats(current_principal())).to_json()
