"""Rollouts through the service core (no Ray): shadow and canary, the sequential test deciding
from reviewers' labels, operator actions, the audit log and the refusals.

The candidates are real ONNX models: ``swapped`` answers every colour confidently and wrongly
(its weight matrix is a permutation), ``cheaper`` is the incumbent's model at half the cost.
The reviewer knows each image's true colour, so every label is a real verdict.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from router.auth.principal import Principal
from router.config import parse_app_config
from router.services import ImageRequest, VisionRouteService
from router.services.backends import LocalOnnxTier
from router.services.review_requests import ClaimRequest, LabelRequest
from tests.router.colour_model import LABELS, solid_png, write_colour_model
from visionroute.errors import Conflict, InputError, NotFound

ADMIN = Principal("ops", "admin", "alice")
COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def rollout_config(tmp_path, **rollouts):
    incumbent = write_colour_model(tmp_path / "colour.onnx")
    swapped = write_colour_model(tmp_path / "colour_swapped.onnx", np.roll(4.0 * np.eye(3), 1, axis=1))
    tier = {"decoder": "classifier", "labels": LABELS, "size_hw": 32}
    return parse_app_config(
        {
            "models_dir": str(tmp_path),
            "default_task": "colour",
            "cascades": {
                "colour": {
                    "tier": {"model": str(incumbent), **tier, "cost_units": 1.0},
                    "policy": {"version": "colour-v1", "accept_threshold": 0.9, "escalate_threshold": 0.2},
                    "candidates": {
                        "swapped": {"tier": {"model": str(swapped), **tier, "cost_units": 1.0}},
                        "cheaper": {"tier": {"model": str(incumbent), **tier, "cost_units": 0.5}},
                    },
                }
            },
            "review": {"path": str(tmp_path / "review")},
            "retrieval": {"enabled": False},
            "rollouts": {"refresh_s": 0.05, "cost_flush_s": 0.05, **rollouts},
        }
    )


def build(config) -> VisionRouteService:
    def tier(stage):
        return LocalOnnxTier(stage.model_dump(), config.models_dir)

    cascade = config.cascades["colour"]
    return VisionRouteService.build(
        config,
        tiers={"colour": tier(cascade.tier)},
        candidate_tiers={"colour": {name: tier(c.tier) for name, c in cascade.candidates.items()}},
    )


@pytest.fixture
def service(tmp_path) -> VisionRouteService:
    return build(rollout_config(tmp_path))


def run(coroutine):
    return asyncio.run(coroutine)


async def traffic(service, n: int, prefix: str, tenants: int = 1) -> list[dict]:
    """``n`` requests of known colours; returns (truth, response) pairs. Waits for shadow runs."""
    rng = np.random.default_rng(len(prefix) + n)
    answers = []
    for i in range(n):
        truth = LABELS[i % 3]
        colour = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[truth])
        analysis = await service.analyze.analyze(
            ImageRequest(solid_png(colour), f"{prefix}-{i}", tenant=f"t{i % tenants}"), None
        )
        answers.append({"truth": truth, "analysis": analysis})
    await service.rollouts.drain()
    return answers


async def review_everything(service, truth_of: dict[str, str]) -> int:
    """A reviewer who knows the truth labels every pending audit and shadow item."""
    labelled = 0
    while True:
        claim = await service.review.claim(None, ClaimRequest(reviewer="rita"))
        item = claim.item
        if item is None:
            return labelled
        truth = truth_of[item.request_id]
        proposed = item.proposed[0]["label"] if item.proposed else None
        verdict = "confirm" if proposed == truth else "correct"
        await service.review.label(
            None,
            item.id,
            LabelRequest(
                reviewer="rita",
                lease_token=claim.lease_token,
                verdict=verdict,
                label=None if verdict == "confirm" else truth,
            ),
        )
        labelled += 1


def truths(answers) -> dict[str, str]:
    return {a["analysis"].trace.request_id: a["truth"] for a in answers}


def steps(analysis, stage):
    return [s for s in analysis.trace if s.stage == stage]


def test_a_worse_candidate_in_shadow_is_never_served_and_is_rolled_back_by_the_test(service):
    async def scenario():
        started = await service.rollouts.start(
            ADMIN,
            {
                "task": "colour",
                "candidate": "swapped",
                "mode": "shadow",
                "fraction": 1.0,
                "audit_fraction": 1.0,
                "alpha": 0.1,
                "delta": 0.1,
                "reason": "try the swapped model",
            },
        )
        assert started.status == "running" and started.to_json()["serving"].startswith("incumbent")
        answers = await traffic(service, 12, "shadow")
        for a in answers:  # the incumbent served every request; the trace names the rollout and arm
            analysis = a["analysis"]
            assert analysis.detections.to_dicts()[0]["label"] == a["truth"]
            (step,) = steps(analysis, "rollout")
            assert step.details["arm"] == "incumbent" and step.details["shadow"] is True
            assert step.details["rollout_id"] == started.id
        status = (await service.rollouts.status(started.id)).to_json()
        assert status["shadow"]["requests"] == 12 and status["shadow"]["same_decision"] == 12  # both accept
        assert status["shadow"]["candidate_accepts"] == 12
        await review_everything(service, truths(answers))
        return started.id

    rollout_id = run(scenario())
    status = run(service.rollouts.status(rollout_id)).to_json()
    assert status["status"] == "rolled_back", status["test"]
    assert (
        status["test"]["arms"]["candidate"]["errors"] == status["test"]["arms"]["candidate"]["labelled"] > 0
    )
    assert "shown above" in status["test"]["reason"]
    actions = [(e["action"], e["actor"]) for e in status["events"]]
    assert actions == [("start", "alice@ops"), ("rollback", "sequential-test")]
    assert status["events"][1]["evidence"]["arms"]["candidate"]["errors"] > 0
    # rolled back: no rollout step any more, and a new rollout may start for the task
    after = run(traffic(service, 1, "after"))[0]["analysis"]
    assert not steps(after, "rollout")


def test_an_equal_cheaper_candidate_in_canary_serves_its_share_and_is_promoted(service):
    async def scenario():
        started = await service.rollouts.start(
            ADMIN,
            {
                "task": "colour",
                "candidate": "cheaper",
                "mode": "canary",
                "fraction": 0.6,
                "sticky_by": "request",
                "audit_fraction": 1.0,
                "alpha": 0.3,
                "delta": 0.2,
                "min_cost_observations": 5,
            },
        )
        answers: list = []
        while len(answers) < 120:  # the split hashes a random rollout id: serve until the candidate has 24
            answers += await traffic(service, 10, f"canary{len(answers)}")
            arms = [steps(a["analysis"], "rollout")[0].details["arm"] for a in answers]
            if arms.count("candidate") >= 24:
                break
        assert 0 < arms.count("incumbent") < len(answers)  # both arms served
        for a, arm in zip(answers, arms):
            served_cost = sum(s.cost_units for s in a["analysis"].trace if s.stage != "review_queue:audit")
            assert served_cost == (0.5 if arm == "candidate" else 1.0)
            assert a["analysis"].detections.to_dicts()[0]["label"] == a["truth"]
        # the same request id lands on the same arm again (sticky)
        again = await service.analyze.analyze(ImageRequest(solid_png(COLOURS["red"]), "canary0-0"), None)
        assert steps(again, "rollout")[0].details["arm"] == arms[0]
        await review_everything(service, truths(answers))
        await service.rollouts.flush_costs()
        return started.id

    rollout_id = run(scenario())
    status = run(service.rollouts.status(rollout_id)).to_json()
    assert status["status"] == "promoted", status["test"]
    assert status["test"]["arms"]["candidate"]["errors"] == 0
    assert status["test"]["arms"]["candidate"]["upper"] < 0.3
    assert status["events"][-1]["actor"] == "sequential-test" and status["events"][-1]["action"] == "promote"
    # promoted: every request now goes to the candidate (no restart), until the rollout is finished
    later = run(traffic(service, 6, "later"))
    assert all(steps(a["analysis"], "rollout")[0].details["arm"] == "candidate" for a in later)
    metrics = run(service.operations.metrics_text()).decode()
    assert (
        f'visionroute_rollout_in_effect{{candidate="cheaper",mode="canary",rollout="{rollout_id}"' in metrics
    )
    assert 'status="promoted"' in metrics and "visionroute_rollout_risk_bound" in metrics
    service.drift.drain()  # the promotion restarted the confidence reference, fed by the candidate now
    (confidence,) = [r for r in service.drift.report().to_json()["monitors"] if r["monitor"] == "confidence"]
    assert 0 < confidence["observed"] <= 6
    finished = run(
        service.rollouts.decide(ADMIN, rollout_id, "finish", {"reason": "deployed as incumbent"})
    ).to_json()
    assert finished["status"] == "finished"
    assert not steps(run(traffic(service, 1, "done"))[0]["analysis"], "rollout")


def test_labels_count_once_and_the_evidence_is_shared_by_replicas(tmp_path):
    config = rollout_config(tmp_path)
    first, second = build(config), build(config)  # two replicas on one state store

    async def scenario():
        started = await first.rollouts.start(
            ADMIN,
            {
                "task": "colour",
                "candidate": "cheaper",
                "mode": "canary",
                "fraction": 1.0,
                "sticky_by": "tenant",
                "audit_fraction": 1.0,
            },
        )
        served = await traffic(second, 3, "replica")  # the other replica sees the rollout
        assert all(steps(a["analysis"], "rollout")[0].details["arm"] == "candidate" for a in served)
        claim = await first.review.claim(None, ClaimRequest(reviewer="rita"))
        label = LabelRequest(reviewer="rita", lease_token=claim.lease_token, verdict="confirm")
        await first.review.label(None, claim.item.id, label)
        await second.review.label(None, claim.item.id, label)  # a retry through another replica
        return started.id

    rollout_id = run(scenario())
    assert run(second.rollouts.status(rollout_id)).to_json()["test"]["arms"]["candidate"]["labelled"] == 1


def test_operators_promote_and_roll_back_by_hand_with_an_audit_trail(service):
    started = run(service.rollouts.start(ADMIN, {"task": "colour", "candidate": "cheaper", "mode": "canary"}))
    promoted = run(service.rollouts.decide(ADMIN, started.id, "promote", {"reason": "looks fine"})).to_json()
    assert promoted["status"] == "promoted"
    with pytest.raises(Conflict) as refused:
        run(service.rollouts.decide(ADMIN, started.id, "promote", None))
    assert refused.value.field == "status"
    rolled = run(service.rollouts.decide(None, started.id, "rollback", None)).to_json()
    assert rolled["status"] == "rolled_back"
    assert [(e["action"], e["actor"], e["reason"]) for e in rolled["events"]] == [
        ("start", "alice@ops", "started"),
        ("promote", "alice@ops", "looks fine"),
        ("rollback", "local-operator (auth off)", "rollback by an operator"),
    ]


def test_a_candidate_policy_set_is_served_to_the_canary_share(service):
    policy = {
        "version": "policies-v2",
        "thresholds": {
            "colour": {"version": "colour-v2", "accept_threshold": 0.99999, "escalate_threshold": 0.2}
        },
    }
    run(
        service.rollouts.start(ADMIN, {"task": "colour", "policy": policy, "mode": "canary", "fraction": 1.0})
    )
    analysis = run(traffic(service, 1, "policy"))[0]["analysis"]
    assert analysis.policy_version == "policies-v2"
    assert steps(analysis, "rollout")[0].details["candidate_policy_version"] == "policies-v2"
    assert analysis.decision.value == "review"  # the stricter candidate threshold sent it to a human


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"task": "nope", "candidate": "cheaper"}, "task"),
        ({"task": "colour", "candidate": "unknown"}, "candidate"),
        ({"task": "colour", "candidate": "cheaper", "fraction": 0}, "fraction"),
        ({"task": "colour", "candidate": "cheaper", "fraction": 1.5}, "fraction"),
        ({"task": "colour", "candidate": "cheaper", "audit_fraction": -0.1}, "audit_fraction"),
        ({"task": "colour", "candidate": "cheaper", "mode": "blue-green"}, "mode"),
        ({"task": "colour"}, "candidate"),  # neither a candidate nor a policy
        ({"task": "colour", "candidate": "cheaper", "colour": 1}, "colour"),
        ({"task": "colour", "policy": {"version": "v9", "budgets": "many"}}, "policy.budgets"),
        ({"task": "colour", "candidate": "cheaper", "alpha": 2}, "alpha"),
        ([1, 2], "body"),
    ],
)
def test_bad_rollouts_are_refused_with_the_field_and_the_incumbent_keeps_serving(service, body, field):
    with pytest.raises(InputError) as refused:
        run(service.rollouts.start(ADMIN, body))
    assert refused.value.field == field, refused.value.reason
    assert run(service.rollouts.list()).rollouts == ()
    assert not steps(run(traffic(service, 1, "still"))[0]["analysis"], "rollout")


def test_a_second_rollout_while_one_runs_is_refused(service):
    run(service.rollouts.start(ADMIN, {"task": "colour", "candidate": "cheaper"}))
    with pytest.raises(Conflict) as refused:
        run(service.rollouts.start(ADMIN, {"task": "colour", "candidate": "swapped"}))
    assert refused.value.field == "task" and "already running" in refused.value.reason
    with pytest.raises(NotFound):
        run(service.rollouts.status("ro_missing"))
