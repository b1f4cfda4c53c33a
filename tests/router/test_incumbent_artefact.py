"""Which promotions make a calibration artefact the task's incumbent (service core, no Ray): an
artefact alone at its promotion, an operator's too; an artefact beside a model only when the
operator finishes the rollout after the deploy, so rolling it back leaves the incumbent as it was."""

from __future__ import annotations

import asyncio

from tests.router.test_rollouts import ADMIN, build, rollout_config, steps, traffic

THRESHOLDS = {"version": "colour-v1+prod-0123456789ab", "accept_threshold": 0.5, "escalate_threshold": 0.2}


def test_only_a_finished_or_an_artefact_only_promotion_makes_the_incumbent(tmp_path):
    service = build(rollout_config(tmp_path))
    rollouts = service.rollouts
    body = {"kind": "production-recalibration", "task": "colour", "tenant": None, "thresholds": THRESHOLDS}
    sha = rollouts.artefacts.put({**body, "version": THRESHOLDS["version"]}, actor="recalibration rc_test")

    def decide(rollout_id: str, action: str) -> str:
        return asyncio.run(rollouts.decide(ADMIN, rollout_id, action, None)).to_json()["status"]

    def start(**extra) -> str:
        started = asyncio.run(rollouts.start(ADMIN, {"task": "colour", "artefact": sha, **extra}))
        return started.to_json()["id"]

    mixed = start(candidate="cheaper", mode="canary", fraction=1.0)
    assert decide(mixed, "promote") == "promoted" and rollouts.artefacts.incumbents() == {}
    assert decide(mixed, "rollback") == "rolled_back" and rollouts.artefacts.incumbents() == {}
    mixed = start(candidate="cheaper", mode="canary", fraction=1.0)
    decide(mixed, "promote")
    assert decide(mixed, "finish") == "finished"  # the operator deployed the model: now the incumbent
    assert rollouts.artefacts.incumbents()["colour"]["rollout_id"] == mixed
    alone = start()
    assert decide(alone, "promote") == "finished"  # an operator's promotion of an artefact alone
    assert rollouts.artefacts.incumbents()["colour"]["rollout_id"] == alone
    (answer,) = asyncio.run(traffic(service, 1, "after"))
    (thresholds,) = steps(answer["analysis"], "policy:thresholds")
    assert thresholds.policy_version == THRESHOLDS["version"] and not steps(answer["analysis"], "rollout")
