"""The real service end to end: Ray Serve from serve_config.yaml, real models, real photos."""

from __future__ import annotations

import base64
import io
import uuid

import httpx
import pytest
from PIL import Image

from tests.support.keys import key

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def service(default_service):
    """The session's shared service (tests/integration/conftest.py): other tests' review items
    and search entries may be in it, so these tests look only at what they created."""
    return default_service


def review_item_ids(service, status: str = "pending") -> list[str]:
    """Every listed review item's id, page by page (a shared queue may hold more than a page)."""
    ids: list[str] = []
    while True:
        page = httpx.get(
            service.url + "/v1/review/items", params={"status": status, "limit": 1000, "offset": len(ids)}
        ).json()["items"]
        if not page:
            return ids
        ids += [item["id"] for item in page]


def analyze(service, image: bytes, headers: dict[str, str] | None = None, **fields) -> httpx.Response:
    return httpx.post(
        service.url + "/v1/analyze",
        files={"image": ("x.png", image, "image/png")},
        data=fields,
        headers=headers,
        timeout=60,
    )


@pytest.mark.parametrize("photo, label", [("coffee", "espresso"), ("chelsea", "Egyptian cat")])
def test_clear_photos_are_accepted_with_their_imagenet_label(service, photos_png, photo, label):
    response = analyze(service, photos_png[photo])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["decision"] == "accept" and body["answer"][0]["label"] == label
    assert body["review_item_id"] is None
    stages = [step["stage"] for step in body["trace"]["steps"]]
    # serve_config.yaml indexes every analysed image for search (retrieval.index_analysed)
    assert stages == ["input", "onnx:classify", "policy:thresholds", "retrieval:index"]
    onnx_step = body["trace"]["steps"][1]
    assert onnx_step["model"] == "efficientnet_lite0" and "sha256:" in onnx_step["model_version"]
    assert onnx_step["latency_ms"] > 0 and onnx_step["cost_units"] == 1.0
    policy_step = body["trace"]["steps"][2]
    assert policy_step["policy_version"] == "classify-thresholds-v1"
    assert policy_step["threshold"] == {"accept": 0.7, "escalate": 0.3}
    assert response.headers["x-request-id"] == body["request_id"]


def test_json_base64_and_text_task(service, photos_png):
    response = httpx.post(
        service.url + "/v1/analyze",
        json={"image_base64": base64.b64encode(photos_png["page"]).decode(), "task": "text"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "text" and len(body["answer"]) >= 5
    assert all(box["label"] == "text" for box in body["answer"])


def bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make_request, status, field",
    [
        (lambda s, p: analyze(s, b"plain text, not an image"), 415, "image"),
        (lambda s, p: analyze(s, p["coffee"][:2000]), 400, "image"),
        (
            lambda s, p: httpx.post(
                s.url + "/v1/analyze", content=b"", headers={"content-type": "application/json"}
            ),
            400,
            "body",
        ),
        (
            lambda s, p: httpx.post(
                s.url + "/v1/analyze", content=p["coffee"], headers={"content-type": "image/png"}
            ),
            415,
            "content-type",
        ),
        (lambda s, p: analyze(s, bomb_png()), 413, "image"),
        (lambda s, p: analyze(s, b"0" * (21 << 20)), 413, "body"),
        (lambda s, p: analyze(s, p["coffee"], task="ocr"), 400, "task"),
        (lambda s, p: httpx.post(s.url + "/v1/analyze", json={"image_base64": "%%%"}), 400, "image_base64"),
        (
            lambda s, p: httpx.post(s.url + "/v1/analyze", json={"image_base64": "aGk=", "colour": 1}),
            400,
            "colour",
        ),
    ],
    ids=[
        "not-an-image",
        "truncated-png",
        "empty-body",
        "wrong-content-type",
        "decompression-bomb",
        "body-over-limit",
        "unknown-task",
        "bad-base64",
        "unknown-json-field",
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field_and_service_keeps_serving(
    service, photos_png, make_request, status, field
):
    response = make_request(service, photos_png)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field and response.json()["reason"]
    assert analyze(service, photos_png["coffee"]).status_code == 200


def face_sharpness(png: bytes) -> float:
    """Laplacian variance over the astronaut's face (annotated by hand): its features' edges."""
    import cv2
    import numpy as np

    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"))[85:160, 195:255]
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def test_unsure_photo_goes_to_review_and_a_reviewer_labels_it(service, photos_png):
    body = analyze(service, photos_png["astronaut"]).json()
    assert body["decision"] == "review" and body["review_item_id"]
    item_id = body["review_item_id"]
    assert [s["stage"] for s in body["trace"]["steps"]][-3:] == [
        "privacy:redact",
        "review_queue",
        "retrieval:index",
    ]
    redact = body["trace"]["steps"][-3]["details"]["faces"]
    assert redact["count"] == 1 and redact["detector_version"].startswith("facenet-pytorch==2.6.0")
    assert item_id in review_item_ids(service)
    image = httpx.get(f"{service.url}/v1/review/items/{item_id}/image")
    # Privacy (policies.privacy defaults): the reviewer gets the photo with its face blurred.
    assert image.content != photos_png["astronaut"] and image.headers["content-type"] == "image/png"
    assert face_sharpness(image.content) < 0.05 * face_sharpness(photos_png["astronaut"])
    claim = httpx.post(service.url + "/v1/review/claim", json={"reviewer": "ann", "item_id": item_id}).json()
    assert claim["item"]["id"] == item_id and "lease_token" not in claim["item"]
    rival = httpx.post(service.url + "/v1/review/claim", json={"reviewer": "bob", "item_id": item_id})
    assert rival.status_code == 409
    label = {
        "reviewer": "ann",
        "lease_token": claim["lease_token"],
        "verdict": "correct",
        "label": "space shuttle",
    }
    labelled = httpx.post(f"{service.url}/v1/review/items/{item_id}/label", json=label)
    assert labelled.status_code == 200 and labelled.json()["status"] == "labelled"
    assert (
        httpx.post(f"{service.url}/v1/review/items/{item_id}/label", json=label).status_code == 200
    )  # idempotent
    assert item_id not in review_item_ids(service)


def test_a_reviewer_can_skip_a_claimed_item(service, photos_png):
    response = httpx.post(
        service.url + "/v1/analyze",
        files={"image": ("a.png", photos_png["astronaut"], "image/png")},
        headers={"x-request-id": f"skip-test-{uuid.uuid4().hex}"},
        timeout=60,
    )
    item_id = response.json()["review_item_id"]
    claim = httpx.post(service.url + "/v1/review/claim", json={"reviewer": "ann", "item_id": item_id}).json()
    wrong = httpx.post(
        f"{service.url}/v1/review/items/{item_id}/release", json={"reviewer": "ann", "lease_token": "nope"}
    )
    assert wrong.status_code == 409 and wrong.json()["field"] == "lease_token"
    released = httpx.post(
        f"{service.url}/v1/review/items/{item_id}/release",
        json={"reviewer": "ann", "lease_token": claim["lease_token"]},
    )
    assert released.status_code == 200 and released.json()["is_leased"] is False
    assert (
        httpx.post(service.url + "/v1/review/claim", json={"reviewer": "bob", "item_id": item_id}).json()[
            "item"
        ]["lease_owner"]
        == "bob"
    )
    events = [
        e["action"] for e in httpx.get(f"{service.url}/v1/review/items/{item_id}/audit").json()["events"]
    ]
    assert events[-3:] == ["claim", "release", "claim"]


def test_openapi_docs_and_readiness(service):
    assert httpx.get(service.url + "/docs").status_code == 200
    spec = httpx.get(service.url + "/openapi.json").json()
    assert "/v1/analyze" in spec["paths"] and "/v1/review/claim" in spec["paths"]
    ready = httpx.get(service.url + "/readyz").json()
    assert ready["ready"] and ready["checks"]["review_queue"]["writable"]


def test_the_classifier_can_run_inside_the_ingress(keyed_service, photos_png):
    """placement: ingress (no hop to a tier deployment) gives the same answers and trace. The
    session's keyed service places the classifier so (tests/integration/conftest.py)."""
    client, admin = {"x-api-key": key("acme_client")}, {"x-api-key": key("admin")}
    body = analyze(keyed_service, photos_png["chelsea"], headers=client).json()
    assert body["decision"] == "accept" and body["answer"][0]["label"] == "Egyptian cat"
    assert body["trace"]["steps"][1]["model"] == "efficientnet_lite0"
    ready = httpx.get(keyed_service.url + "/readyz", headers=admin).json()  # an admin sees details
    assert ready["checks"]["tier:classify"]["placement"] == "ingress"
    assert "review_item_id" in analyze(keyed_service, photos_png["astronaut"], headers=client).json()
