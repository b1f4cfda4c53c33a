"""``/docs`` that works offline, and request bodies /docs can send.

FastAPI's own /docs page loads Swagger UI from a CDN, so it is blank where no CDN is
reachable. Here the page and its assets come from the ``swagger-ui-bundle-v2`` package
(Swagger UI 5, Apache-2.0, renders OpenAPI 3.1): ``/docs`` is the page and
``/docs?asset=<file>`` its scripts and styles. Both are the one public path ``/docs``
(router/http/auth.py PUBLIC_PATHS), so the page loads whether or not API keys are configured;
only the files of that one Swagger UI release are served, by exact name.

The routes that read their body themselves (``/v1/analyze``: multipart or JSON;
``/v1/search``; ``/v1/search/items``) get their request-body schemas added to the OpenAPI
document, so /docs offers a file picker for ``image`` and a JSON example; an ``x-api-key``
security scheme lets /docs send a key ("Authorize"). No FastAPI route logic lives here.
"""

from __future__ import annotations

import mimetypes
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response

from visionroute.errors import NotFound

DOCS_PATH = "/docs"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "favicon-16x16.png")


@cache
def swagger_ui_dir() -> Path:
    import swagger_ui_bundle  # swagger-ui-bundle-v2: the module keeps the v1 name

    return Path(swagger_ui_bundle.swagger_ui_path)


def asset_response(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound(f"no docs asset {name!r}; expected one of {list(ASSETS)}", field="asset")
    path = swagger_ui_dir() / name
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if name.endswith(".js"):
        media_type = "text/javascript; charset=utf-8"
    return Response(
        path.read_bytes(), media_type=media_type, headers={"Cache-Control": "public, max-age=86400"}
    )


async def docs_page(request: Request) -> Response:
    asset = request.query_params.get("asset")
    if asset is not None:
        return asset_response(asset)
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title="VisionRoute - API docs",
        swagger_js_url=f"{root}{DOCS_PATH}?asset=swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_PATH}?asset=swagger-ui.css",
        swagger_favicon_url=f"{root}{DOCS_PATH}?asset=favicon-32x32.png",
        oauth2_redirect_url=f"{root}{DOCS_PATH}/oauth2-redirect",
    )


async def oauth2_redirect(request: Request) -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


def _json_body(model: Any, components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    return {"schema": schema}


def request_bodies(components: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(path, method) -> the OpenAPI requestBody of each route that reads its own body."""
    from router.schemas import AnalyzeJson, IndexRequest, SearchRequest

    image_file = {"type": "string", "format": "binary", "description": "the image file (JPEG, PNG, ...)"}
    return {
        ("/v1/analyze", "post"): {
            "required": True,
            "description": "multipart/form-data with an `image` file, or JSON with `image_base64` "
            "(or `image_url` when limits.url_fetch.enabled)",
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": image_file,
                            "task": {"type": "string", "description": "a configured cascade, e.g. classify"},
                            "tenant": {"type": "string", "description": "default: the API key's tenant"},
                        },
                    },
                    "encoding": {"image": {"contentType": "image/*"}},
                },
                "application/json": _json_body(AnalyzeJson, components),
            },
        },
        ("/v1/search", "post"): {
            "required": True,
            "description": "exactly one of `text`, `image_base64` or `id`",
            "content": {
                "application/json": {
                    **_json_body(SearchRequest, components),
                    "example": {"text": "a cup of coffee", "k": 3},
                }
            },
        },
        ("/v1/search/items", "post"): {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": image_file,
                            "metadata": {
                                "type": "string",
                                "description": "a JSON object: tenant, tags, source, extra",
                            },
                        },
                    }
                },
                "application/json": _json_body(IndexRequest, components),
            },
        },
    }


def openapi_with_bodies(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the hand-read request bodies and the API-key scheme (cached)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=app.description,
        routes=app.routes,
    )
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for (path, method), body in request_bodies(schemas).items():
        operation = document.get("paths", {}).get(path, {}).get(method)
        if operation is not None and "requestBody" not in operation:  # a route's own wins
            operation["requestBody"] = body
    components.setdefault("securitySchemes", {})["ApiKey"] = {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
        "description": "needed when the service has API keys (security.api_keys)",
    }
    document["security"] = [{"ApiKey": []}, {}]  # a key when configured; none when auth is off
    app.openapi_schema = document
    return document


def install_docs(app: FastAPI) -> None:
    """Serve /docs offline and complete the OpenAPI document (``FastAPI(docs_url=None, ...)``)."""
    # plain Starlette routes, like FastAPI's own docs routes: pages, not API operations
    app.add_route(DOCS_PATH, docs_page, methods=["GET"], include_in_schema=False)
    app.add_route(f"{DOCS_PATH}/oauth2-redirect", oauth2_redirect, methods=["GET"], include_in_schema=False)
    app.openapi = lambda: openapi_with_bodies(app)
