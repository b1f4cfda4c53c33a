"""Issue 23 through the service core and the HTTP face, without Ray: a drift alarm raises the task's
audit fraction (within the audit budget; the audit items carry the raised inclusion probability)
and lowers it when the alarm clears; double labels go to a second reviewer and disputes to an
admin; GET /v1/review/reviewers is for admins and flags a reviewer an adjudication keeps
overruling."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from policies.audit_sampling import AuditConfig, is_sampled
from policies.policy_set import parse_policy_set
from router.auth.keys import Authenticator, SecurityConfig, hash_key
from router.config import parse_app_config
from router.http.api import app
from router.http.deps import attach
from router.services import ImageRequest, VisionRouteService
from router.services.backends import LocalOnnxTier
from router.services.review_requests import ClaimRequest, LabelRequest
from tests.router.colour_model import LABELS, solid_png, write_colour_model
from visionroute.errors import ConfigError, Conflict, PermissionDenied

RED, GREY = solid_png((255, 0, 0)), solid_png((128, 128, 128))  # accepted; sent to review
KEYS = {  # name -> (tenant, role, key name, plain key)
    "app": ("acme", "client", "app", "vr_app"),
    "ann": ("acme", "reviewer", "ann", "vr_ann"),
    "bob": ("acme", "reviewer", "bob", "vr_bob"),
    "cy": ("acme", "reviewer", "cy", "vr_cy"),
    "root": ("ops", "admin", "root", "vr_root"),
}
SECURITY = SecurityConfig(
    api_keys=[
        {"sha256": hash_key(key), "tenant": tenant, "role": role, "name": name}
        for tenant, role, name, key in KEYS.values()
    ]
)


def principal(who: str):
    return Authenticator(SECURITY).authenticate(KEYS[who][3], None, client="127.0.0.1")


def run(coroutine):
    return asyncio.run(coroutine)


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
            "drift": {"reference_size": 20, "window_size": 20, "every": 5},
            "policies": {
                "audit": {"fraction": 0.0, "shift_fraction": 0.8, "max_fraction": 0.5},
                "review": {"double_label_fraction": 1.0, "reviewer_error_limit": 0.3},
            },
        }
    )
    tier = LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir)
    service = VisionRouteService.build(config, tiers={"colour": tier})
    yield service
    service.drift.close()


def analyze(service, image: bytes, request_id: str):
    return run(service.analyze.analyze(ImageRequest(image, request_id), principal("app")))


def audits(service) -> list:
    return [item for item in service.review.queue.list_items(status=None) if item.kind == "audit"]


def test_a_drift_alarm_raises_the_audit_fraction_within_the_budget_until_it_clears(service):
    drift, audit = service.drift, service.review.policies.current.audit
    # requests the raised fraction would sample (the draw is a hash of the id): only the raise may
    raised_picks = [r for r in (f"x{i}" for i in range(40)) if is_sampled(r, 0.5)]
    before, after = raised_picks[:2], raised_picks[2:4]
    for request_id in before:
        analyze(service, RED, request_id)
    assert audits(service) == [] and not drift.audit_fraction("colour", audit).raised
    for verdict in ["confirm"] * 20 + ["reject"] * 20:  # reviewers' verdicts turn: the monitor alarms
        drift.observe_verdict("colour", verdict)
    drift.drain(30)
    assert "verdicts" in drift.alarms("colour")
    for i in range(12):
        analyze(service, RED, f"during{i}")
    sampled = audits(service)
    assert 2 <= len(sampled) <= 10  # about half: 0.8 asked, the budget allows 0.5
    assert {(item.audit_source, item.inclusion_probability) for item in sampled} == {("policy", 0.5)}
    assert all("raised from 0.0%" in item.reason and "verdicts" in item.reason for item in sampled)
    (shown,) = drift.report(audit).to_json()["audit_fractions"]
    assert (shown["task"], shown["fraction"], shown["base"], shown["raised"]) == ("colour", 0.5, 0.0, True)
    drift.reset("colour", ("verdicts",))  # the alarm clears (a new reference)
    drift.drain(30)
    for request_id in after:
        analyze(service, RED, request_id)
    assert len(audits(service)) == len(sampled)
    assert drift.report(audit).audit_fractions[0].raised is False


def claim_and_label(service, who: str, item_id: str, label: str):
    caller = principal(who)
    claim = run(service.review.claim(caller, ClaimRequest(item_id=item_id)))
    return run(
        service.review.label(
            caller, item_id, LabelRequest(lease_token=claim.lease_token, verdict="correct", label=label)
        )
    )


def test_disputes_go_to_an_admin_and_the_overruled_reviewer_is_flagged_to_admins(service):
    attach(service, SECURITY)
    items = [analyze(service, GREY, f"grey{i}").review_item_id for i in range(3)]
    for item_id in items:
        assert claim_and_label(service, "ann", item_id, "red").status == "pending"
        disputed = claim_and_label(service, "bob", item_id, "green")
        assert disputed.needs_adjudication and disputed.labels_wanted == 2
    assert run(service.review.claim(principal("bob"), ClaimRequest())).item is None
    with pytest.raises(Conflict):  # a side of the dispute
        claim_and_label(service, "bob", items[0], "green")
    with pytest.raises(PermissionDenied):  # a reviewer who is not an admin
        claim_and_label(service, "cy", items[0], "green")
    for item_id in items:
        decided = claim_and_label(service, "root", item_id, "green")
        assert decided.status == "labelled" and decided.label["label"] == "green"
    with TestClient(app) as client:
        refused = client.get("/v1/review/reviewers", headers={"x-api-key": KEYS["ann"][3]})
        assert refused.status_code == 403
        report = client.get("/v1/review/reviewers", headers={"x-api-key": KEYS["root"][3]})
        assert report.status_code == 200
    body = report.json()
    assert body["flagged"] == ["ann"] and body["limit"] == 0.3 and body["double_label_fraction"] == 1.0
    rows = {row["reviewer"]: row for row in body["reviewers"]}
    assert (rows["ann"]["labels"], rows["ann"]["double_errors"], rows["ann"]["error_rate"]) == (3, 3, 1.0)
    assert rows["ann"]["lower_bound"] > 0.3 and rows["ann"]["upper_bound"] == 1.0
    assert (rows["bob"]["double_errors"], rows["bob"]["flagged"]) == (0, False)
    with pytest.raises(PermissionDenied):
        run(service.review.reviewers(principal("bob")))


def test_the_audit_budget_caps_the_raise_and_a_fraction_above_it_is_refused():
    config = AuditConfig(fraction=0.05, shift_fraction=0.3, max_fraction=0.2)
    assert config.fraction_under_shift(False) == 0.05 and config.fraction_under_shift(True) == 0.2
    assert AuditConfig(fraction=0.1).fraction_under_shift(True) == 0.1  # no shift_fraction: no raise
    with pytest.raises(ConfigError) as error:
        parse_policy_set({"audit": {"fraction": 0.3, "max_fraction": 0.2}})
    assert error.value.field == "audit" and "max_fraction" in str(error.value)
