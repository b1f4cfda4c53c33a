"""Issue 11 (part A) through the service core and the HTTP face, without Ray: review items are
tenant-scoped by request id, labels reach only the same tenant's search entries, the reviewer
is the key, and counts are the caller's tenant's."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient

from retrieval.embedders.base import l2_normalise
from retrieval.service import SearchService
from router.auth.keys import Authenticator, SecurityConfig, hash_key
from router.auth.principal import Principal
from router.config import parse_app_config
from router.http.api import app
from router.http.deps import attach
from router.services import ImageRequest, VisionRouteService
from router.services.backends import LocalOnnxTier, LocalSearch
from router.services.review_requests import ClaimRequest, LabelRequest, ReleaseRequest
from tests.router.colour_model import LABELS, solid_png, write_colour_model
from visionroute.errors import Conflict, InputError, PermissionDenied

GREY, DARK_GREY, RED = solid_png((128, 128, 128)), solid_png((90, 90, 90)), solid_png((255, 0, 0))
KEYS = {  # name -> (tenant, role, key name in the config, plain key)
    "acme_app": ("acme", "client", "acme-app", "vr_acme_app"),
    "ann": ("acme", "reviewer", "ann", "vr_ann"),
    "bob": ("acme", "reviewer", "bob", "vr_bob"),
    "nameless": ("acme", "reviewer", "", "vr_nameless"),
    "globex_app": ("globex", "client", "globex-app", "vr_globex_app"),
    "gus": ("globex", "reviewer", "gus", "vr_gus"),
    "root": ("ops", "admin", "root", "vr_root"),
}
SECURITY = SecurityConfig(
    api_keys=[
        {"sha256": hash_key(key), "tenant": tenant, "role": role, "name": name}
        for tenant, role, name, key in KEYS.values()
    ]
)


def principal(who: str) -> Principal:
    """The caller exactly as the faces see it: authenticated from the key."""
    return Authenticator(SECURITY).authenticate(KEYS[who][3], None, client="127.0.0.1")


def run(coroutine):
    return asyncio.run(coroutine)


class MeanColourEmbedder:
    """A tiny deterministic embedder: the image's mean colour (enough to index and find)."""

    space, dim = "test-mean-colour", 4

    def embed_images(self, images_rgb):
        means = [[*np.asarray(image).reshape(-1, 3).mean(0) / 255.0, 1.0] for image in images_rgb]
        return l2_normalise(np.array(means))

    def embed_texts(self, texts):
        return l2_normalise(np.ones((len(texts), self.dim)))


@pytest.fixture
def service(tmp_path):
    model = write_colour_model(tmp_path / "colour.onnx")
    config = parse_app_config(
        {
            "models_dir": str(tmp_path),
            "default_task": "colour",
            "cascades": {
                "colour": {
                    "tier": {"model": str(model), "decoder": "classifier", "labels": LABELS, "size_hw": 32},
                    "policy": {"version": "colour-v1", "accept_threshold": 0.9, "escalate_threshold": 0.2},
                }
            },
            "review": {"path": str(tmp_path / "review")},
            "retrieval": {"enabled": True, "index_dir": str(tmp_path / "index"), "index_analysed": True},
        }
    )
    search = SearchService(config.retrieval, embedder=MeanColourEmbedder())
    tier = LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir)
    yield VisionRouteService.build(config, tiers={"colour": tier}, search=LocalSearch(search))
    search.close()


def analyze(service, image: bytes, who: str, request_id: str):
    return run(service.analyze.analyze(ImageRequest(image, request_id), principal(who)))


def search_entry(service, analysis):
    search_id = next(s.details["search_id"] for s in analysis.trace if s.stage == "retrieval:index")
    return run(service.search.get(None, search_id))


def claim_and_label(service, who: str, item_id: str, label: str = "green"):
    caller = principal(who)
    claim = run(service.review.claim(caller, ClaimRequest(item_id=item_id)))
    request = LabelRequest(lease_token=claim.lease_token, verdict="correct", label=label)
    return run(service.review.label(caller, item_id, request))


# -- finding 1: request ids and the label -> index flow are per tenant ---------------------------


def test_two_tenants_with_one_request_id_each_get_their_own_item_and_tags(service):
    a = analyze(service, GREY, "acme_app", "R")
    b = analyze(service, DARK_GREY, "globex_app", "R")
    assert a.review_item_id and b.review_item_id and a.review_item_id != b.review_item_id
    assert (
        run(service.review.image(principal("gus"), b.review_item_id))[0] == DARK_GREY
    )  # B's image is queued
    assert [i.id for i in run(service.review.list_items(principal("gus"))).items] == [b.review_item_id]
    assert search_entry(service, b).metadata.review_item_id == b.review_item_id
    claim_and_label(service, "ann", a.review_item_id)
    tags_a, tags_b = (
        search_entry(service, a).metadata.tags,
        search_entry(service, b).metadata.tags,
    )
    assert "reviewed:correct" in tags_a and "reviewed_label:green" in tags_a
    assert not [t for t in tags_b if t.startswith("reviewed")]
    # A retry within a tenant is still the same item; another image under that id is a 409.
    assert analyze(service, GREY, "acme_app", "R").review_item_id == a.review_item_id
    with pytest.raises(Conflict) as error:
        analyze(service, solid_png((60, 60, 60)), "acme_app", "R")
    assert error.value.field == "request_id"


def test_a_label_never_tags_another_tenants_entry_that_names_the_same_review_item(service):
    """Entries indexed before the fix may carry another tenant's review item id."""
    a = analyze(service, GREY, "acme_app", "R1")
    search = service.search.backend.service
    stray = search.index_image(RED, {"tenant": "globex", "review_item_id": a.review_item_id})
    claim_and_label(service, "ann", a.review_item_id)
    assert "reviewed:correct" in search_entry(service, a).metadata.tags
    assert not [t for t in search.get(stray)["metadata"]["tags"] if t.startswith("reviewed")]


# -- finding 2: the reviewer is the key ----------------------------------------------------------


def test_the_key_is_the_reviewer_and_another_name_is_refused(service):
    item_id = analyze(service, GREY, "acme_app", "r1").review_item_id
    ann, bob = principal("ann"), principal("bob")
    with pytest.raises(PermissionDenied) as error:
        run(service.review.claim(bob, ClaimRequest(reviewer="ann", item_id=item_id)))
    assert error.value.field == "reviewer" and "'bob'" in error.value.reason
    claim = run(service.review.claim(ann, ClaimRequest(item_id=item_id)))  # no name needed
    assert claim.item.lease_owner == "ann"
    # bob cannot take ann's lease over, under his name or hers, nor label or release with it
    with pytest.raises(Conflict, match="leased by ann"):
        run(service.review.claim(bob, ClaimRequest(item_id=item_id)))
    token = claim.lease_token
    with pytest.raises(PermissionDenied):
        run(
            service.review.label(
                bob, item_id, LabelRequest(reviewer="ann", lease_token=token, verdict="reject")
            )
        )
    with pytest.raises(Conflict):
        run(service.review.label(bob, item_id, LabelRequest(lease_token=token, verdict="reject")))
    with pytest.raises(PermissionDenied):
        run(service.review.release(bob, item_id, ReleaseRequest(reviewer="ann", lease_token=token)))
    done = run(
        service.review.label(ann, item_id, LabelRequest(reviewer="ann", lease_token=token, verdict="confirm"))
    )
    assert done.status == "labelled" and done.labelled_by == "ann"
    events = run(service.review.audit_log(ann, item_id)).events
    assert [(e.action, e.actor) for e in events] == [
        ("enqueue", "service"),
        ("claim", "ann"),
        ("label", "ann"),
    ]


def test_a_key_without_a_name_acts_as_its_key_id_and_admins_cannot_impersonate(service):
    item_id = analyze(service, GREY, "acme_app", "r1").review_item_id
    nameless = principal("nameless")
    identity = f"key:{hash_key(KEYS['nameless'][3])[:12]}"
    claim = run(service.review.claim(nameless, ClaimRequest(reviewer=identity, item_id=item_id)))
    assert claim.item.lease_owner == identity
    run(service.review.release(nameless, item_id, ReleaseRequest(lease_token=claim.lease_token)))
    with pytest.raises(PermissionDenied):
        run(service.review.claim(principal("root"), ClaimRequest(reviewer="ann", item_id=item_id)))
    assert (
        run(service.review.claim(principal("root"), ClaimRequest(item_id=item_id))).item.lease_owner == "root"
    )
    events = run(service.review.audit_log(None, item_id)).events
    assert [e.actor for e in events] == ["service", identity, identity, "root"]


def test_without_keys_the_field_names_the_reviewer_and_is_required(service):
    item_id = analyze(service, GREY, "acme_app", "r1").review_item_id
    assert (
        run(service.review.claim(None, ClaimRequest(reviewer="eve", item_id=item_id))).item.lease_owner
        == "eve"
    )
    with pytest.raises(InputError) as error:
        run(service.review.claim(None, ClaimRequest(item_id=item_id)))
    assert error.value.field == "reviewer"
    assert ClaimRequest(reviewer="").reviewer is None  # proto3's "" is a field left out


# -- finding 7: counts are the caller's tenant's -------------------------------------------------


def test_review_and_search_counts_are_the_callers_tenants(service):
    analyze(service, GREY, "acme_app", "a1")
    analyze(service, solid_png((100, 100, 100)), "acme_app", "a2")
    analyze(service, RED, "acme_app", "a3")  # accepted: indexed, not queued
    gus_item = analyze(service, DARK_GREY, "globex_app", "g1").review_item_id
    run(service.review.claim(principal("gus"), ClaimRequest(item_id=gus_item)))
    acme, globex, root = principal("ann"), principal("gus"), principal("root")
    stats = {
        who: run(service.review.stats(p)) for who, p in (("acme", acme), ("globex", globex), ("root", root))
    }
    assert [stats[w].stats.depth for w in ("acme", "globex", "root")] == [2, 1, 3]
    assert [stats[w].stats.leased for w in ("acme", "globex", "root")] == [0, 1, 1]
    assert stats["globex"].audit["colour"].labelled == 0
    assert run(service.review.stats(None)).stats.depth == 3  # auth off: everything
    listed = run(service.review.list_items(globex))
    assert (listed.stats.depth, listed.stats.leased) == (1, 1)
    assert run(service.review.list_items(root)).stats.depth == 3
    mine = run(service.search.stats(principal("globex_app")))
    assert mine.to_json() == {"tenant": "globex", "items": 1, "dim": 4, "space": "test-mean-colour"}
    assert (mine.tenant, mine.items, mine.dim) == ("globex", 1, 4)
    assert run(service.search.stats(principal("acme_app"))).items == 3
    everything = run(service.search.stats(root))
    assert everything.items == 4 and everything.tenant is None and "index_dir" in everything.report


def test_the_http_face_passes_the_caller_to_stats_and_refuses_another_reviewer(service):
    attach(service, SECURITY)
    analyze(service, GREY, "acme_app", "a1")
    item_id = analyze(service, DARK_GREY, "globex_app", "g1").review_item_id
    with TestClient(app) as client:

        def get(path: str, who: str):
            return client.get(path, headers={"x-api-key": KEYS[who][3]})

        assert get("/v1/review/stats", "gus").json()["depth"] == 1
        assert get("/v1/review/stats", "root").json()["depth"] == 2
        assert get("/v1/review/items", "gus").json()["depth"] == 1
        assert get("/v1/search/stats", "gus").json() == {
            "tenant": "globex",
            "items": 1,
            "dim": 4,
            "space": "test-mean-colour",
        }
        assert "index_dir" in get("/v1/search/stats", "root").json()
        refused = client.post(
            "/v1/review/claim",
            json={"reviewer": "ann", "item_id": item_id},
            headers={"x-api-key": KEYS["gus"][3]},
        )
        assert refused.status_code == 403 and refused.json()["field"] == "reviewer"
        claimed = client.post(
            "/v1/review/claim", json={"item_id": item_id}, headers={"x-api-key": KEYS["gus"][3]}
        )
        assert claimed.status_code == 200 and claimed.json()["item"]["lease_owner"] == "gus"
