"""The cascade end to end through Ray Serve to a REAL vLLM server, and that server failing.

One service serves both cases (a service start is most of what a test here costs): ``classify``
escalates to the real server (the suite's one: the digits LLaVA, asked about photos it was never
trained on, so only the protocol, schema and routing are asserted), ``classify_down`` to a port
nothing listens on. The service is the lightest that shows this: both cheap tiers inside the
ingress (``placement: ingress``; the shared services test the tier deployments) and search off,
so it starts three replicas (the ingress and each task's VLM tier) instead of six.
"""

from __future__ import annotations

import httpx
import pytest

from examples.train_digits import SERVED_MODEL_NAME
from tests.integration.serve_process import ServeProcess

pytestmark = [pytest.mark.server, pytest.mark.slow]

LABELS = ["astronaut", "bobsled", "football helmet", "rocket", "cat"]


def vlm_cascade(endpoint: str, **overrides) -> dict:
    return {
        "tier": {"model": "efficientnet_lite0"},
        "placement": "ingress",
        # The astronaut photo (top-1 0.28) falls between these: it escalates.
        "policy": {"version": "classify-vlm-v1", "accept_threshold": 0.7, "escalate_threshold": 0.1},
        "vlm": {
            "endpoint": endpoint,
            "model": SERVED_MODEL_NAME,
            "labels": LABELS,
            "accept_threshold": 0.0,  # off its task the model is never confident; accept valid answers
            "disagreement_margin": 1.0,
            "cost_per_1k_prompt_tokens": 0.5,
            "cost_per_1k_completion_tokens": 1.5,
            # generous: a loaded machine makes the first calls slow (the server is warm, but
            # this config's JSON schema is compiled on its first use)
            "request_timeout_s": 60.0,
            "total_timeout_s": 120.0,
            "max_attempts": 2,
            "backoff_initial_s": 0.05,
            **overrides,
        },
    }


@pytest.fixture(scope="module")
def service(digits_vllm_server, prepared_models_dir, tmp_path_factory):
    from tests.support.ports import free_port

    dead_endpoint = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here
    args = {
        "default_task": "classify",
        "cascades": {
            "classify": vlm_cascade(digits_vllm_server.base_url),
            "classify_down": vlm_cascade(dead_endpoint, request_timeout_s=5.0, total_timeout_s=5.0),
        },
        "retrieval": {"enabled": False},
    }
    process = ServeProcess(tmp_path_factory.mktemp("vlm-service"), prepared_models_dir, args).start()
    yield process
    process.stop()


def analyze(service: ServeProcess, image: bytes, task: str = "classify") -> dict:
    response = httpx.post(
        service.url + "/v1/analyze",
        files={"image": ("a.png", image, "image/png")},
        data={"task": task},
        timeout=180,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_an_escalated_image_gets_a_vlm_answer_with_tokens_cost_and_latency(service, photos_png):
    body = analyze(service, photos_png["astronaut"])
    stages = [step["stage"] for step in body["trace"]["steps"]]
    assert stages[:4] == ["input", "onnx:classify", "policy:thresholds", "vlm"], stages
    escalation, vlm = body["trace"]["steps"][2], body["trace"]["steps"][3]
    assert escalation["decision"] == "escalate"
    assert vlm["error"] is None, vlm
    assert vlm["model"] == SERVED_MODEL_NAME and vlm["latency_ms"] > 0
    assert vlm["details"]["prompt_tokens"] > 0 and vlm["details"]["completion_tokens"] > 0
    assert vlm["cost_units"] > 0 and body["cost_units"] == pytest.approx(1.0 + vlm["cost_units"])
    assert vlm["decision"] == "accept" and body["decision"] == "accept"
    assert body["answer"][0]["label"] in LABELS  # the schema holds even off the model's task
    ready = httpx.get(service.url + "/readyz").json()
    assert (
        ready["checks"]["vlm:classify"]["model"] == SERVED_MODEL_NAME
        and ready["checks"]["vlm:classify"]["reachable"]
    )
    metrics = httpx.get(service.url + "/metrics").text
    assert (
        'visionroute_stage_decisions_total{decision="escalate",stage="policy:thresholds",task="classify"}'
        in metrics
    )
    assert 'visionroute_stage_latency_seconds_count{stage="vlm",task="classify"}' in metrics
    # A clear photo never reaches the VLM.
    coffee = analyze(service, photos_png["coffee"])
    assert "vlm" not in [s["stage"] for s in coffee["trace"]["steps"]]


def test_a_vlm_that_is_down_sends_escalations_to_review_with_the_reason(service, photos_png):
    body = analyze(service, photos_png["astronaut"], task="classify_down")
    vlm = next(step for step in body["trace"]["steps"] if step["stage"] == "vlm")
    assert vlm["decision"] == "review" and vlm["error"]
    assert vlm["details"]["failure"] == "connection"
    assert body["decision"] == "review" and body["review_item_id"]
    item = httpx.get(f"{service.url}/v1/review/items/{body['review_item_id']}").json()
    assert item["status"] == "pending" and item["reason"] == vlm["reason"]
    assert "vlm" in [s["stage"] for s in item["trace"]["steps"]]
    # one task's VLM down leaves the service ready, and says which VLM is unreachable
    ready = httpx.get(service.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["vlm:classify_down"]["reachable"] is False
    metrics = httpx.get(service.url + "/metrics").text
    assert 'visionroute_stage_errors_total{failure="connection",stage="vlm",task="classify_down"}' in metrics
