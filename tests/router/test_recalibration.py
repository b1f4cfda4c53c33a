"""Recalibration from production labels through the service core (no Ray): reviewers' labels ->
a new certified artefact in the shared store -> a shadow rollout naming it by sha256 -> the
sequential test promotes it -> a later request's trace carries the artefact's version.

The incumbent's accept threshold (0.9999) is above every answer of the colour model, so it accepts
nothing and every request goes to review (inclusion probability 1); the labels show the model is
right, so the recertified threshold is lower and the candidate accepts what the incumbent did not.
"""

from __future__ import annotations

import asyncio

import pytest

from policies.artefact_store import ArtefactStore
from router.services.recalibration import RecalibrationRequest, RecalibrationService, Refused, build_artefact
from tests.router.test_rollouts import ADMIN, build, review_everything, rollout_config, steps, traffic, truths
from visionroute.errors import InputError

JOB = {
    "task": "colour",
    "alpha": 0.2,
    "delta": 0.2,
    "shadow_fraction": 1.0,
    "audit_fraction": 1.0,
    "min_cost_observations": 5,
}


def strict_config(tmp_path):
    config = rollout_config(tmp_path)
    cascade = config.cascades["colour"]
    strict = cascade.policy.model_copy(update={"accept_threshold": 0.9999, "escalate_threshold": 0.5})
    return config.model_copy(
        update={"cascades": {"colour": cascade.model_copy(update={"policy": strict, "candidates": {}})}}
    )


@pytest.fixture
def service(tmp_path):
    return build(strict_config(tmp_path))


def run(coroutine):
    return asyncio.run(coroutine)


async def labelled_traffic(service, n: int, prefix: str) -> list[dict]:
    answers = await traffic(service, n, prefix)
    await review_everything(service, truths(answers))
    return answers


async def finished_job(recalibration: RecalibrationService, job: dict) -> dict:
    await recalibration.drain()
    return await recalibration.status(job["id"])


def job_of(recalibration: RecalibrationService, body: dict) -> dict:
    """Start a job and wait for its end, on one event loop (the job runs off the request)."""

    async def started_and_finished():
        return await finished_job(recalibration, await recalibration.start("alice@ops", body))

    return run(started_and_finished())


def test_labels_become_an_artefact_that_shadows_is_promoted_and_serves_later_requests(service):
    recalibration = RecalibrationService.of(service)

    async def scenario():
        answers = await labelled_traffic(service, 50, "day1")
        assert all(a["analysis"].decision.value == "review" for a in answers)  # the incumbent accepts nothing
        job = await recalibration.start("alice@ops", JOB)
        assert job["status"] == "running"
        job = await finished_job(recalibration, job)
        assert job["status"] == "succeeded", job["reason"]
        sha, rollout_id = job["artefact_sha256"], job["rollout_id"]
        artefact = service.rollouts.artefacts.get(sha)  # sha256-checked
        assert artefact["task"] == "colour" and artefact["labels"]["sampled_items"] == 50
        assert artefact["certificate"]["risk_upper_bound"] <= 0.2 + 1e-9
        assert artefact["thresholds"]["accept_threshold"] < 0.9999
        # the calibrator is refit from the same labels, weighted by 1 / inclusion probability, and said so
        refit = artefact["calibrator"]["production_refit"]
        assert refit["labelled"] == 50 and refit["served"] is False and 0 <= refit["ece_refit"] <= 1
        assert job["details"]["calibrator"].startswith("calibrator refit on 50 production labels")
        started = (await service.rollouts.status(rollout_id)).to_json()
        assert started["mode"] == "shadow" and started["artefact"] == sha
        assert started["events"][0]["actor"].startswith(f"recalibration {job['id']}")
        # shadow: the incumbent still serves; the candidate's accepts are audited and labelled
        shadowed = await traffic(service, 40, "day2")
        for a in shadowed:
            (step,) = steps(a["analysis"], "rollout")
            assert step.details["candidate_artefact"] == sha and step.details["arm"] == "incumbent"
            assert a["analysis"].decision.value == "review"
        await review_everything(service, truths(shadowed))
        await service.rollouts.flush_costs()
        return sha, rollout_id, artefact["version"]

    sha, rollout_id, version = run(scenario())
    status = run(service.rollouts.status(rollout_id)).to_json()
    # promoted by the test's evidence (not an operator), then the artefact became the incumbent
    # (nothing to deploy) and the rollout finished itself
    assert status["status"] == "finished", status["test"]
    assert [(e["action"], e["actor"]) for e in status["events"]] == [
        ("start", status["events"][0]["actor"]),
        ("promote", "sequential-test"),
        ("finish", "sequential-test"),
    ]
    assert "incumbent" in status["events"][2]["reason"]
    assert service.rollouts.artefacts.incumbents()["colour"]["sha256"] == sha
    later = run(traffic(service, 3, "day3"))
    for a in later:  # the trace of a later request carries the new version, as the incumbent's
        assert steps(a["analysis"], "rollout") == []
        (thresholds,) = steps(a["analysis"], "policy:thresholds")
        assert thresholds.policy_version == version
        assert a["analysis"].decision.value == "accept"


def test_a_promoted_artefact_is_the_incumbent_after_a_restart_and_the_next_job_certifies_against_it(tmp_path):
    config = strict_config(tmp_path)
    first = build(config)
    run(labelled_traffic(first, 50, "day1"))
    job = job_of(RecalibrationService.of(first), JOB)
    sha, version = job["artefact_sha256"], job["details"]["version"]
    # promoted, and the replica stopped before it adopted the artefact: the next read adopts it
    first.rollouts.store.decide(job["rollout_id"], "promote", actor="alice@ops", reason="by hand")
    restarted = build(config)  # a restart: a new service over the same shared stores
    for a in run(traffic(restarted, 3, "day2")):  # served as the incumbent, not the config's 0.9999
        assert steps(a["analysis"], "rollout") == []
        (thresholds,) = steps(a["analysis"], "policy:thresholds")
        assert thresholds.policy_version == version and a["analysis"].decision.value == "accept"
    status = run(restarted.rollouts.status(job["rollout_id"])).to_json()
    assert status["status"] == "finished" and status["events"][-1]["actor"] == "artefact-adoption"
    # the next job certifies against the incumbent artefact; versions do not grow a chain
    second = job_of(RecalibrationService.of(restarted), {**JOB, "propose": False})
    assert second["status"] == "succeeded", second["reason"]
    artefact = restarted.rollouts.artefacts.get(second["artefact_sha256"])
    assert artefact["parent_version"] == version and artefact["parent_artefact"] == sha
    assert artefact["version"].startswith("colour-v1+prod-") and artefact["version"].count("+prod-") == 1
    # a redeploy that configures other thresholds replaces the incumbent artefact
    cascade = config.cascades["colour"]
    v2 = cascade.policy.model_copy(update={"version": "colour-v2"})
    redeployed = build(
        config.model_copy(update={"cascades": {"colour": cascade.model_copy(update={"policy": v2})}})
    )
    (a,) = run(traffic(redeployed, 1, "day3"))
    (thresholds,) = steps(a["analysis"], "policy:thresholds")
    assert thresholds.policy_version == "colour-v2" and a["analysis"].decision.value == "review"


def test_too_few_labels_is_a_refusal_saying_how_many_more_and_nothing_is_proposed(service):
    recalibration = RecalibrationService.of(service)

    async def scenario():
        await labelled_traffic(service, 6, "few")
        return await finished_job(recalibration, await recalibration.start("alice@ops", JOB))

    job = run(scenario())
    assert job["status"] == "refused" and job["artefact_sha256"] is None and job["rollout_id"] is None
    assert job["details"]["needed_more"] > 0 and "more" in job["reason"]
    assert run(service.rollouts.list("colour")).to_json()["rollouts"] == []
    no_tenant = job_of(recalibration, {**JOB, "tenant": "nobody"})
    assert no_tenant["status"] == "refused" and "no review items" in no_tenant["reason"]


def test_erased_subjects_never_enter_an_artefact(service):
    async def scenario():
        answers = await labelled_traffic(service, 70, "erase")
        return answers

    answers = run(scenario())
    queue = service.review.queue
    victim = answers[0]["analysis"].trace.request_id
    (item,) = queue.find_items("t0", request_key=victim)
    queue.erase([item.id], actor="dpo", reason="subject request")
    recalibration = RecalibrationService.of(service)
    job = job_of(recalibration, {**JOB, "propose": False})
    assert job["status"] == "succeeded", job["reason"]
    artefact = service.rollouts.artefacts.get(job["artefact_sha256"])
    assert artefact["labels"]["sampled_items"] == 69
    # an erasure that lands while the job runs refuses the artefact
    request = RecalibrationRequest.model_validate(JOB)
    items = list(queue.iter_all())
    built = build_artefact(
        items,
        request=request,
        incumbent=service.rollouts.policies.thresholds(service.rollouts.policies.current, "colour"),
        has_vlm=False,
        erased={items[1].id},
    )
    assert items[1].id not in built.item_ids and len(built.item_ids) == 68


def test_a_database_outage_fails_the_job_and_the_running_version_stays(service, monkeypatch):
    run(labelled_traffic(service, 70, "outage"))
    recalibration = RecalibrationService.of(service)
    from visionroute.state import StateUnavailable

    def down(*args, **kwargs):
        raise StateUnavailable("state database unreachable", field="state")

    monkeypatch.setattr(recalibration.job.artefacts, "put", down)
    job = job_of(recalibration, JOB)
    assert job["status"] == "failed" and "running version stays" in job["reason"]
    assert run(service.rollouts.list("colour")).to_json()["rollouts"] == []
    later = run(traffic(service, 1, "after-outage"))[0]["analysis"]
    assert not steps(later, "rollout") and later.decision.value == "review"


def test_a_rollout_naming_a_missing_or_tampered_artefact_is_refused(service, tmp_path):
    with pytest.raises(InputError) as missing:
        run(service.rollouts.start(ADMIN, {"task": "colour", "artefact": "0" * 64}))
    assert missing.value.field == "artefact"
    store: ArtefactStore = service.rollouts.artefacts
    body = {"task": "colour", "version": "v", "thresholds": {"version": "v"}}
    sha = store.put(body, actor="test")
    with store.database.write() as tx:
        tx.execute("UPDATE calibration_artefacts SET body = ? WHERE sha256 = ?", ('{"task":"colour"}', sha))
    with pytest.raises(InputError) as tampered:
        run(service.rollouts.start(ADMIN, {"task": "colour", "artefact": sha}))
    assert tampered.value.field == "artefact" and "sha256" in str(tampered.value)


def test_one_job_at_a_time_per_task(service):
    store: ArtefactStore = service.rollouts.artefacts
    from visionroute.errors import Conflict

    with store.job_lock("colour:*"):
        with pytest.raises(Conflict):
            with store.job_lock("colour:*"):
                pass
    with store.job_lock("colour:*"):  # released after the job
        pass


def test_the_cli_runs_one_job_over_the_serve_configs_stores(service, tmp_path, capsys):
    import yaml

    from visionroute.cli import main

    run(labelled_traffic(service, 70, "cli"))
    cascade = service.config.cascades["colour"]
    args = {
        "models_dir": str(tmp_path),
        "default_task": "colour",
        "cascades": {
            "colour": {
                "tier": cascade.tier.model_dump(mode="json", exclude_defaults=True),
                "policy": cascade.policy.model_dump(mode="json"),
            }
        },
        "review": {"path": str(service.config.review.path)},
        "retrieval": {"enabled": False},
    }
    path = tmp_path / "serve.yaml"
    path.write_text(
        yaml.safe_dump(
            {"applications": [{"name": "vr", "import_path": "router.app:build_app", "args": args}]}
        )
    )
    common = ["calibrate", "--from-production", "--task", "colour", "--config", str(path)]
    assert main([*common, "--alpha", "0.2", "--delta", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "succeeded" in out and "artefact_sha256" in out and "rollout_id" in out
    assert "calibrator refit on 70 production labels" in out
    (rollout,) = run(service.rollouts.list("colour")).to_json()["rollouts"]
    assert rollout["mode"] == "shadow" and rollout["artefact"] in out
    assert main([*common, "--tenant", "nobody"]) == 2  # a tenant with no data: refused, exit 2
    assert "no review items" in capsys.readouterr().out
    # --serve-calibrator reaches the job: the refit map is fitted on a share (30% by item id), the
    # rest certifies; 60 more labels make its 20-label minimum all but certain (about 40 expected)
    run(labelled_traffic(service, 60, "cli-calibrator"))
    code = main([*common, "--alpha", "0.2", "--delta", "0.2", "--no-propose", "--serve-calibrator"])
    out = capsys.readouterr().out
    assert code == 0 and "(not proposed)" in out
    assert "served (fitted on" in out and "certified on the other items" in out


def test_the_scheduled_job_runs_once_per_interval_on_one_node_and_survives_an_outage(service, monkeypatch):
    from router.config import RecalibrationSchedule
    from visionroute.errors import ConfigError
    from visionroute.state import StateUnavailable

    run(labelled_traffic(service, 70, "sched"))
    job = RecalibrationService.of(service).job
    request = RecalibrationRequest.model_validate({**JOB, "propose": False})
    with job.artefacts.job_lock(job.lock_name(request)):  # another node runs it now: nothing here
        assert job.run_if_due(request, every_s=3600) is None
    first = job.run_if_due(request, every_s=3600)
    assert first is not None and first["status"] == "succeeded" and first["actor"] == "scheduler"
    assert job.run_if_due(request, every_s=3600) is None  # not due again within the interval
    assert len(job.artefacts.jobs("colour")) == 1

    def down(*args, **kwargs):
        raise StateUnavailable("state database unreachable", field="state")

    monkeypatch.setattr(job.artefacts, "jobs", down)  # an outage: logged, nothing changes
    assert job.run_if_due(request, every_s=0.001) is None
    with pytest.raises(ConfigError) as bad:
        RecalibrationService.of(service).start_schedule(
            RecalibrationSchedule(every_s=60, tasks=["nope"]), service.config.cascades
        )
    assert bad.value.field == "rollouts.recalibrate.tasks"


def test_a_task_with_a_vlm_gets_the_three_tier_plan_from_weighted_labels():
    """Synthetic queue items: reviews (pi 1) below 0.8, VLM answers in [0.6, 0.7), audited cheap
    accepts (pi 0.6) above; every label right. The plan's thresholds become the served policy's."""
    from types import SimpleNamespace

    import numpy as np

    from policies.thresholds import ThresholdPolicy

    rng = np.random.default_rng(0)
    items = []
    for i, score in enumerate(rng.uniform(0.0, 1.0, 900)):
        audited = score >= 0.8
        if audited and rng.random() > 0.6:
            continue  # an accept the audit did not draw: never queued
        steps = [{"stage": "policy:thresholds", "score": float(score)}]
        if 0.6 <= score < 0.7:
            steps.append({"stage": "vlm:colour", "score": float(rng.uniform(0.6, 1.0))})
        items.append(
            SimpleNamespace(
                id=f"it{i}",
                task="colour",
                tenant="t0",
                kind="audit" if audited else "review",
                inclusion_probability=0.6 if audited else 1.0,
                trace={"steps": steps},
                status="labelled",
                label={"verdict": "confirm"},
                proposed=[{"label": "red"}],
                created_at=float(i),
            )
        )
    incumbent = ThresholdPolicy(version="colour-v1", accept_threshold=0.8, escalate_threshold=0.5)
    request = RecalibrationRequest.model_validate({"task": "colour", "alpha": 0.1, "delta": 0.1})
    built = build_artefact(items, request=request, incumbent=incumbent, has_vlm=True, erased=set())
    plan, thresholds = built.artefact["plan"], built.artefact["thresholds"]
    assert plan is not None and set(plan["rates"]) >= {"accept", "escalate", "review"}
    assert (
        thresholds["version"].startswith("colour-v1+prod-")
        and thresholds["version"] == built.artefact["version"]
    )
    assert 0.0 <= thresholds["escalate_threshold"] <= thresholds["accept_threshold"] <= 1.0
    assert built.artefact["certificate"]["feasible"] and built.artefact["certificate"]["alpha"] == 0.1
    from policies.artefact_store import canonical

    assert canonical(built.artefact)
    for item in items:  # every label from one reviewer whom the error rates flagged
        item.labelled_by = "rita"
    with pytest.raises(Refused, match="no threshold"):  # their labels count as none (errors): no certificate
        build_artefact(
            items,
            request=request,
            incumbent=incumbent,
            has_vlm=True,
            erased=set(),
            distrusted_reviewers={"rita"},
        )


def test_a_tenants_artefact_is_stored_but_never_rolled_out_to_the_whole_task(service):
    run(labelled_traffic(service, 70, "tenant"))
    job = job_of(RecalibrationService.of(service), {**JOB, "tenant": "t0"})
    assert job["status"] == "succeeded" and job["rollout_id"] is None and "not proposed" in job["reason"]
    assert service.rollouts.artefacts.get(job["artefact_sha256"])["tenant"] == "t0"
    with pytest.raises(InputError) as refused:
        run(service.rollouts.start(ADMIN, {"task": "colour", "artefact": job["artefact_sha256"]}))
    assert refused.value.field == "artefact" and "tenant" in str(refused.value)


def test_the_schedule_runs_the_job_on_the_replicas_event_loop(service):
    from router.config import RecalibrationSchedule

    run(labelled_traffic(service, 50, "loop"))
    recalibration = RecalibrationService.of(service)
    schedule = RecalibrationSchedule(every_s=0.1, tasks=["colour"], alpha=0.2, delta=0.2)

    async def scheduled():
        assert recalibration.start_schedule(schedule, service.config.cascades)
        for _ in range(200):
            await asyncio.sleep(0.1)
            jobs = await recalibration.list("colour")
            if jobs["jobs"] and jobs["jobs"][0]["status"] != "running":
                break
        recalibration._schedule.cancel()
        return jobs["jobs"]

    jobs = run(scheduled())
    assert jobs and jobs[0]["actor"] == "scheduler" and jobs[0]["status"] == "succeeded", jobs
    assert jobs[0]["rollout_id"] is not None  # proposed as a shadow rollout
