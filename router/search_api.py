"""HTTP routes for visual search: index, delete, and search by text, image or id.

The routes reach the ``SearchTier`` deployment through ``app.state.search``, which the
Ingress sets when retrieval is enabled; without it they answer 503 with the reason.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.datastructures import UploadFile

from router.security import tenant_scope
from visionroute.errors import BackendUnavailable, InputError, NotFound, RouterError

router = APIRouter(prefix="/v1/search", tags=["search"])


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="open-vocabulary text query")
    image_base64: str | None = Field(None, description="query by example image (base64 file bytes)")
    id: int | None = Field(None, description="query by an indexed item's id (it is left out of the hits)")
    k: int = Field(10, description="number of hits")
    filters: dict[str, Any] | None = Field(
        None,
        description="tenant, source, tags_any, tags_all, created_after, created_before, in_review, review_item_ids, ids",
    )
    params: dict[str, Any] | None = Field(
        None, description="this request only: ef_search, nprobe, refine_k_factor, exact"
    )

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        given = [name for name in ("text", "image_base64", "id") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image_base64 or id; got {given or 'none'}")
        return self


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_base64: str
    metadata: dict[str, Any] | None = None


def _b64(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("not valid base64", field=field) from None


async def call_search(search: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call a SearchService method on the SearchTier; our own errors come back unwrapped."""
    if search is None:
        raise BackendUnavailable(
            "visual search is not enabled in this deployment (retrieval.enabled)", field="retrieval"
        )
    try:
        return await search.call.remote(method, *args, **kwargs)
    except RouterError:
        raise
    except Exception as exc:
        cause = getattr(exc, "cause", None)  # Ray wraps a replica's exception; surface ours
        if isinstance(cause, RouterError):
            raise cause from None
        raise BackendUnavailable(
            f"visual search failed: {type(exc).__name__}: {exc}", field="retrieval"
        ) from None


def scoped_filters(filters: dict[str, Any] | None, tenant: str | None = None) -> dict[str, Any] | None:
    """A tenant's key only ever searches its own tenant's entries, whatever the filter asks."""
    scope = tenant_scope()
    if scope is not None:
        return {**(filters or {}), "tenant": scope}
    if tenant is not None:
        return {**(filters or {}), "tenant": tenant}
    return filters


async def visible_item(search: Any, item_id: int) -> dict[str, Any]:
    """The item, or NotFound when it does not exist or belongs to another tenant."""
    item = await call_search(search, "get", item_id)
    scope = tenant_scope()
    if scope is not None and item["metadata"].get("tenant") != scope:
        raise NotFound(f"no indexed item {item_id}", field="id")
    return item


async def search_by(
    search: Any,
    *,
    text: str | None = None,
    image: bytes | None = None,
    item_id: int | None = None,
    k: int = 10,
    filters: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """One search, the same for HTTP and gRPC: exactly one of text, image or item_id."""
    given = [name for name, value in (("text", text), ("image", image), ("id", item_id)) if value is not None]
    if len(given) != 1:
        raise InputError(f"give exactly one of text, image or id; got {given or 'none'}", field="query")
    options = {"k": k, "filters": scoped_filters(filters, tenant), "params": params}
    if text is not None:
        return await call_search(search, "search_text", text, **options)
    if image is not None:
        return await call_search(search, "search_image", image, **options)
    await visible_item(search, item_id)
    return await call_search(search, "search_by_id", item_id, **options)


async def _call(request: Request, method: str, *args: Any, **kwargs: Any) -> Any:
    return await call_search(getattr(request.app.state, "search", None), method, *args, **kwargs)


def _parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InputError(first["msg"], field=".".join(map(str, first["loc"])) or "body") from None


@router.post("", summary="Search by text, example image or item id")
async def search(request: Request) -> dict[str, Any]:
    try:
        body = _parse(SearchRequest, await request.json())
    except json.JSONDecodeError:
        raise InputError("body must be JSON", field="body") from None
    image = _b64(body.image_base64, "image_base64") if body.image_base64 is not None else None
    return await search_by(
        getattr(request.app.state, "search", None),
        text=body.text,
        image=image,
        item_id=body.id,
        k=body.k,
        filters=body.filters,
        params=body.params,
    )


@router.post("/items", summary="Index an image with metadata")
async def index_item(request: Request) -> dict[str, Any]:
    """multipart (``image`` file, optional ``metadata`` JSON string) or JSON (``image_base64``, ``metadata``)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = _parse(IndexRequest, await request.json())
        image, metadata = _b64(body.image_base64, "image_base64"), body.metadata
    elif content_type == "multipart/form-data":
        form = await request.form()
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise InputError("multipart body has no 'image' file field", field="image")
        image = await upload.read()
        try:
            metadata = json.loads(form["metadata"]) if form.get("metadata") else None
        except json.JSONDecodeError:
            raise InputError("metadata must be a JSON object", field="metadata") from None
    else:
        raise InputError(
            f"content type {content_type or 'none'!r}: send multipart/form-data or application/json",
            field="content-type",
        )
    scope = tenant_scope()
    if scope is not None:  # entries belong to the caller's tenant
        metadata = {**(metadata or {}), "tenant": scope}
    item_id = await _call(request, "index_image", image, metadata)
    return {"id": item_id}


@router.get("/items/{item_id}", summary="One indexed item's metadata")
async def get_item(request: Request, item_id: int) -> dict[str, Any]:
    return await visible_item(getattr(request.app.state, "search", None), item_id)


@router.delete("/items/{item_id}", summary="Delete an indexed item")
async def delete_item(request: Request, item_id: int) -> dict[str, Any]:
    await visible_item(getattr(request.app.state, "search", None), item_id)
    await _call(request, "delete", item_id)
    return {"id": item_id, "deleted": True}


@router.get("/stats", summary="Index size, kind and embedder")
async def stats(request: Request) -> dict[str, Any]:
    return await _call(request, "stats")
