"""The three-tier digits cascade end to end: the cheap ONNX tier, the LLaVA trained on the digits
on a REAL vLLM server, and human review, through Ray Serve, with both accept thresholds and the
review threshold from the certificate (``visionroute example digits``, cascades/vlm/example_digits.py).

The trained model, its vLLM server and the prepared cheap tier are the session fixtures
test_vlm_digits.py uses too (tests/integration/conftest.py); one service for the module. Beside
the real ``digits`` cascade the service has two fault-injection cascades that share its tier and
certified thresholds but whose VLM endpoint is a stub in this process: one answers 500, one
answers a valid label with low confidence.

The certificate is built at alpha 0.04 (``E2E_ALPHA``), not the example's default 0.05: at 0.05
the cheapest certified plan for this seed accepts every VLM answer (VLM accept threshold -inf),
so "low VLM confidence goes to review" would not be shown; at 0.04 the certified plan needs a
finite VLM accept threshold, and real held-out digits fall on both sides of it.

Statistical claims are seeded regression checks here: for this seed, the error among the
held-out digits the service accepted is within alpha. How often that holds over many splits is
a figure of ``visionroute bench vlm-digits``.
"""

from __future__ import annotations

import io
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image

from cascades.vlm import server as vllm_server
from cascades.vlm.example_digits import (
    TASK,
    build_example,
    cheap_answers,
    cheap_stage,
    rendered,
    serve_document,
)
from cascades.vlm.train_digits import SERVED_MODEL_NAME
from evals.benchmarks.vlm_digits import digits_vlm_split
from tests.integration.serve_process import ServeProcess

pytestmark = [pytest.mark.server, pytest.mark.slow]

E2E_ALPHA = 0.04  # stricter than the example's 0.05: the certified VLM accept threshold is finite

UNSURE_LOGPROB = math.log(0.12)  # the stub's answer confidence before calibration


class _StubVlm(BaseHTTPRequestHandler):
    """/fail/v1/...: HTTP 500. /unsure/v1/chat/completions: a valid answer, "3", at 0.12."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": SERVED_MODEL_NAME, "object": "model"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path.startswith("/fail/"):
            self._send(500, {"error": {"message": "injected fault", "type": "InternalServerError"}})
            return
        pieces = [('{"label":"', 0.0), ("3", UNSURE_LOGPROB), ('"}', 0.0)]
        content = "".join(p for p, _ in pieces)
        logprobs = [
            {"token": p, "logprob": lp, "bytes": list(p.encode()), "top_logprobs": []} for p, lp in pieces
        ]
        self._send(
            200,
            {
                "id": "stub",
                "object": "chat.completion",
                "created": 0,
                "model": SERVED_MODEL_NAME,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": {"content": logprobs},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
            },
        )


@pytest.fixture(scope="module")
def stub_vlm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubVlm)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def digits_vllm(digits_vllm_server):
    return digits_vllm_server, vllm_server.model_version(digits_vllm_server.model_dir)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("three-tier")


@pytest.fixture(scope="module")
def build(digits_vllm, digits_models_dir, work):
    running, version = digits_vllm
    return build_example(
        work / "example",
        vlm_endpoint=running.base_url,
        vlm_model=running.model,
        vlm_model_version=version,
        models_dir=digits_models_dir,
        alpha=E2E_ALPHA,
    )


@pytest.fixture(scope="module")
def service(build, digits_vllm, stub_vlm, work):
    running, version = digits_vllm
    document = serve_document(
        build, http_port=0, vlm_endpoint=running.base_url, vlm_model=running.model, vlm_model_version=version
    )
    args = document["applications"][0]["args"]
    real = args["cascades"][TASK]
    for name, path in (("digits_failing", "fail"), ("digits_unsure", "unsure")):
        fault = json.loads(json.dumps(real))
        fault["vlm"] |= {"endpoint": f"{stub_vlm}/{path}/v1", "max_attempts": 1}
        args["cascades"][name] = fault

    def use_example_config(config: dict) -> None:
        config.pop("grpc_options", None)
        args["review"]["path"] = str(work / "review")
        config["applications"] = document["applications"]

    process = ServeProcess(work, build.models_dir, {"retrieval": {"enabled": False}}, use_example_config)
    process.start()
    yield process
    process.stop()


def png(image_rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image_rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def analyze(service: ServeProcess, image_rgb: np.ndarray, task: str = TASK) -> dict:
    response = httpx.post(
        service.url + "/v1/analyze",
        files={"image": ("digit.png", png(image_rgb), "image/png")},
        data={"task": task},
        timeout=180,
    )
    assert response.status_code == 200, response.text
    return response.json()


def step(body: dict, stage: str) -> dict | None:
    return next((s for s in body["trace"]["steps"] if s["stage"] == stage), None)


@pytest.fixture(scope="module")
def held_out(build, service):
    """Every held-out digit through the service (8 at a time): (labels, images, cheap scores, bodies)."""
    split = digits_vlm_split()
    images = rendered(split.images[split.held_out])
    scores, _ = cheap_answers(cheap_stage(build.models_dir, build.cheap_calibration), images)
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda image: analyze(service, image), images))
    return split.labels[split.held_out], images, scores, bodies


def answered_label(body: dict) -> int:
    return int(max(body["answer"], key=lambda a: a["confidence"])["label"])


def test_the_certificate_is_feasible_and_uses_all_three_thresholds(build):
    plan = build.plan
    assert build.split_sizes == {"training": 718, "calibration": 270, "certification": 270, "held_out": 539}
    assert plan.certificate.alpha == E2E_ALPHA and plan.certificate.is_feasible
    assert plan.certificate.risk_upper_bound <= plan.certificate.alpha
    assert plan.review_threshold < plan.accept_threshold
    # A real, certified, finite VLM threshold: some VLM answers are not confident enough.
    assert plan.vlm_accept_threshold is not None and 0.0 < plan.vlm_accept_threshold < 1.0
    assert plan.rates["vlm_accept"] > 0  # the VLM answers part of the traffic
    for path in (build.cheap_calibration, build.vlm_calibration):
        written = json.loads(path.read_text())["certificate"]["three_tier"]
        assert written["vlm_accept_threshold"] == plan.to_dict()["vlm_accept_threshold"]


def test_an_easy_digit_is_accepted_by_the_cheap_tier(build, held_out):
    labels, _, scores, bodies = held_out
    easy = [i for i in np.argsort(-scores) if scores[i] >= build.plan.accept_threshold][:5]
    assert easy, "no held-out digit reaches the certified cheap accept threshold"
    for i in easy:
        body = bodies[i]
        policy = step(body, "policy:thresholds")
        assert body["decision"] == "accept" and policy["decision"] == "accept", policy
        assert step(body, "vlm") is None and policy["score"] == pytest.approx(scores[i], abs=1e-5)
        assert policy["threshold"]["accept"] == pytest.approx(min(1.0, build.plan.accept_threshold))
        assert answered_label(body) == labels[i]


def test_a_hard_digit_is_answered_by_the_vlm(build, held_out):
    labels, _, scores, bodies = held_out
    plan = build.plan
    hard = [i for i in range(len(bodies)) if plan.review_threshold <= scores[i] < plan.accept_threshold]
    assert hard, "no held-out digit falls in the escalation band"
    answered = 0
    for i in hard:
        body, vlm = bodies[i], step(bodies[i], "vlm")
        assert step(body, "policy:thresholds")["decision"] == "escalate" and vlm is not None
        details = vlm["details"]
        assert details["calibration"]  # the artefact id, even when the call failed
        if vlm["error"] is None:
            assert vlm["score"] == pytest.approx(details["calibrated_score"])
            assert 0.0 <= details["raw_score"] <= 1.0
        assert vlm["threshold"]["accept"] == pytest.approx(min(1.0, max(0.0, plan.vlm_accept_threshold)))
        expected = plan.decide_vlm(details.get("calibrated_score", math.nan))
        assert vlm["decision"] == expected and body["decision"] == expected
        if expected == "accept":
            answered += 1
            assert answered_label(body) == int(details["answer"])
    assert answered > 0
    right = [answered_label(bodies[i]) == labels[i] for i in hard if bodies[i]["decision"] == "accept"]
    assert np.mean(right) > 0.9  # the trained VLM answers what the cheap tier could not


def test_a_low_confidence_vlm_answer_goes_to_review_and_a_confident_one_is_answered(build, held_out):
    """Real held-out digits escalated to the trained VLM: those whose calibrated VLM confidence is
    below the certified VLM threshold go to a human, with the reason and the threshold in the
    trace; those at or above it are answered by the VLM."""
    _, _, scores, bodies = held_out
    plan = build.plan
    threshold = plan.vlm_accept_threshold
    escalated = [
        (bodies[i], step(bodies[i], "vlm"))
        for i in range(len(bodies))
        if plan.review_threshold <= scores[i] < plan.accept_threshold
    ]
    answered = [(b, v) for b, v in escalated if v["error"] is None]
    below = [(b, v) for b, v in answered if v["details"]["calibrated_score"] < threshold]
    above = [(b, v) for b, v in answered if v["details"]["calibrated_score"] >= threshold]
    assert below and above, (len(below), len(above))
    for body, vlm in below:
        assert vlm["decision"] == "review" and body["decision"] == "review" and body["review_item_id"]
        assert vlm["threshold"]["accept"] == pytest.approx(threshold)
        assert vlm["reason"].startswith(f"VLM answer {vlm['details']['answer']!r} confidence ")
        assert f"< accept threshold {vlm['threshold']['accept']}" in vlm["reason"]
    for body, vlm in above:
        assert vlm["decision"] == "accept" and body["decision"] == "accept"
        assert body["review_item_id"] is None and answered_label(body) == int(vlm["details"]["answer"])


def test_a_failing_vlm_sends_the_escalation_to_review(build, held_out, service):
    _, images, scores, _ = held_out
    plan = build.plan
    i = next(i for i in range(len(scores)) if plan.review_threshold <= scores[i] < plan.accept_threshold)
    body = analyze(service, images[i], task="digits_failing")
    vlm = step(body, "vlm")
    assert vlm["decision"] == "review" and vlm["error"] and vlm["details"]["status_code"] == 500
    assert body["decision"] == "review" and body["review_item_id"]


def test_a_low_confidence_vlm_answer_is_judged_by_the_certified_threshold(build, held_out, service):
    """The stub answers "3" at 0.12: the service calibrates it with the VLM's artefact and
    compares it with the certificate's VLM threshold: below it, so a human reviews it."""
    from cascades.calibration import load_calibration
    from cascades.vlm.calibration import calibrated_confidence

    _, images, scores, _ = held_out
    plan = build.plan
    i = next(i for i in range(len(scores)) if plan.review_threshold <= scores[i] < plan.accept_threshold)
    body = analyze(service, images[i], task="digits_unsure")
    vlm = step(body, "vlm")
    details = vlm["details"]
    assert details["answer"] == "3" and details["raw_score"] == pytest.approx(0.12)
    calibrated = calibrated_confidence(load_calibration(build.vlm_calibration), 0.12, 3)
    assert details["calibrated_score"] == pytest.approx(calibrated) and vlm["score"] == pytest.approx(
        calibrated
    )
    assert calibrated < plan.vlm_accept_threshold and plan.decide_vlm(calibrated) == "review"
    assert vlm["decision"] == "review" and body["decision"] == "review" and body["review_item_id"]
    assert "< accept threshold" in vlm["reason"]


def test_the_accepted_error_through_the_service_is_within_the_certificate(build, held_out):
    """Seeded regression check: for this split, the error among the held-out digits the service
    accepted (cheap tier or VLM) is at most alpha, and the service routes as the plan does."""
    labels, _, scores, bodies = held_out
    plan = build.plan
    decisions = np.array([b["decision"] for b in bodies])
    for body, score in zip(bodies, scores):
        vlm = step(body, "vlm")
        expected = plan.decide(score)
        if expected == "escalate":
            expected = plan.decide_vlm(vlm["details"].get("calibrated_score", math.nan))
        assert body["decision"] == expected
    accepted = decisions == "accept"
    errors = [answered_label(b) != y for b, y, ok in zip(bodies, labels, accepted) if ok]
    accepted_error = float(np.mean(errors))
    assert accepted.mean() > 0.5  # most traffic needs no human
    assert accepted_error <= plan.certificate.alpha, (accepted_error, accepted.sum())
