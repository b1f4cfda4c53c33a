"""Issue 11 part A on the real service (Ray Serve, API keys), on both faces: a request id shared
by two tenants makes two review items and a label tags only its own tenant's search entry;
the reviewer is the key; review and search counts are the caller's tenant's."""

from __future__ import annotations

import hashlib
import io
import json
import uuid

import grpc
import httpx
import pytest
from PIL import Image, ImageOps

from router.grpc.ingress import pb, visionroute_pb2_grpc
from tests.support.keys import KEYS

pytestmark = [pytest.mark.server, pytest.mark.slow]
RUN = uuid.uuid4().hex[:8]  # request ids of this run: the shared service may have seen others


def rid(name: str) -> str:
    return f"{name}-{RUN}"


def headers(who: str, **extra: str) -> dict[str, str]:
    return {"x-api-key": KEYS[who][2], **extra}


def meta(who: str, **extra: str) -> list[tuple[str, str]]:
    return [("x-api-key", KEYS[who][2]), *extra.items()]


@pytest.fixture(scope="module")
def service(keyed_service):
    """The session's shared service with API keys (tests/integration/conftest.py; the keys, who
    acts here: acme_app, ann, bob, globex_app, gus, root in tests/support/keys.py). Other modules'
    items may be in it: counts are compared between tenants and faces, never to a fixed number."""
    return keyed_service


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(service.grpc_target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield visionroute_pb2_grpc.VisionRouteStub(channel)


@pytest.fixture(scope="module")
def unsure_photos(photos_png) -> tuple[bytes, bytes]:
    """Two different images the classifier is unsure of: the astronaut, and mirrored."""
    mirrored = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(photos_png["astronaut"]))).save(mirrored, format="PNG")
    return photos_png["astronaut"], mirrored.getvalue()


def analyze(service, who: str, image: bytes, request_id: str) -> dict:
    response = httpx.post(
        service.url + "/v1/analyze",
        files={"image": ("x.png", image, "image/png")},
        headers=headers(who, **{"x-request-id": request_id}),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()


def search_id(service, body: dict, who: str) -> int:
    """The analysed image's search entry, found by its sha256 as the caller: the shipped config
    indexes after the response (trace: search_index eventual) and a search through the same
    ingress waits for it."""
    found = httpx.post(
        service.url + "/v1/search",
        json={"text": "a photo", "k": 1, "filters": {"image_sha256": body["image"]["sha256"]}},
        headers=headers(who),
        timeout=30,
    )
    return found.json()["hits"][0]["id"]


def grpc_error(call, request, who: str) -> tuple[grpc.StatusCode, dict]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, metadata=meta(who), timeout=60)
    return caught.value.code(), json.loads(caught.value.details())


def test_a_shared_request_id_makes_one_item_per_tenant_and_labels_stay_in_their_tenant(
    service, unsure_photos
):
    acme_photo, globex_photo = unsure_photos
    a = analyze(service, "acme_app", acme_photo, rid("shared-http"))
    b = analyze(service, "globex_app", globex_photo, rid("shared-http"))
    assert a["decision"] == b["decision"] == "review"
    assert a["review_item_id"] != b["review_item_id"]
    image = httpx.get(f"{service.url}/v1/review/items/{b['review_item_id']}/image", headers=headers("gus"))
    item = httpx.get(f"{service.url}/v1/review/items/{b['review_item_id']}", headers=headers("gus")).json()
    assert image.status_code == 200 and item["image_sha256"] == hashlib.sha256(globex_photo).hexdigest()
    # B's image (redacted: privacy) is the one queued.
    assert hashlib.sha256(image.content).hexdigest() == item["stored_sha256"]
    # A retry within a tenant is the same item.
    assert (
        analyze(service, "acme_app", acme_photo, rid("shared-http"))["review_item_id"] == a["review_item_id"]
    )
    # A's reviewer labels A's item; only A's search entry gets the reviewed tags.
    claim = httpx.post(
        service.url + "/v1/review/claim", json={"item_id": a["review_item_id"]}, headers=headers("ann")
    ).json()
    label = {"lease_token": claim["lease_token"], "verdict": "correct", "label": "space shuttle"}
    labelled = httpx.post(
        f"{service.url}/v1/review/items/{a['review_item_id']}/label", json=label, headers=headers("ann")
    )
    assert labelled.status_code == 200 and labelled.json()["labelled_by"] == "ann"

    def tags(who: str, body: dict) -> list[str]:
        item_id = search_id(service, body, who)
        item = httpx.get(f"{service.url}/v1/search/items/{item_id}", headers=headers(who), timeout=30)
        return item.json()["metadata"]["tags"]

    assert "reviewed:correct" in tags("acme_app", a)
    assert not [t for t in tags("globex_app", b) if t.startswith("reviewed")]


def test_a_shared_request_id_over_grpc(stub, unsure_photos):
    acme_photo, globex_photo = unsure_photos
    replies = [
        stub.Analyze(
            pb.AnalyzeRequest(image=photo), metadata=meta(who, request_id=rid("shared-grpc")), timeout=60
        )
        for who, photo in (("acme_app", acme_photo), ("globex_app", globex_photo))
    ]
    assert [r.decision for r in replies] == ["review", "review"]
    assert replies[0].review_item_id != replies[1].review_item_id
    item = stub.GetReviewItem(
        pb.GetReviewItemRequest(item_id=replies[1].review_item_id), metadata=meta("gus"), timeout=30
    )
    assert json.loads(item.item_json)["tenant"] == "globex"


def test_the_key_is_the_reviewer_on_both_faces(service, stub, unsure_photos):
    item_id = analyze(service, "acme_app", unsure_photos[0], rid("identity-1"))["review_item_id"]
    refused = httpx.post(
        service.url + "/v1/review/claim", json={"reviewer": "ann", "item_id": item_id}, headers=headers("bob")
    )
    assert refused.status_code == 403 and refused.json()["field"] == "reviewer"
    code, details = grpc_error(
        stub.ClaimReviewItem, pb.ClaimReviewItemRequest(reviewer="ann", item_id=item_id), "bob"
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and details["field"] == "reviewer"
    claim = stub.ClaimReviewItem(pb.ClaimReviewItemRequest(item_id=item_id), metadata=meta("ann"), timeout=30)
    assert json.loads(claim.item.item_json)["lease_owner"] == "ann"
    # bob cannot take the lease over (not even by re-claiming under ann's name: refused above)
    rival = httpx.post(service.url + "/v1/review/claim", json={"item_id": item_id}, headers=headers("bob"))
    assert rival.status_code == 409 and "leased by ann" in rival.json()["reason"]
    done = stub.LabelReviewItem(
        pb.LabelReviewItemRequest(
            item_id=item_id, label_json=json.dumps({"lease_token": claim.lease_token, "verdict": "reject"})
        ),
        metadata=meta("ann"),
        timeout=30,
    )
    assert json.loads(done.item_json)["labelled_by"] == "ann"
    events = httpx.get(f"{service.url}/v1/review/items/{item_id}/audit", headers=headers("ann")).json()[
        "events"
    ]
    assert [(e["action"], e["actor"]) for e in events] == [
        ("enqueue", "service"),
        ("claim", "ann"),
        ("label", "ann"),
    ]


def test_counts_are_the_callers_tenants_on_both_faces(service, stub, unsure_photos):
    analyze(service, "globex_app", unsure_photos[1], rid("counts-1"))  # at least one pending item each
    analyze(service, "acme_app", unsure_photos[0], rid("counts-2"))

    def pending(who: str) -> int:
        items = httpx.get(
            service.url + "/v1/review/items?status=pending&limit=1000", headers=headers(who)
        ).json()["items"]
        return len(items)

    gus, root = pending("gus"), pending("root")
    assert 0 < gus < root
    http_stats = httpx.get(service.url + "/v1/review/stats", headers=headers("gus")).json()
    grpc_stats = json.loads(stub.GetReviewStats(pb.Empty(), metadata=meta("gus"), timeout=30).json)
    listed = json.loads(
        stub.ListReviewItems(pb.ListReviewItemsRequest(), metadata=meta("gus"), timeout=30).stats_json
    )
    assert http_stats["depth"] == grpc_stats["depth"] == listed["depth"] == gus
    assert httpx.get(service.url + "/v1/review/stats", headers=headers("root")).json()["depth"] == root
    own = json.loads(stub.GetSearchStats(pb.Empty(), metadata=meta("globex_app"), timeout=30).json)
    assert own["tenant"] == "globex" and "index_dir" not in own and "stored_vectors" not in own
    assert own == httpx.get(service.url + "/v1/search/stats", headers=headers("globex_app")).json()
    everything = json.loads(stub.GetSearchStats(pb.Empty(), metadata=meta("root"), timeout=30).json)
    assert "index_dir" in everything and everything["items"] > own["items"] > 0
