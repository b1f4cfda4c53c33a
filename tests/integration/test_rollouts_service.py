"""Rollouts through the running service (`serve run`, Ray Serve, HTTP, the CLI): a worse candidate
in shadow is rolled back by the sequential test, an equal and cheaper one in canary is promoted;
model cards and drift reports are served by the same service (the session's colour service,
tests/integration/colour_service.py, which test_certified_service.py shares).

The candidates are real ONNX models deployed beside the incumbent: ``swapped`` (its own Ray
Serve deployment) answers every colour confidently and wrongly; ``cheaper`` (inside the
ingress) is the incumbent's model at half the cost. Audit fraction 1.0 keeps the tests short;
the reviewer knows each image's true colour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.integration.colour_service import RECALIBRATED, ROUTED
from tests.integration.serve_process import REPO
from tests.router.colour_model import LABELS, solid_png

pytestmark = [pytest.mark.server, pytest.mark.slow]
COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


@pytest.fixture(scope="module")
def service(colour_service):
    """The session's colour service (tests/integration/colour_service.py): ``colour`` with its two
    candidates, ``colour_recalibrated`` and ``colour_routed``; rollouts re-read every 0.2 s."""
    return colour_service


def cli(service, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VISIONROUTE_URL": service.url}
    return subprocess.run(
        [sys.executable, "-m", "visionroute.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def send(client: httpx.Client, n: int, prefix: str, task: str | None = None) -> dict[str, tuple[str, dict]]:
    rng = np.random.default_rng(n)
    sent = {}
    for i in range(n):
        truth = LABELS[i % 3]
        colour = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[truth])
        response = client.post(
            "/v1/analyze",
            files={"image": ("x.png", solid_png(colour), "image/png")},
            data={"task": task} if task else None,
            headers={"x-request-id": f"{prefix}-{i}"},
        )
        assert response.status_code == 200, response.text
        sent[f"{prefix}-{i}"] = (truth, response.json())
    return sent


def review_all(client: httpx.Client, truth_of: dict[str, str], expect: int, deadline_s: float = 60.0) -> int:
    """Label pending items until ``expect`` are done (shadow items arrive just after the responses)."""
    labelled, deadline = 0, time.monotonic() + deadline_s
    while labelled < expect and time.monotonic() < deadline:
        claim = client.post("/v1/review/claim", json={"reviewer": "rita"}).json()
        item = claim["item"]
        if item is None:
            time.sleep(0.3)
            continue
        if item["request_id"] not in truth_of:  # another test's item (both tasks share the queue)
            response = client.post(
                f"/v1/review/items/{item['id']}/label",
                json={"reviewer": "rita", "lease_token": claim["lease_token"], "verdict": "reject"},
            )
            assert response.status_code == 200, response.text
            continue
        proposed = item["proposed"][0]["label"] if item["proposed"] else None
        truth = truth_of[item["request_id"]]
        verdict = {"verdict": "confirm"} if proposed == truth else {"verdict": "correct", "label": truth}
        response = client.post(
            f"/v1/review/items/{item['id']}/label",
            json={"reviewer": "rita", "lease_token": claim["lease_token"], **verdict},
        )
        assert response.status_code == 200, response.text
        labelled += 1
    return labelled


def wait_for_status(client: httpx.Client, rollout_id: str, status: str, deadline_s: float = 30.0) -> dict:
    deadline = time.monotonic() + deadline_s
    while True:
        body = client.get(f"/v1/rollouts/{rollout_id}").json()
        if body["status"] == status or time.monotonic() > deadline:
            return body
        time.sleep(0.3)


def rollout_steps(response: dict) -> list[dict]:
    return [s for s in response["trace"]["steps"] if s["stage"] == "rollout"]


def test_a_worse_shadow_candidate_is_rolled_back_and_never_served(service):
    started = cli(
        service,
        "rollout",
        "start",
        "--task",
        "colour",
        "--candidate",
        "swapped",
        "--mode",
        "shadow",
        "--fraction",
        "1",
        "--audit-fraction",
        "1",
        "--alpha",
        "0.1",
        "--delta",
        "0.1",
        "--reason",
        "swapped weights",
        "--json",
    )
    assert started.returncode == 0, started.stderr
    rollout_id = json.loads(started.stdout)["id"]
    with httpx.Client(base_url=service.url, timeout=120) as client:
        time.sleep(0.5)  # every replica re-reads the rollouts within refresh_s
        sent = send(client, 12, "shadow")
        for truth, response in sent.values():
            assert response["answer"][0]["label"] == truth  # the incumbent served
            (step,) = rollout_steps(response)
            assert step["details"]["arm"] == "incumbent" and step["details"]["shadow"] is True
        review_all(client, {rid: truth for rid, (truth, _) in sent.items()}, expect=24)
        status = wait_for_status(client, rollout_id, "rolled_back")
    assert status["status"] == "rolled_back", status["test"]
    assert status["shadow"]["requests"] == 12
    assert [e["action"] for e in status["events"]] == ["start", "rollback"]
    assert status["events"][1]["actor"] == "sequential-test"
    shown = cli(service, "rollout", "status", rollout_id)
    assert shown.returncode == 0 and "rolled_back" in shown.stdout and "candidate" in shown.stdout


def test_an_equal_cheaper_canary_is_promoted_and_then_serves_everything(service):
    with httpx.Client(base_url=service.url, timeout=120) as client:
        refused = client.post("/v1/rollouts", json={"task": "colour", "candidate": "cheaper", "fraction": 0})
        assert refused.status_code == 400 and refused.json()["field"] == "fraction"
        response = client.post(
            "/v1/rollouts",
            json={
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
        assert response.status_code == 200, response.text
        rollout_id = response.json()["id"]
        second = client.post("/v1/rollouts", json={"task": "colour", "candidate": "swapped"})
        assert second.status_code == 409 and second.json()["field"] == "task"
        time.sleep(0.5)
        sent: dict = {}
        while len(sent) < 120:  # the split hashes a random rollout id: send until the candidate has 24
            sent |= send(client, 10, f"canary{len(sent)}")
            arms = [rollout_steps(response)[0]["details"]["arm"] for _, response in sent.values()]
            if arms.count("candidate") >= 24:
                break
        assert 0 < arms.count("incumbent") < len(sent)  # both arms served
        review_all(client, {rid: truth for rid, (truth, _) in sent.items()}, expect=len(sent))
        time.sleep(0.5)
        send(client, 4, "flush")  # costs are flushed every cost_flush_s, on the next request
        status = wait_for_status(client, rollout_id, "promoted")
        assert status["status"] == "promoted", status["test"]
        time.sleep(0.5)
        later = send(client, 3, "later")
        assert all(rollout_steps(r)[0]["details"]["arm"] == "candidate" for _, r in later.values())
    finished = cli(service, "rollout", "finish", rollout_id, "--reason", "deployed as incumbent")
    assert finished.returncode == 0 and "finished" in finished.stdout


def test_cards_and_drift_reports_are_served(service):
    with httpx.Client(base_url=service.url, timeout=120) as client:
        listing = client.get("/v1/models")
        assert listing.status_code == 200, listing.text
        names = [model["name"] for model in listing.json()["models"]]
        assert "colour.candidate.swapped" in names and "colour.candidate.cheaper" in names
        card = client.get(f"/v1/models/{names[0]}/card", headers={"accept": "text/markdown"})
        assert card.status_code == 200 and card.headers["content-type"].startswith("text/markdown")
        assert "sha256" in card.text
        missing = client.get("/v1/models/nope/card")
        assert missing.status_code == 404 and missing.json()["field"] == "name"
        drift = client.get("/v1/drift")
        assert drift.status_code == 200 and "colour" in json.dumps(drift.json())
        metrics = client.get("/metrics").text
        assert "visionroute_drift_alarm" in metrics


def finished_job(client: httpx.Client, job_id: str, deadline_s: float = 60.0) -> dict:
    deadline = time.monotonic() + deadline_s
    while True:
        job = client.get(f"/v1/admin/recalibrations/{job_id}").json()
        if job["status"] != "running" or time.monotonic() > deadline:
            return job
        time.sleep(0.3)


def truths(sent: dict) -> dict[str, str]:
    return {rid: truth for rid, (truth, _) in sent.items()}


# --------------------------------------------------------------------------- recalibration
# reviewers' labels -> POST /v1/admin/recalibrations -> a certified artefact in the shared store ->
# a shadow rollout naming it by sha256 -> the sequential test promotes it -> it becomes the task's
# incumbent -> the trace of a later request carries the artefact's version. No redeploy: the
# replicas load it from the store.


def test_labels_become_a_new_artefact_that_shadows_is_promoted_and_traces_carry_it(service):
    job_body = {
        "task": RECALIBRATED,
        "alpha": 0.2,
        "delta": 0.2,
        "shadow_fraction": 1.0,
        "audit_fraction": 1.0,
    }
    with httpx.Client(base_url=service.url, timeout=120) as client:
        sent = send(client, 60, "day1", RECALIBRATED)
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
        shadowed = send(client, 30, "day2", RECALIBRATED)
        for _, response in shadowed.values():  # the incumbent still serves
            (step,) = rollout_steps(response)
            assert step["details"]["candidate_artefact"] == sha and step["details"]["arm"] == "incumbent"
        review_all(client, truths(shadowed), expect=60)
        time.sleep(0.5)
        send(client, 4, "flush", RECALIBRATED)  # costs are flushed every cost_flush_s, on the next request
        # promoted by the test, then the artefact became the task's incumbent and the rollout finished
        status = wait_for_status(client, rollout_id, "finished")
        assert status["status"] == "finished", status["test"]
        assert [(e["action"], e["actor"]) for e in status["events"]][1] == ("promote", "sequential-test")
        time.sleep(0.5)
        later = send(client, 2, "later", RECALIBRATED)
        for _, response in later.values():  # the trace of a later request carries the new version
            assert response["decision"] == "accept" and rollout_steps(response) == []
            (thresholds,) = [s for s in response["trace"]["steps"] if s["stage"] == "policy:thresholds"]
            assert thresholds["policy_version"] == version
        bad = client.post("/v1/admin/recalibrations", json={"task": "nope"})
        assert bad.status_code == 400 and bad.json()["field"] == "task"


# --------------------------------------------------------------------------- a refit router
# The same loop for a task with a learned router: its labels refit the router (router_refit.py),
# the artefact carries it, the shadow runs score with it, and once promoted every request does.


def noisy_pngs(n: int, seed: int) -> list[bytes]:
    """Noisy random colours (as tests/router/test_rollout_router.py): some sure, some not."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        pixels = np.clip(rng.integers(0, 256, 3)[None, None, :] + rng.normal(0, 8, (48, 48, 3)), 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def send_batches(client: httpx.Client, n: int, prefix: str, seed: int) -> dict[str, dict]:
    """``n`` images to the routed task through the batch API (32 a request); request id -> body."""
    images, sent = noisy_pngs(n, seed), {}
    for start in range(0, n, 32):
        batch = [
            ("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images[start : start + 32])
        ]
        response = client.post(
            "/v1/analyze/batch",
            files=batch,
            data={"task": ROUTED},
            headers={"x-request-id": f"{prefix}-{start}"},
        )
        assert response.status_code == 200 and response.json()["failed"] == 0, response.text
        sent |= {result["request_id"]: result["response"] for result in response.json()["results"]}
    return sent


def routed_truth(sent: dict[str, dict]) -> dict[str, str]:
    """The reviewer's truth: the model's answer, but the next colour where it is unsure (top-1
    below 0.55, about one answer in eight), so a router can learn where it is wrong."""
    truth = {}
    for request_id, body in sent.items():
        label, confidence = body["answer"][0]["label"], body["answer"][0]["confidence"]
        truth[request_id] = LABELS[(LABELS.index(label) + 1) % 3] if confidence < 0.55 else label
    return truth


def label_pending(
    client: httpx.Client, truth_of: dict[str, str], expect: int | None = None, quiet_s: float = 2.0
) -> int:
    """Label pending items in the queue's claim order until ``expect`` of ``truth_of``'s are
    labelled, or the queue has stayed empty for ``quiet_s`` (shadow items are queued just after
    the responses, later on a busy machine)."""
    labelled, empty_since = 0, None
    while expect is None or labelled < expect:
        claim = client.post("/v1/review/claim", json={"reviewer": "rita"}).json()
        item = claim["item"]
        if item is None:
            empty_since = empty_since or time.monotonic()
            if time.monotonic() - empty_since >= quiet_s:
                break
            time.sleep(0.2)
            continue
        empty_since = None
        truth = truth_of.get(item["request_id"])
        proposed = item["proposed"][0]["label"] if item["proposed"] else None
        if truth is None:  # another test's item (the tasks share the queue)
            verdict = {"verdict": "reject"}
        else:
            verdict = {"verdict": "confirm"} if proposed == truth else {"verdict": "correct", "label": truth}
            labelled += 1
        response = client.post(
            f"/v1/review/items/{item['id']}/label",
            json={"reviewer": "rita", "lease_token": claim["lease_token"], **verdict},
        )
        assert response.status_code == 200, response.text
    return labelled


def step_named(body: dict, stage: str) -> dict | None:
    return next((s for s in body["trace"]["steps"] if s["stage"] == stage), None)


def test_labels_refit_the_router_whose_rollout_is_shadowed_promoted_and_later_traces_carry_it(service):
    started_at = time.monotonic()
    with httpx.Client(base_url=service.url, timeout=120) as client:
        day1 = send_batches(client, 120, "routed1", seed=11)
        assert all(body["decision"] == "review" for body in day1.values())
        incumbent = step_named(next(iter(day1.values())), "router")["details"]["version"]
        assert label_pending(client, routed_truth(day1), expect=120) == 120
        # alpha 0.4: the candidate's error (about 12%) is shown below it in a few dozen labels
        job_body = {"task": ROUTED, "alpha": 0.4, "delta": 0.2, "shadow_fraction": 1.0, "audit_fraction": 1.0}
        started = client.post("/v1/admin/recalibrations", json={**job_body, "min_cost_observations": 5})
        assert started.status_code == 202, started.text
        job = finished_job(client, started.json()["id"])
        assert job["status"] == "succeeded", job["reason"]
        refit, rollout_id = job["details"]["router"], job["rollout_id"]
        assert refit != incumbent and refit[:12] in job["reason"]
        rollout = client.get(f"/v1/rollouts/{rollout_id}").json()
        assert rollout["artefact"] == job["artefact_sha256"] and rollout["mode"] == "shadow"
        time.sleep(0.5)  # every replica re-reads the rollouts within refresh_s
        status, day2 = rollout, {}
        for round_ in range(4):  # the candidate's labels until the test decides (a few dozen)
            sent = send_batches(client, 32, f"routed2-{round_}", seed=12 + round_)
            for body in sent.values():  # the incumbent serves, with its own router
                assert step_named(body, "rollout")["details"]["arm"] == "incumbent"
                assert step_named(body, "router")["details"]["version"] == incumbent
            day2 |= sent
            label_pending(client, routed_truth(day2))
            time.sleep(0.3)
            day2 |= send_batches(client, 2, f"flush-{round_}", seed=99 + round_)  # costs flush on a request
            status = wait_for_status(client, rollout_id, "finished", deadline_s=5)
            if status["status"] != "running":
                break
        assert status["status"] == "finished", status["test"]
        events = [(e["action"], e["actor"]) for e in status["events"]]
        assert events[1:] == [("promote", "sequential-test"), ("finish", "sequential-test")]
        assert status["shadow"]["candidate_accepts"] > 0
        # the shadow items were scored by the refit router
        shadow = client.get("/v1/review/items", params={"status": "labelled", "limit": 1000}).json()["items"]
        shadowed = [i for i in shadow if i["kind"] == "shadow" and i["request_id"] in day2]
        assert shadowed and all(step_named(i, "router")["details"]["version"] == refit for i in shadowed)
        time.sleep(0.5)
        later = send_batches(client, 2, "routed3", seed=20)
        for body in later.values():  # the trace of a later request carries the refit router
            assert step_named(body, "rollout") is None
            assert step_named(body, "router")["details"]["version"] == refit
            thresholds = step_named(body, "policy:thresholds")
            assert thresholds["details"]["router_version"] == refit
            assert thresholds["policy_version"] == f"router@{refit[:12]}:learned"
    print(
        f"routed rollout end to end: {time.monotonic() - started_at:.1f} s, {len(day1) + len(day2)} requests"
    )
