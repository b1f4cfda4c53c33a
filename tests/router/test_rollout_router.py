"""A refit learned router served through the rollout path (issue 23), through the service core
(no Ray): production labels -> the recalibration job refits the router and proposes the artefact
as a shadow rollout -> the shadow runs score with the refit router -> the sequential test promotes
it -> it becomes the incumbent and a later request's ``router`` step carries its sha256.

Also: a refit router that does not fit its tier is refused naming the field, a feature failure on
a candidate arm falls back to that arm's own confidence-only plan, and a candidate arm without a
router is left to its thresholds as before.
"""

from __future__ import annotations

import asyncio
import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cascades.arm_router import arm_router
from cascades.learned_router import RouterArtefact
from cascades.rollout_router import rollout_router
from cascades.router_stage import RouterScoreStage, ServedRouter
from router.config import parse_app_config
from router.services import ImageRequest, VisionRouteService
from router.services.backends import LocalOnnxTier
from router.services.recalibration import RecalibrationRequest, RecalibrationService
from router.services.review_requests import ClaimRequest, LabelRequest
from tests.router.colour_model import LABELS, write_colour_model
from tests.router.test_router_stage import fitted_artefact
from visionroute.errors import ConfigError, InputError
from visionroute.records import Analysis, Detections, Trace


def routed_config(tmp_path, router_path, candidates: dict | None = None):
    model = write_colour_model(tmp_path / "colour.onnx")
    tier = {"model": str(model), "decoder": "classifier", "labels": LABELS, "size_hw": 32}
    return parse_app_config(
        {
            "models_dir": str(tmp_path),
            "default_task": "colour",
            "cascades": {
                "colour": {
                    "tier": tier,
                    "policy": {"version": "colour-v1", "accept_threshold": 0.9, "escalate_threshold": 0.2},
                    # a fixed price: both arms' costs independent of timing (a measured one made the
                    # rollout's cost comparison a coin toss on a busy machine)
                    "router": {"path": str(router_path), "cost_units": 0.1},
                    "candidates": {name: {"tier": {**tier, **c}} for name, c in (candidates or {}).items()},
                }
            },
            "review": {"path": str(tmp_path / "review")},
            "retrieval": {"enabled": False},
            "rollouts": {"refresh_s": 0.05, "cost_flush_s": 0.05},
            # no face detector to load (its first load took ~30 s on a busy machine): no images of people
            "policies": {"privacy": {"faces": "keep", "text": "keep"}},
        }
    )


def service_for(config) -> VisionRouteService:
    cascade = config.cascades["colour"]

    def tier(stage):
        return LocalOnnxTier(stage.model_dump(), config.models_dir)

    candidates = {name: tier(c.tier) for name, c in cascade.candidates.items()}
    return VisionRouteService.build(
        config, tiers={"colour": tier(cascade.tier)}, candidate_tiers={"colour": candidates}
    )


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


async def labelled_traffic(service, n: int, prefix: str, seed: int) -> list[Analysis]:
    """``n`` noisy colours; the truth disagrees with the colour model on its unsure answers
    (top-1 below 0.55, about 12% of them), so a router can learn when it is right, and even a plan
    that accepts everything is wrong well below alpha 0.4: the sequential test can show it in a
    few dozen labels (a plan certified at alpha accepts errors up to it, which no test could
    tell from alpha). Every pending audit and shadow item is labelled."""
    rng = np.random.default_rng(seed)
    truth_of, served = {}, []
    for i in range(n):
        image = np.clip(rng.integers(0, 256, 3)[None, None, :] + rng.normal(0, 8, (48, 48, 3)), 0, 255)
        request_id = f"{prefix}-{i}"
        analysis = await service.analyze.analyze(ImageRequest(png(image.astype(np.uint8)), request_id), None)
        answer = analysis.detections.labels[0] if len(analysis.detections) else LABELS[0]
        confidence = float(analysis.detections.confidence[0]) if len(analysis.detections) else 0.0
        flip = confidence < 0.55
        truth_of[request_id] = LABELS[(LABELS.index(answer) + 1) % 3] if flip else answer
        served.append(analysis)
    await service.rollouts.drain()
    await review_in_arrival_order(service, truth_of)
    await service.rollouts.flush_costs()
    return served


async def review_in_arrival_order(service, truth_of: dict[str, str]) -> None:
    """A reviewer who knows the truth labels every pending item in the order it arrived: the same
    order on every run (the queue claims a rollout's evidence by a random key drawn at enqueue,
    router/services/rollouts.py ``queue_priority``, and everything else least confident first)."""
    for item in list(service.review.queue.iter_all()):
        if item.status != "pending":
            continue
        claim = await service.review.claim(None, ClaimRequest(reviewer="rita", item_id=item.id))
        truth = truth_of[item.request_id]
        proposed = item.proposed[0]["label"] if item.proposed else None
        verdict = "confirm" if proposed == truth else "correct"
        label = None if verdict == "confirm" else truth
        await service.review.label(
            None,
            item.id,
            LabelRequest(reviewer="rita", lease_token=claim.lease_token, verdict=verdict, label=label),
        )


def step_of(analysis_or_trace, stage: str):
    steps = analysis_or_trace.trace if isinstance(analysis_or_trace, Analysis) else analysis_or_trace["steps"]
    found = [s for s in steps if (s.stage if hasattr(s, "stage") else s["stage"]) == stage]
    return found[0] if found else None


@pytest.mark.slow
def test_a_refit_router_is_proposed_shadowed_promoted_and_later_traces_carry_its_version(tmp_path):
    incumbent = fitted_artefact(learned=(0.9999, 0.0))  # accepts nothing: every request is reviewed
    service = service_for(routed_config(tmp_path, incumbent.save(tmp_path / "router.json")))
    recalibration = RecalibrationService.of(service)

    async def scenario():
        await labelled_traffic(service, 120, "day1", seed=11)
        request = RecalibrationRequest(
            task="colour",
            alpha=0.4,
            delta=0.2,
            shadow_fraction=1.0,
            audit_fraction=1.0,
            min_cost_observations=5,
        )
        job = await asyncio.to_thread(recalibration.job.run, request, "alice@ops")
        assert job["status"] == "succeeded", job["reason"]
        refit_sha, rollout_id = job["details"]["router"], job["rollout_id"]
        assert rollout_id is not None and refit_sha[:12] in job["reason"]
        report = job["details"]["router_refit"]
        # every stored image gave back the logged neighbour features: the served embedding
        assert report["no_router_score"] == {"fallback": 0, "image_unusable": 0}
        assert report["left_out"]["other_feature_version"] == 0
        body = service.rollouts.artefacts.get(job["artefact_sha256"])
        refit = RouterArtefact.from_document(body["router"], class_names=LABELS)
        assert refit.sha256 == refit_sha != incumbent.sha256
        assert len(refit.index) == len(incumbent.index) + report["index_rows"]["added"] > len(incumbent.index)
        assert report["index_rows"]["added"] <= report["fit_items"]
        assert refit.plans.learned.feasible and refit.plans.alpha == 0.4
        assert body["certificate"]["n"] <= report["certification_items"]
        # the thresholds (used only with the router off) stay the incumbent's, under a new version
        assert body["thresholds"]["accept_threshold"] == 0.9 and "+prod-" in body["version"]
        # the tier it was certified on, so that the promoted artefact can stand in for it
        tier = service.config.cascades["colour"].tier
        assert body["calibrator"]["calibration"] is None and body["calibrator"]["model"] == str(tier.model)
        started = (await service.rollouts.status(rollout_id)).to_json()
        assert started["mode"] == "shadow" and started["artefact"] == job["artefact_sha256"]
        service.rollouts._read_at = 0.0
        # shadow: the incumbent (and its router) serves; the candidate's run scores with the refit router
        shadowed = await labelled_traffic(service, 48, "day2", seed=12)
        for analysis in shadowed:
            assert step_of(analysis, "rollout").details["arm"] == "incumbent"
            assert step_of(analysis, "router").details["version"] == incumbent.sha256
        shadow_items = [i for i in service.review.queue.iter_all() if i.kind == "shadow"]
        assert shadow_items, "the refit router's learned plan accepted nothing in shadow"
        for item in shadow_items:
            router_step = step_of(item.trace, "router")
            assert router_step["details"]["version"] == refit_sha and router_step["details"]["applied"]
        return job, refit_sha, rollout_id

    job, refit_sha, rollout_id = asyncio.run(scenario())
    status = asyncio.run(service.rollouts.status(rollout_id)).to_json()
    # promoted by the test's evidence, then the artefact (and its router) became the incumbent
    assert status["status"] == "finished", status["test"]
    assert [(e["action"], e["actor"]) for e in status["events"]][1:] == [
        ("promote", "sequential-test"),
        ("finish", "sequential-test"),
    ]
    assert service.rollouts.artefacts.incumbents()["colour"]["sha256"] == job["artefact_sha256"]

    async def later():
        service.rollouts._read_at = 0.0
        return await labelled_traffic(service, 3, "day3", seed=13)

    for analysis in asyncio.run(later()):  # a later request's trace carries the refit router
        assert step_of(analysis, "rollout") is None
        assert step_of(analysis, "router").details["version"] == refit_sha
        assert step_of(analysis, "policy:thresholds").details["router_version"] == refit_sha
    body = service.rollouts.artefacts.get(job["artefact_sha256"])
    # a stored artefact whose router does not fit the tier is refused at the rollout's start
    misfit = {**body, "router": {**body["router"], "class_names": ["cyan", "magenta", "yellow"]}}
    misfit_sha = service.rollouts.artefacts.put(misfit, actor="test")
    with pytest.raises(InputError) as caught:
        asyncio.run(service.rollouts.start(None, {"task": "colour", "artefact": misfit_sha}))
    assert caught.value.field == "artefact.router.class_names"
    # canary: the candidate arm serves with its artefact's router (here the first router again)
    back = {**body, "router": {**incumbent.to_document(), "sha256": incumbent.sha256}}
    back_sha = service.rollouts.artefacts.put(back, actor="test")
    canary = {
        "task": "colour",
        "artefact": back_sha,
        "mode": "canary",
        "fraction": 1.0,
        "sticky_by": "request",
    }
    canary_id = asyncio.run(service.rollouts.start(None, canary)).to_json()["id"]

    async def canary_traffic(prefix: str):
        service.rollouts._read_at = 0.0
        return await labelled_traffic(service, 2, prefix, seed=14)

    for analysis in asyncio.run(canary_traffic("day4")):
        assert step_of(analysis, "rollout").details["arm"] == "candidate"
        assert step_of(analysis, "router").details["version"] == incumbent.sha256
    # an operator stops it: the incumbent (the promoted refit router) serves again, audited
    stopped = asyncio.run(service.rollouts.decide(None, canary_id, "rollback", {"reason": "stop"})).to_json()
    assert stopped["status"] == "rolled_back" and stopped["events"][-1]["reason"] == "stop"
    for analysis in asyncio.run(canary_traffic("day5")):
        assert step_of(analysis, "rollout") is None
        assert step_of(analysis, "router").details["version"] == refit_sha


# -- a refit router must fit its tier ----------------------------------------------------------


@pytest.fixture(scope="module")
def configured() -> ServedRouter:
    return ServedRouter.from_artefact(fitted_artefact(), cost_units=0.25)


def document_of(artefact) -> dict:
    return {**artefact.to_document(), "sha256": artefact.sha256}


def test_a_fitting_refit_router_is_served_with_the_configured_price(configured):
    refit = fitted_artefact(learned=(0.6, 0.1))
    served = rollout_router(document_of(refit), configured)
    assert served.sha256 == refit.sha256 != configured.sha256 and served.cost_units == 0.25


def test_a_refit_router_for_other_labels_or_features_or_altered_is_refused_naming_the_field(configured):
    other_labels = fitted_artefact(class_names=("cyan", "magenta", "yellow"))
    with pytest.raises(ConfigError) as caught:
        rollout_router(document_of(other_labels), configured)
    assert caught.value.field == "artefact.router.class_names"
    document = document_of(fitted_artefact())
    document["features"] = {**document["features"], "embedding_version": 1}
    with pytest.raises(ConfigError) as caught:
        rollout_router(document, configured)
    assert caught.value.field.startswith("artefact.router.")
    altered = {**document_of(fitted_artefact()), "sha256": "0" * 64}
    with pytest.raises(ConfigError) as caught:
        rollout_router(altered, configured)
    assert caught.value.field == "artefact.router.sha256"
    with pytest.raises(ConfigError) as caught:
        rollout_router("not a router", configured)
    assert caught.value.field == "artefact.router"


# -- which router scores an arm -----------------------------------------------------------------


def test_an_arm_scores_with_its_own_router_and_a_candidate_without_one_stands_aside(configured):
    candidate = SimpleNamespace(arm="candidate")
    refit = ServedRouter.from_artefact(fitted_artefact(learned=(0.6, 0.1)))
    assert arm_router(None, configured) == (configured, False)
    assert arm_router(SimpleNamespace(router=None, choice=None), configured) == (configured, False)
    assert arm_router(SimpleNamespace(router=refit, choice=candidate), configured) == (refit, False)
    assert arm_router(SimpleNamespace(router=None, choice=candidate), configured) == (configured, True)


def test_a_feature_failure_on_a_candidate_arm_falls_back_to_that_arms_certified_thresholds(configured):
    refit = ServedRouter.from_artefact(fitted_artefact(learned=(0.6, 0.1), fallback=(0.97, 0.4)))
    analysis = Analysis(
        image_rgb=np.zeros((8, 8, 3), np.uint8), image_sha256="0" * 64, task="colour", trace=Trace("r-1")
    )
    # the answer's labels are not the router's: the features cannot be computed
    analysis.detections = Detections.from_class_probabilities(
        np.array([0.7, 0.2, 0.1]), ["a", "b", "c"], width=8, height=8
    )
    state = SimpleNamespace(
        analysis=analysis,
        cheap_tier_failed=False,
        route=None,
        arm=SimpleNamespace(router=refit, choice=SimpleNamespace(arm="candidate")),
    )
    asyncio.run(RouterScoreStage({"colour": configured}).run(state))
    assert state.route.fallback and state.route.router_version == refit.sha256
    assert state.route.thresholds == refit.artefact.plans.fallback
    step = step_of(analysis, "router")
    assert step.details["fallback"] and step.details["version"] == refit.sha256 and step.error


# -- an adopted refit router, and a router beside a candidate tier ------------------------------


def stored_router_artefact(service, router: RouterArtefact, suffix: str) -> str:
    """A stored calibration artefact of the routed task carrying ``router``, as a recalibration
    job leaves one (the configured thresholds under a production version, the tier it was
    certified on); returns its sha256."""
    rollouts = service.rollouts
    configured = rollouts.policies.thresholds(rollouts.policies.current, "colour")
    version = f"{configured.version}+prod-{suffix}"
    body = {
        "kind": "production-recalibration",
        "task": "colour",
        "tenant": None,
        "version": version,
        "thresholds": configured.model_copy(update={"version": version}).model_dump(mode="json"),
        "calibrator": {
            "kind": "incumbent",
            "calibration": None,
            "model": str(service.config.cascades["colour"].tier.model),
        },
        "router": {**router.to_document(), "sha256": router.sha256},
    }
    return rollouts.artefacts.put(body, actor="test")


def test_the_next_job_refits_the_adopted_router_from_the_traces_of_both_versions(tmp_path):
    configured = fitted_artefact(learned=(0.9999, 0.0))  # both routers review everything
    adopted = fitted_artefact(learned=(0.9999, 0.0), fallback=(0.96, 0.5))
    service = service_for(routed_config(tmp_path, configured.save(tmp_path / "router.json")))
    recalibration = RecalibrationService.of(service)

    async def traffic():
        before = await labelled_traffic(service, 60, "before", seed=11)
        sha = stored_router_artefact(service, adopted, "adopted")
        service.rollouts.artefacts.adopt("colour", sha, rollout_id="ro_earlier", started_at=0.0, actor="test")
        service.rollouts._read_at = 0.0
        after = await labelled_traffic(service, 60, "after", seed=12)
        return sha, before, after

    adopted_sha, before, after = asyncio.run(traffic())
    assert {step_of(a, "router").details["version"] for a in before} == {configured.sha256}
    assert {step_of(a, "router").details["version"] for a in after} == {adopted.sha256}
    request = RecalibrationRequest(task="colour", alpha=0.4, delta=0.2, propose=False)
    job = recalibration.job.run(request, "alice@ops")
    assert job["status"] == "succeeded", job["reason"]
    body = service.rollouts.artefacts.get(job["artefact_sha256"])
    report = body["router_refit"]
    # refit from the adopted router (not the configured one), on the items of both versions
    assert body["parent_artefact"] == adopted_sha and report["parent_router"] == adopted.sha256
    assert report["items"] == 120 and report["left_out"]["other_feature_version"] == 0
    assert job["details"]["router"] not in (configured.sha256, adopted.sha256)


def test_an_artefact_carrying_a_router_is_refused_beside_a_candidate_tier(tmp_path):
    configured = fitted_artefact()
    config = routed_config(
        tmp_path, configured.save(tmp_path / "router.json"), {"cheaper": {"cost_units": 0.5}}
    )
    service = service_for(config)
    sha = stored_router_artefact(service, fitted_artefact(learned=(0.6, 0.1)), "refit")
    with pytest.raises(InputError) as refused:
        asyncio.run(service.rollouts.start(None, {"task": "colour", "candidate": "cheaper", "artefact": sha}))
    assert refused.value.field == "artefact" and "candidate tier 'cheaper'" in refused.value.reason
    assert asyncio.run(service.rollouts.list("colour")).rollouts == ()
    # either alone is a rollout
    alone = asyncio.run(service.rollouts.start(None, {"task": "colour", "artefact": sha})).to_json()
    assert alone["artefact"] == sha and alone["candidate"] is None
