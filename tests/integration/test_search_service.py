"""Visual search through the running service on the offline default embedder."""

from __future__ import annotations

import base64
import json
import re

import httpx
import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def service(default_service):
    """The session's shared service: the shipped config has search on and indexes every analysed
    image (retrieval.enabled, index_analysed). Other tests' entries are in its index, so this
    module works in a tenant of its own (no API keys: the caller names it) and counts what it
    added."""
    return default_service


def index_items_metric(service) -> float:
    """``visionroute_search_index_items`` from /metrics (the whole index, every tenant)."""
    text = httpx.get(service.url + "/metrics").text
    return float(re.search(r"^visionroute_search_index_items (\S+)$", text, re.MULTILINE).group(1))


def test_text_and_image_search_over_indexed_and_analysed_photos(service, fresh_tenant, photos_png):
    tenant = fresh_tenant
    before = index_items_metric(service)
    assert httpx.get(service.url + "/readyz").json()["checks"]["search_index"]["items"] == before
    ids = {}
    for name in ("coffee", "chelsea", "camera"):
        response = httpx.post(
            service.url + "/v1/search/items",
            files={"image": (f"{name}.png", photos_png[name], "image/png")},
            data={"metadata": json.dumps({"tags": [name], "source": "upload", "tenant": tenant})},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        ids[name] = response.json()["id"]
    hits = httpx.post(
        service.url + "/v1/search",
        json={"text": "a cup of coffee", "k": 2, "filters": {"tenant": tenant}},
        timeout=60,
    ).json()["hits"]
    assert hits[0]["id"] == ids["coffee"] and hits[0]["score"] >= hits[1]["score"]
    by_image = httpx.post(
        service.url + "/v1/search",
        json={
            "image_base64": base64.b64encode(photos_png["chelsea"]).decode(),
            "k": 1,
            "filters": {"tenant": tenant},
        },
        timeout=60,
    ).json()
    assert by_image["hits"][0]["id"] == ids["chelsea"]
    by_id = httpx.post(
        service.url + "/v1/search",
        json={"id": ids["coffee"], "k": 2, "filters": {"tenant": tenant}},
        timeout=60,
    ).json()
    assert len(by_id["hits"]) == 2
    assert ids["coffee"] not in [hit["id"] for hit in by_id["hits"]]

    # An analysed image that went to review is searchable, restricted to the review queue.
    analysed = httpx.post(
        service.url + "/v1/analyze",
        files={"image": ("a.png", photos_png["astronaut"], "image/png")},
        data={"tenant": tenant},
        timeout=60,
    ).json()
    assert analysed["decision"] == "review"
    assert analysed["trace"]["steps"][-1]["stage"] == "retrieval:index"
    in_review = httpx.post(
        service.url + "/v1/search",
        json={"text": "a person", "k": 5, "filters": {"in_review": True, "tenant": tenant}},
        timeout=60,
    ).json()
    assert [hit["metadata"]["review_item_id"] for hit in in_review["hits"]] == [analysed["review_item_id"]]

    # The reviewer's label flows back into the index metadata.
    item_id = analysed["review_item_id"]
    claim = httpx.post(service.url + "/v1/review/claim", json={"reviewer": "ann", "item_id": item_id}).json()
    labelled = httpx.post(
        f"{service.url}/v1/review/items/{item_id}/label",
        json={
            "reviewer": "ann",
            "lease_token": claim["lease_token"],
            "verdict": "correct",
            "label": "space shuttle",
        },
    )
    assert labelled.status_code == 200, labelled.text
    tagged = httpx.post(
        service.url + "/v1/search",
        json={
            "text": "a person",
            "k": 1,
            "filters": {"tags_all": ["reviewed_label:space shuttle"], "tenant": tenant},
        },
        timeout=60,
    ).json()
    assert [hit["metadata"]["review_item_id"] for hit in tagged["hits"]] == [item_id]

    assert index_items_metric(service) == before + 4  # three uploads and one analysed photo
    ready = httpx.get(service.url + "/readyz").json()
    assert ready["ready"] and ready["checks"]["search_index"]["items"] == before + 4

    deleted = httpx.delete(f"{service.url}/v1/search/items/{ids['camera']}")
    assert deleted.status_code == 200
    assert httpx.get(f"{service.url}/v1/search/items/{ids['camera']}").status_code == 404


@pytest.mark.parametrize(
    "body, field",
    [
        ({"text": "", "k": 3}, "query"),
        ({"text": "cat", "k": 0}, "k"),
        ({"text": "cat", "filters": {"colour": "red"}}, "filters.colour"),
        ({"k": 3}, "body"),
    ],
)
def test_bad_search_requests_are_400_naming_the_field(service, body, field):
    response = httpx.post(service.url + "/v1/search", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field, response.json()


def test_deleting_an_unknown_id_is_404_and_index_intact(service):
    before = httpx.get(service.url + "/v1/search/stats").json()
    assert httpx.delete(f"{service.url}/v1/search/items/987654").status_code == 404
    assert httpx.get(service.url + "/v1/search/stats").json() == before
