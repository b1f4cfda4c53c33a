"""The Python client (visionroute/client/) against the real running service, both faces, both clients.

One scenario (analyse, the same request id again, index and search, review: claim, label,
audit, a batch in chunks, a refusal) runs four times: HTTP and gRPC, blocking and asyncio. The scenario is written
once as a coroutine; ``answer`` awaits what the asyncio client returns and passes the blocking
client's result through. On the shared services (tests/integration/conftest.py): the no-key one
in a tenant of its own, the keyed one for the API key, roles and the typed admin answers.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import uuid
from pathlib import Path

import pytest

from policies.audit_sampling import AuditEstimate
from router.schemas import AnalyzeResponse
from router.services.results import (
    AuditLog,
    Claim,
    IndexedSearchItem,
    PolicyView,
    ReviewItemView,
    ReviewPage,
    ReviewStats,
    SearchResponse,
)
from tests.support.keys import key
from visionroute.client import AsyncVisionRouteClient, ServiceError, VisionRouteClient
from visionroute.errors import InputError, NotFound, Unauthenticated

pytestmark = [pytest.mark.server, pytest.mark.slow]

FACES = ("http", "grpc")
CLIENTS = {"sync": VisionRouteClient, "async": AsyncVisionRouteClient}


def url_of(service, face: str) -> str:
    return service.url if face == "http" else f"grpc://{service.grpc_target}"


async def answer(value):
    """The asyncio client's answer awaited; the blocking client's as it is."""
    return await value if inspect.isawaitable(value) else value


async def closed(client) -> None:
    await answer(client.close())


async def analyse_search_and_review(client, tenant: str, photos: dict[str, bytes]) -> None:
    # analyse: an unsure photo goes to review; the same request id again is the same item
    request_id = "client-" + uuid.uuid4().hex
    unsure = await answer(client.analyze(photos["astronaut"], tenant=tenant, request_id=request_id))
    assert isinstance(unsure, AnalyzeResponse)
    assert unsure.request_id == request_id == unsure.trace["request_id"]
    assert unsure.decision == "review" and unsure.review_item_id
    assert unsure.image["width"] == 512 and [s["stage"] for s in unsure.trace["steps"]][0] == "input"
    again = await answer(client.analyze(photos["astronaut"], tenant=tenant, request_id=request_id))
    assert again.review_item_id == unsure.review_item_id

    # search: index two photos in this tenant, find the coffee by text
    ids = {}
    for name in ("coffee", "chelsea"):
        indexed = await answer(client.index_item(photos[name], {"tenant": tenant, "tags": [name]}))
        assert isinstance(indexed, IndexedSearchItem)
        ids[name] = indexed.id
    found = await answer(client.search("a cup of coffee", k=2, filters={"tenant": tenant}))
    assert isinstance(found, SearchResponse) and found.query == "a cup of coffee"
    assert [hit.id for hit in found.hits][0] == ids["coffee"]
    assert found.hits[0].metadata.tenant == tenant and found.hits[0].metadata.tags == ["coffee"]

    # review: the item, a claim, a label, its audit log
    item_id = unsure.review_item_id
    item = await answer(client.review_item(item_id))
    assert isinstance(item, ReviewItemView) and item.tenant == tenant and item.request_id == request_id
    assert item.status == "pending" and item.trace["request_id"] == request_id
    page = await answer(client.review_items("pending", limit=5))
    assert isinstance(page, ReviewPage) and page.stats.depth >= 1
    claim = await answer(client.claim("ann", item_id=item_id))
    assert isinstance(claim, Claim) and claim.item.id == item_id and claim.lease_token
    labelled = await answer(
        client.label(
            item_id, lease_token=claim.lease_token, verdict="correct", label="space shuttle", reviewer="ann"
        )
    )
    assert labelled.status == "labelled" and labelled.label["verdict"] == "correct"
    assert labelled.label["label"] == "space shuttle" and labelled.labelled_by == "ann"
    audit = await answer(client.review_audit(item_id))
    assert isinstance(audit, AuditLog)
    actions = [e.action for e in audit.events]
    assert actions[0] == "enqueue" and actions[-2:] == ["claim", "label"]

    # a batch in two chunks: each image its own answer or error, in order; the same ids again
    # are the same requests (the astronaut's review item is not made twice)
    images = [photos["coffee"], photos["astronaut"], b"these bytes are no image"]
    seen = []
    batch_id = "client-batch-" + uuid.uuid4().hex
    batch = await answer(
        client.analyze_batch(
            images, tenant=tenant, request_id=batch_id, batch_size=2, on_progress=seen.append
        )
    )
    assert [item.index for item in batch] == [0, 1, 2] and [p.done for p in seen] == [2, 3]
    assert [item.request_id for item in batch] == [f"{batch_id}.0:0", f"{batch_id}.0:1", f"{batch_id}.2:0"]
    assert batch[0].response.answer[0].label == "espresso" and batch[1].response.review_item_id
    assert not batch[2].ok and batch[2].error.field == "images[2]" and isinstance(batch[2].error, InputError)
    again = await answer(client.analyze_batch(images, tenant=tenant, request_id=batch_id, batch_size=2))
    assert again[1].response.review_item_id == batch[1].response.review_item_id

    # a refusal: the service's status, error, field and reason, as the project's error kind
    with pytest.raises(ServiceError) as refused:
        await answer(client.analyze(photos["coffee"], task="no-such-task", tenant=tenant))
    error = refused.value
    assert error.status == 400 and error.error == "InputError" and error.field == "task"
    assert "no-such-task" in error.reason and error.request_id and isinstance(error, InputError)


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("face", FACES)
def test_analyse_search_and_review_through_the_client(default_service, face, kind, fresh_tenant, photos_png):
    async def scenario() -> None:
        client = CLIENTS[kind](url_of(default_service, face), timeout_s=120)
        try:
            assert client.transport_name == face
            await analyse_search_and_review(client, fresh_tenant, photos_png)
        finally:
            await closed(client)

    asyncio.run(scenario())


def test_the_readme_lines_run(default_service, photos_png, tmp_path, monkeypatch, capsys):
    """The README's three lines of the client, as written, but for the test service's port."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"From Python .*?```python\n(.*?)```", readme, re.S).group(1)
    assert len([line for line in block.strip().splitlines() if line.strip()]) == 3
    (tmp_path / "coffee.png").write_bytes(photos_png["coffee"])
    monkeypatch.chdir(tmp_path)
    exec(block.replace("http://127.0.0.1:8000", default_service.url), {})
    assert capsys.readouterr().out.strip() in ("accept", "escalate", "review")


@pytest.mark.parametrize("face", FACES)
def test_keys_roles_and_typed_admin_answers(keyed_service, face, photos_png):
    url = url_of(keyed_service, face)
    with VisionRouteClient(url, timeout_s=120) as anonymous, pytest.raises(ServiceError) as refused:
        anonymous.analyze(photos_png["coffee"])
    assert refused.value.status == 401 and isinstance(refused.value, Unauthenticated)
    assert refused.value.error == "Unauthenticated" and refused.value.reason

    with VisionRouteClient(url, key("acme_client"), timeout_s=120) as acme:
        served = acme.analyze(photos_png["coffee"])
        assert served.decision in ("accept", "review") and served.answer and served.request_id
    with VisionRouteClient(url, key("acme_reviewer"), timeout_s=120) as reviewer:
        stats = reviewer.review_stats()
        assert isinstance(stats, ReviewStats) and stats.sla_s > 0
        assert all(isinstance(e, AuditEstimate) for e in stats.audit.values())
        with pytest.raises(NotFound) as missing:
            reviewer.review_item("no-such-item")
        assert missing.value.status == 404 and missing.value.field
    with VisionRouteClient(url, key("admin"), timeout_s=120) as admin:
        policy = admin.policy()
        assert isinstance(policy, PolicyView) and policy.version and policy.replica_pid > 0
        assert policy.policy["version"] == policy.version


def test_both_faces_give_the_same_typed_answer(keyed_service, photos_png):
    with (
        VisionRouteClient(url_of(keyed_service, "http"), key("acme_client"), timeout_s=120) as http,
        VisionRouteClient(url_of(keyed_service, "grpc"), key("acme_client"), timeout_s=120) as grpc,
    ):
        one, other = http.analyze(photos_png["chelsea"]), grpc.analyze(photos_png["chelsea"])
    assert one.decision == other.decision and one.task == other.task and one.image == other.image
    assert [d.label for d in one.answer] == [d.label for d in other.answer]
    assert one.answer[0].confidence == pytest.approx(other.answer[0].confidence, abs=1e-5)
    assert [s["stage"] for s in one.trace["steps"]] == [s["stage"] for s in other.trace["steps"]]
    assert set(one.trace["steps"][0]) == set(other.trace["steps"][0])  # the same step fields
