"""Reading HTTP request bodies into what the service core takes, with the field named on error."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile

from router.limits import read_limited
from router.schemas import AnalyzeJson
from router.services.common import parsed_json
from router.url_fetch import UrlFetchConfig, fetch_image_url
from visionroute.errors import InputError, UnsupportedMediaType
from visionroute.redaction import failure_summary, shown


def parsed(model: type[BaseModel], body: bytes) -> Any:
    """A JSON body validated into ``model``; the first problem becomes an InputError naming its
    field: not UTF-8 or not JSON (``body``), too deep, a lone surrogate, a wrong value."""
    if not body:
        raise InputError("request body is empty; send a JSON object", field="body")
    return validated(model, parsed_json(body, "body"), "body")


def validated(model: type[BaseModel], value: Any, field: str) -> Any:
    """``value`` validated into ``model``; the first problem an InputError naming its field
    (``field`` when the problem is the whole value's)."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InputError(first["msg"], field=".".join(map(str, first["loc"])) or field) from None


def decoded_base64(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("not valid base64", field=field) from None


async def read_body_limited(request: Request, max_bytes: int) -> bytes:
    """The whole body, refusing early when it is (or declares to be) over the limit."""
    body = await read_limited(
        request.stream(),
        declared=request.headers.get("content-length"),
        max_bytes=max_bytes,
        field="body",
        what="body",
    )
    request._body = body  # lets request.form() parse what was already read
    return body


async def image_body(request: Request, max_bytes: int, send: str) -> tuple[str, bytes]:
    """(content type, body) of an image request: multipart or JSON, within ``max_bytes``, not
    empty. ``send``: what each content type should carry, for the error."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("multipart/form-data", "application/json"):
        raise UnsupportedMediaType(
            f"content type {shown(content_type or 'none')} is not accepted; send {send}", field="content-type"
        )
    body = await read_body_limited(request, max_bytes)
    if not body:
        raise InputError("request body is empty", field="body")
    return content_type, body


async def json_image(
    image_base64: str | None, image_url: str | None, max_bytes: int, url_fetch: UrlFetchConfig
) -> bytes:
    """A JSON body's image (one of the two, checked by its model): fetched, or decoded."""
    if image_url is not None:
        return await fetch_image_url(image_url, url_fetch, max_bytes)
    return decoded_base64(image_base64, "image_base64")


async def multipart_image(request: Request) -> tuple[FormData, bytes]:
    """A multipart body's form and the bytes of its ``image`` file part."""
    try:
        form = await request.form()
    except Exception as exc:  # starlette raises its own multipart errors
        raise InputError(f"malformed multipart body: {failure_summary(exc)}", field="body") from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise InputError("multipart body has no 'image' file field", field="image")
    return form, await upload.read()


async def image_and_fields(
    request: Request, max_bytes: int, url_fetch: UrlFetchConfig | None = None
) -> tuple[bytes, str | None, str | None]:
    """(image bytes, task, tenant) from a multipart upload or a JSON body."""
    content_type, body = await image_body(
        request, max_bytes, "multipart/form-data with an 'image' file or application/json with 'image_base64'"
    )
    if content_type == "application/json":
        payload = parsed(AnalyzeJson, body)
        image = await json_image(
            payload.image_base64, payload.image_url, max_bytes, url_fetch or UrlFetchConfig()
        )
        return image, payload.task, payload.tenant
    form, image = await multipart_image(request)
    tenant = str(form.get("tenant")) if form.get("tenant") else None  # None: the API key's tenant
    task = form.get("task")
    return image, (str(task) if task else None), tenant
