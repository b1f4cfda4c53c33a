"""The service core without Ray or HTTP: a real ONNX model, a real SQLite queue and ledger."""

from __future__ import annotations

import asyncio
import threading

import pytest

from router.auth.principal import Principal
from router.schemas import AnalyzeResponse
from router.services import ImageRequest, VisionRouteService, response_body
from router.services.backends import LocalOnnxTier
from router.services.review_requests import ClaimRequest, LabelRequest, ReleaseRequest
from tests.router.colour_model import colour_app_config, solid_png
from tests.support.pg_outage import (
    OUTAGE_CONNECT_TIMEOUT_S,
    quick_reconnect,  # noqa: F401 (a fixture)
    wait_until,
)
from visionroute.errors import (
    BackendUnavailable,
    BudgetExceeded,
    Conflict,
    InputError,
    NotFound,
    PermissionDenied,
    UnsupportedMediaType,
)

RED, GREY = solid_png((255, 0, 0)), solid_png((128, 128, 128))
ACME = Principal("acme", "client", "acme-app")
ACME_REVIEWER = Principal("acme", "reviewer", "ann")
GLOBEX_REVIEWER = Principal("globex", "reviewer", "gus")


def run(coroutine):
    return asyncio.run(coroutine)


make_config = colour_app_config


def build(config, tier=None) -> VisionRouteService:
    tier = tier or LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir)
    return VisionRouteService.build(config, tiers={"colour": tier})


@pytest.fixture
def service(tmp_path) -> VisionRouteService:
    return build(make_config(tmp_path))


def analyze(service, image: bytes, caller=None, request_id="r1", **fields):
    return run(service.analyze.analyze(ImageRequest(image, request_id, **fields), caller))


def test_a_sure_answer_is_accepted_with_its_trace_and_the_documented_response(service):
    analysis = analyze(service, RED)
    body = response_body(analysis)
    assert body["decision"] == "accept" and body["answer"][0]["label"] == "red"
    assert [s["stage"] for s in body["trace"]["steps"]] == ["input", "onnx:colour", "policy:thresholds"]
    assert body["policy_version"] == "policies-v1" and body["degraded"] is False and body["text"] is None
    assert body["trace"]["steps"][2]["policy_version"] == "colour-v1"
    assert body["cost_units"] == 1.0 and body["review_item_id"] is None
    AnalyzeResponse.model_validate(body)  # every field the service returns is documented


def test_an_unsure_answer_is_queued_and_the_review_flow_runs_through_the_core(service):
    analysis = analyze(service, GREY, request_id="grey-1")
    assert analysis.decision.value == "review" and analysis.review_item_id
    item_id = analysis.review_item_id
    listed = run(service.review.list_items(None))
    assert [item.id for item in listed.items] == [item_id] and listed.stats.depth == 1
    claim = run(service.review.claim(None, ClaimRequest(reviewer="ann", item_id=item_id)))
    assert claim.item.id == item_id and claim.lease_token
    with pytest.raises(Conflict):
        run(service.review.claim(None, ClaimRequest(reviewer="bob", item_id=item_id)))
    label = LabelRequest(reviewer="ann", lease_token=claim.lease_token, verdict="correct", label="green")
    assert run(service.review.label(None, item_id, label)).status == "labelled"
    assert run(service.review.label(None, item_id, label)).status == "labelled"  # idempotent
    with pytest.raises(InputError, match="needs 'label' or 'boxes'"):
        run(
            service.review.label(
                None, item_id, LabelRequest(reviewer="ann", lease_token="t", verdict="correct")
            )
        )
    data, media_type = run(service.review.image(None, item_id))
    assert data == GREY and media_type == "image/png"
    events = run(service.review.audit_log(None, item_id)).events
    assert [e.action for e in events][:2] == ["enqueue", "claim"]


def test_a_released_item_can_be_claimed_by_another_reviewer(service):
    item_id = analyze(service, GREY).review_item_id
    claim = run(service.review.claim(None, ClaimRequest(reviewer="ann", item_id=item_id)))
    with pytest.raises(Conflict):
        run(service.review.release(None, item_id, ReleaseRequest(reviewer="ann", lease_token="nope")))
    run(service.review.release(None, item_id, ReleaseRequest(reviewer="ann", lease_token=claim.lease_token)))
    assert run(service.review.claim(None, ClaimRequest(reviewer="bob", item_id=item_id))).item.id == item_id


def test_bad_input_is_an_error_naming_the_field(service):
    with pytest.raises(UnsupportedMediaType) as error:
        analyze(service, b"plain text")
    assert error.value.field == "image"
    with pytest.raises(InputError) as error:
        analyze(service, RED, task="ocr")
    assert error.value.field == "task" and "colour" in error.value.reason
    with pytest.raises(InputError) as error:
        analyze(service, RED, tenant="has spaces")
    assert error.value.field == "tenant"


def test_tenants_see_only_their_own_review_items(service):
    item_id = analyze(service, GREY, caller=ACME).review_item_id
    assert run(service.review.get(ACME_REVIEWER, item_id)).id == item_id
    with pytest.raises(NotFound):
        run(service.review.get(GLOBEX_REVIEWER, item_id))
    with pytest.raises(NotFound):
        run(service.review.claim(GLOBEX_REVIEWER, ClaimRequest(reviewer="gus", item_id=item_id)))
    assert run(service.review.list_items(GLOBEX_REVIEWER)).items == []
    with pytest.raises(PermissionDenied):
        analyze(service, RED, caller=ACME, tenant="globex")


def test_an_exhausted_budget_applies_its_degrade_mode(tmp_path):
    budgets = {"budgets": [{"name": "tiny", "cap_units": 1.0, "window_s": 3600, "degrade": "reject"}]}
    service = build(make_config(tmp_path, policies=budgets))
    assert analyze(service, RED, request_id="a").decision.value == "accept"
    with pytest.raises(BudgetExceeded) as error:
        analyze(service, RED, request_id="b")
    assert error.value.retry_after_s > 0


def test_a_queue_that_cannot_store_fails_the_request_instead_of_losing_it(service, monkeypatch):
    def broken(**_):
        raise OSError("disk full")

    monkeypatch.setattr(service.analyze.queue, "enqueue", broken)
    with pytest.raises(BackendUnavailable, match="disk full"):
        analyze(service, GREY)


def test_storage_runs_off_the_event_loop(service, monkeypatch):
    loop_threads = []
    enqueue = service.analyze.queue.enqueue

    def recording(**kwargs):
        loop_threads.append(threading.current_thread() is threading.main_thread())
        return enqueue(**kwargs)

    monkeypatch.setattr(service.analyze.queue, "enqueue", recording)
    analyze(service, GREY)
    assert loop_threads == [False]


def test_a_failing_cheap_tier_ends_in_review_and_fails_readiness(tmp_path):
    class DownTier:
        async def predict(self, image_rgb):
            raise ConnectionError("replica gone")

        async def describe(self):
            raise ConnectionError("replica gone")

    service = build(make_config(tmp_path), tier=DownTier())
    analysis = analyze(service, RED)
    assert analysis.decision.value == "review" and analysis.review_item_id
    readiness = run(service.operations.readiness())
    assert not readiness.ready and "error" in readiness.checks["tier:colour"]


def test_readiness_and_metrics_of_a_healthy_service(service):
    analyze(service, RED)
    readiness = run(service.operations.readiness())
    assert readiness.ready and readiness.checks["review_queue"] == {"writable": True}
    text = run(service.operations.metrics_text()).decode()
    assert (
        'visionroute_decisions_total{decision="accept",policy_version="policies-v1",task="colour"} 1.0'
        in text
    )


def test_an_invalid_policy_change_is_refused_and_the_running_set_stays(service):
    assert service.operations.reconfigure({"version": "policy-v2"}) is True
    assert service.operations.reconfigure({"version": "policy-v3", "nonsense": 1}) is False
    assert run(service.operations.policy()).version == "policy-v2"


def test_search_without_an_index_is_unavailable_not_a_crash(service):
    with pytest.raises(BackendUnavailable, match="retrieval.enabled"):
        run(service.search.search(None, text="a cat"))


@pytest.mark.usefixtures("quick_reconnect")
def test_on_postgresql_an_outage_is_a_503_and_not_ready_and_nothing_acknowledged_is_lost(
    tmp_path, postgres_server, postgres_dsn
):
    from visionroute.errors import BackendUnavailable

    config = make_config(tmp_path)
    config.state = config.state.model_copy(
        update={"backend": "postgres", "connect_timeout_s": OUTAGE_CONNECT_TIMEOUT_S}
    )
    service = build(config)
    before = analyze(service, GREY, ACME, request_id="before")  # unsure: a review item
    assert before.review_item_id and run(service.operations.readiness()).ready
    postgres_server.stop_server()
    try:
        with pytest.raises(BackendUnavailable) as error:
            analyze(service, GREY, ACME, request_id="during")
        assert error.value.retry_after_s > 0
        readiness = run(service.operations.readiness())
        assert not readiness.ready and readiness.checks["review_queue"] == {"writable": False}
        assert readiness.checks["budget_ledger"] == {"reachable": False}
    finally:
        postgres_server.start_server()
    wait_until(lambda: run(service.operations.readiness()).ready, "the pools reconnect by themselves")
    item = run(service.review.get(ACME_REVIEWER, before.review_item_id))
    assert item.id == before.review_item_id  # acknowledged before the outage: still there
    assert analyze(service, GREY, ACME, request_id="after").review_item_id
