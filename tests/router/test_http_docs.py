"""/docs works offline: the page and its assets come from this server, and /docs can send an image."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from router.auth.keys import SecurityConfig, hash_key
from router.http.api import app
from router.http.deps import attach
from tests.router.colour_model import solid_png
from tests.router.test_service_core import build, make_config

KEY = "vr_docs_test_client_key"


@pytest.fixture
def client(tmp_path):
    security = SecurityConfig(api_keys=[{"sha256": hash_key(KEY), "tenant": "acme", "role": "client"}])
    attach(build(make_config(tmp_path)), security)
    app.openapi_schema = None
    with TestClient(app) as client:
        yield client  # no key: /docs must load for anyone who can reach it


def test_the_docs_page_loads_every_asset_from_this_server_without_a_key(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text) + re.findall(
        r"""url: ["']([^"']+)["']""", page.text
    )
    assert urls and not [u for u in urls if u.startswith(("http:", "https:", "//"))], urls
    assets = [u for u in urls if "asset=" in u]
    assert {u.split("asset=")[1] for u in assets} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    for url in assets:
        response = client.get(url)
        assert response.status_code == 200 and len(response.content) > 500, url
    bundle = client.get("/docs?asset=swagger-ui-bundle.js")
    assert (
        bundle.headers["content-type"].startswith("text/javascript") and b"SwaggerUIBundle" in bundle.content
    )
    assert client.get("/docs/oauth2-redirect").status_code == 200


@pytest.mark.parametrize("name", ["../../../etc/passwd", "index.html", "swagger-ui.js.map", ""])
def test_only_the_named_swagger_files_are_served(client, name):
    response = client.get("/docs", params={"asset": name})
    assert response.status_code == 404 and response.json()["field"] == "asset"


def test_openapi_documents_the_bodies_docs_sends(client):
    document = client.get("/openapi.json").json()
    analyze = document["paths"]["/v1/analyze"]["post"]["requestBody"]["content"]
    form = analyze["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and form["properties"]["image"]["format"] == "binary"
    assert set(analyze["application/json"]["schema"]["properties"]) >= {"image_base64", "image_url", "task"}
    search = document["paths"]["/v1/search"]["post"]["requestBody"]["content"]["application/json"]
    assert "text" in search["schema"]["properties"] and search["example"]["text"]
    items = document["paths"]["/v1/search/items"]["post"]["requestBody"]["content"]
    assert items["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert document["components"]["securitySchemes"]["ApiKey"]["name"] == "x-api-key"


def test_what_docs_sends_is_what_the_route_accepts(client):
    """The multipart body the schema describes (an image file field) is analysed."""
    response = client.post(
        "/v1/analyze",
        files={"image": ("red.png", solid_png((255, 0, 0)), "image/png")},
        data={"task": "colour"},
        headers={"x-api-key": KEY},
    )
    assert response.status_code == 200, response.text
    assert response.json()["answer"][0]["label"] == "red"
