"""Recalibration through the running service (`serve run`, Ray Serve, HTTP): reviewers' labels ->
``POST /v1/admin/recalibrations`` -> a certified artefact in the shared store -> a shadow rollout
naming it by sha256 -> the sequential test promotes it -> the trace of a later request carries the
artefact's version. No redeploy: the replicas load the artefact from the store at run time.

The incumbent's accept threshold (0.9999) is above every answer of the colour model, so every
request goes to review; the reviewer knows each image's true colour, the labels show the model
right, and the recertified threshold accepts what the incumbent did not.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.integration.serve_process import ServeProcess
from tests.integration.test_rollouts_service import review_all, rollout_steps, send, wait_for_status
from tests.router.colour_model import LABELS, write_colour_model

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("recalibration")
    models = workdir / "models"
    model = write_colour_model(models / "colour.onnx")
    cascade = {
        "tier": {
            "model": str(model),
            "decoder": "classifier",
            "labels": LABELS,
            "size_hw": 32,
            "cost_units": 1.0,
        },
        "policy": {"version": "colour-v1", "accept_threshold": 0.9999, "escalate_threshold": 0.5},
        "placement": "ingress",
    }
    process = ServeProcess(
        workdir,
        models,
        extra_args={
            "default_task": "colour",
            "cascades": {"colour": cascade},
            "retrieval": {"enabled": False},
            "rollouts": {"refresh_s": 0.2, "cost_flush_s": 0.2},
        },
    )
    process.start(timeout_s=300)
    yield process
    process.stop()


def finished_job(client: httpx.Client, job_id: str, deadline_s: float = 60.0) -> dict:
    deadline = time.monotonic() + deadline_s
    while True:
        job = client.get(f"/v1/admin/recalibrations/{job_id}").json()
        if job["status"] != "running" or time.monotonic() > deadline:
            return job
        time.sleep(0.3)


def truths(sent: dict) -> dict[str, str]:
    return {rid: truth for rid, (truth, _) in sent.items()}


def test_labels_become_a_new_artefact_that_shadows_is_promoted_and_traces_carry_it(service):
    job_body = {"task": "colour", "alpha": 0.2, "delta": 0.2, "shadow_fraction": 1.0, "audit_fraction": 1.0}
    with httpx.Client(base_url=service.url, timeout=120) as client:
        sent = send(client, 60, "day1")
        assert all(response["decision"] == "review" for _, response in sent.values())
        assert review_all(client, truths(sent), expect=60) == 60
        started = client.post("/v1/admin/recalibrations", json={**job_body, "min_cost_observations": 5})
        assert started.status_code == 202, started.text
        job = finished_job(client, started.json()["id"])
        assert job["status"] == "succeeded", job["reason"]
        sha, rollout_id = job["artefact_sha256"], job["rollout_id"]
        version = job["details"]["version"]
        assert client.get(f"/v1/rollouts/{rollout_id}").json()["artefact"] == sha
        time.sleep(0.5)  # every replica re-reads the rollouts within refresh_s
        shadowed = send(client, 30, "day2")
        for _, response in shadowed.values():  # the incumbent still serves
            (step,) = rollout_steps(response)
            assert step["details"]["candidate_artefact"] == sha and step["details"]["arm"] == "incumbent"
        review_all(client, truths(shadowed), expect=60)
        time.sleep(0.5)
        send(client, 4, "flush")  # costs are flushed every cost_flush_s, on the next request
        status = wait_for_status(client, rollout_id, "promoted")
        assert status["status"] == "promoted", status["test"]
        assert [(e["action"], e["actor"]) for e in status["events"]][1] == ("promote", "sequential-test")
        time.sleep(0.5)
        later = send(client, 2, "later")
        for _, response in later.values():  # the trace of a later request carries the new version
            assert response["decision"] == "accept"
            (step,) = rollout_steps(response)
            assert step["details"]["arm"] == "candidate" and step["details"]["candidate_artefact"] == sha
            (thresholds,) = [s for s in response["trace"]["steps"] if s["stage"] == "policy:thresholds"]
            assert thresholds["policy_version"] == version
        bad = client.post("/v1/admin/recalibrations", json={"task": "nope"})
        assert bad.status_code == 400 and bad.json()["field"] == "task"
