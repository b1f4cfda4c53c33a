"""A running rollout's evidence is claimed in a random order, not worst first (issue 23).

The review queue serves the least confident answers first. A rollout's audit and shadow items are
its sequential test's labels, and the test's confidence sequences assume labels that arrive in no
order related to their error: claimed worst first, an arm's first labels are its likeliest errors
(one run rolled back a candidate that met alpha after its first 9 labels). So each such item gets
a random key at enqueue as its claim priority (router/services/rollouts.py ``queue_priority``);
every other item keeps its value. docs/rollouts.md says why that is sound.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from scipy.stats import kendalltau

from policies.costs import review_value
from router.services import ImageRequest
from router.services.review_requests import ClaimRequest
from router.services.rollouts import ArmChoice, queue_priority
from tests.router.colour_model import solid_png
from tests.router.test_rollouts import ADMIN, build, rollout_config, run


def config_keeping_faces(tmp_path):
    """The rollout tests' colour service with no face detector to load (~30 s cold on a busy machine)."""
    config = rollout_config(tmp_path)
    policies = config.policies.model_copy(
        update={"privacy": config.policies.privacy.model_copy(update={"faces": "keep", "text": "keep"})}
    )
    return config.model_copy(update={"policies": policies})


def test_a_rollouts_audits_are_claimed_in_a_random_order_and_reviews_by_their_value(tmp_path):
    service = build(config_keeping_faces(tmp_path))
    canary = {"task": "colour", "candidate": "cheaper", "mode": "canary", "fraction": 1.0}
    run(service.rollouts.start(ADMIN, {**canary, "sticky_by": "request", "audit_fraction": 1.0}))
    error_cost = service.rollouts.policies.current.review.error_cost("colour")

    async def traffic():
        # reds from sure to unsure: accepts (all audited) across the accept region, then reviews
        reds = np.linspace(255, 100, 40).astype(int)
        requests = [ImageRequest(solid_png((int(red), 40, 40)), f"r-{i}") for i, red in enumerate(reds)]
        await asyncio.gather(*(service.analyze.analyze(request, None) for request in requests))
        await service.rollouts.drain()
        claimed = []
        while (claim := await service.review.claim(None, ClaimRequest(reviewer="rita"))).item is not None:
            claimed.append(claim.item)
        return claimed

    claimed = run(traffic())
    audits = [item for item in claimed if item.kind == "audit"]
    reviews = [item for item in claimed if item.kind == "review"]
    assert len(audits) >= 20 and reviews, (len(audits), len(reviews))
    confidence = [item.proposed[0]["confidence"] for item in audits]
    assert len(set(confidence)) == len(confidence)  # a real spread of accepted answers
    # by value the audits would come least confident first (tau = 1); a random key has tau near 0
    # (standard deviation about 0.15 here: |tau| < 0.75 fails once in about 10^6 runs)
    tau = kendalltau(np.arange(len(audits)), confidence).statistic
    assert abs(tau) < 0.75, tau
    assert all(0.0 <= item.priority < error_cost for item in audits)
    for item in reviews:  # the rest of the queue keeps its value order
        assert item.priority == pytest.approx(
            review_value(item.proposed[0]["confidence"], error_cost), abs=1e-5
        )


def test_only_a_running_rollouts_audit_and_shadow_items_get_the_random_key(tmp_path):
    service = build(config_keeping_faces(tmp_path))
    rollout = run(service.rollouts.start(ADMIN, {"task": "colour", "candidate": "cheaper"}))
    running = service.rollouts.store.get(rollout.to_json()["id"])
    choice = ArmChoice(running, "incumbent", shadow=True)
    key = lambda: 0.25  # noqa: E731
    for kind in ("audit", "shadow"):
        assert queue_priority(choice, kind, 0.99, 4.0, draw=key) == 1.0  # the key, not the score
        assert queue_priority(choice, kind, 0.6, 4.0, draw=key) == 1.0
    assert queue_priority(choice, "review", 0.6, 4.0, draw=key) == review_value(0.6, 4.0)
    assert queue_priority(None, "audit", 0.99, 4.0, draw=key) == review_value(0.99, 4.0)
    decided = service.rollouts.store.decide(running.id, "rollback", actor="test", reason="stop")
    stopped = ArmChoice(decided, "incumbent", shadow=False)
    assert queue_priority(stopped, "audit", 0.99, 4.0, draw=key) == review_value(0.99, 4.0)
