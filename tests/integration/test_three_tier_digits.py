"""The three-tier digits cascade end to end: the cheap ONNX tier, a VLM, and human review, through
Ray Serve, with both accept thresholds and the review threshold from the certificate
(``visionroute example digits``, examples/digits.py).

What is asserted holds on any machine, whatever the tiers trained there learned:

- ``digits``: the example as built (``build_example`` at the example's alpha) with the LLaVA
  trained on the digits on a REAL vLLM server. Its plan is whatever the trained tiers make
  certifiable, so the tests check that the service routes every held-out digit exactly as that
  plan does and that the trained VLM answers the digits the cheap tier could not; they never
  assume which thresholds came out.
- ``digits_known``: the same cheap tier and the same build code, but the VLM is a stub with
  KNOWN answers and confidences (``KnownVlm``): it answers ~80% of the digits right with
  confidence in [0.45, 0.99] and the rest wrong with confidence in [0.05, 0.50]. Accepting every
  VLM answer is then far from alpha and reviewing every escalation costs 10x more than a
  VLM threshold, so the certified plan uses all three tiers (a finite VLM threshold, held-out
  digits on both sides of it) by construction. The fault tests send an escalated digit to the same
  cascade while the stub answers 500 or "3" at 0.05 (``injected``): its tier, thresholds and VLM
  replica, no cascade (and no replica) of their own.
- Validity of the certificate, for both: the calibrators stay fitted on the calibration split
  (as the example fits them) and the certification set is redrawn ``N_SPLITS`` times from the
  certification + held-out digits; each redrawn plan violates its promise when its accepted
  error over those digits (the finite population the certification set is drawn from) exceeds
  alpha. Each draw violates with probability at most delta (sampling without replacement makes
  the binomial test conservative), and given the digits the draws are independent, so the count
  of violations is at most Binomial(N_SPLITS, delta): the test allows its 0.999 quantile. One
  split never decides (a valid certificate may miss on one split with probability delta). The
  draws run the build's procedure (``choose_tier_thresholds``) on a coarser candidate grid
  (``N_POINTS``) to stay fast; its guarantee does not depend on the grid.

The same service also serves two photo tasks (``photo_vlm_cascade``: the photo classifier inside
the ingress): ``classify`` escalates to the real server (the digits LLaVA, asked about photos it
was never trained on, so only the protocol, schema and routing are asserted), ``classify_down`` to
a port nothing listens on. A service start is most of what a test here costs: one for the module.

The trained model and its vLLM server are the session fixtures test_vlm_digits.py and
test_vlm_server.py use too (tests/integration/conftest.py); the models are the session's
prepared ones (``prepared_models_dir``: digits_cheap and the photo classifier).
"""

from __future__ import annotations

import base64
import contextlib
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
from scipy.stats import binom

from examples import vllm_server
from examples.digits import (
    ALPHA,
    DELTA,
    TASK,
    build_example,
    cheap_answers,
    cheap_stage,
    digits_vlm_split,
    rendered,
    serve_document,
    vlm_answers,
)
from examples.train_digits import LABELS, SERVED_MODEL_NAME
from tests.integration.serve_process import ServeProcess

pytestmark = [pytest.mark.server, pytest.mark.slow]

KNOWN = f"{TASK}_known"  # the cascade whose VLM answers are known by construction
UNSURE_CONFIDENCE = 0.05  # the "unsure" fault's answer confidence, below every known one
KNOWN_WRONG_SHARE = 0.2
N_SPLITS = 200
N_POINTS = 20  # threshold candidates per tier in the validity draws (the build uses 40: 15x slower)
FALSE_ALARM = 1e-3  # chance that a valid certificate fails the validity test
PHOTO, PHOTO_DOWN = "classify", "classify_down"  # photo tasks: the real server, and a dead port
PHOTO_LABELS = ["astronaut", "bobsled", "football helmet", "rocket", "cat"]


# --------------------------------------------------------------------------- the stub VLMs


def _grey(image_rgb: np.ndarray) -> np.ndarray:
    return np.asarray(image_rgb, np.float32).mean(axis=2).reshape(-1)


class KnownVlm:
    """What the known stub answers for each digit it may be shown: the true label or the next one,
    with a seeded confidence (module docstring). The image arrives as the service sends it (a
    JPEG data URL); it is matched to the nearest rendered digit."""

    def __init__(self, images_rgb: list[np.ndarray], labels: np.ndarray, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        n = len(labels)
        self.pixels = np.stack([_grey(image) for image in images_rgb])
        wrong = rng.uniform(size=n) < KNOWN_WRONG_SHARE
        self.answers = np.where(wrong, (labels + 1) % 10, labels)
        self.confidences = np.where(wrong, rng.uniform(0.05, 0.50, n), rng.uniform(0.45, 0.99, n))

    def answer(self, data_url: str) -> tuple[str, float]:
        encoded = data_url.split(",", 1)[1]
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))
        nearest = int(((self.pixels - _grey(image)) ** 2).sum(axis=1).argmin())
        return str(int(self.answers[nearest])), float(self.confidences[nearest])


def _image_url(body: dict) -> str:
    for message in body.get("messages", []):
        for part in message.get("content") or []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                return part["image_url"]["url"]
    raise ValueError("no image in the request")


class _StubVlm(BaseHTTPRequestHandler):
    """``KnownVlm``'s answer; while a fault is injected (``injected``), "fail": HTTP 500, "unsure":
    "3" at ``UNSURE_CONFIDENCE``."""

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
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        if self.server.fault == "fail":
            self._send(500, {"error": {"message": "injected fault", "type": "InternalServerError"}})
            return
        if self.server.fault == "unsure":
            answer, confidence = "3", UNSURE_CONFIDENCE
        else:
            answer, confidence = self.server.known.answer(_image_url(body))
        pieces = [('{"label":"', 0.0), (answer, math.log(confidence)), ('"}', 0.0)]
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
                        "message": {"role": "assistant", "content": "".join(p for p, _ in pieces)},
                        "logprobs": {"content": logprobs},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
            },
        )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def split():
    return digits_vlm_split()


@pytest.fixture(scope="module")
def stub_server(split):
    pool = np.concatenate([split.calibration, split.certification, split.held_out])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubVlm)
    server.known = KnownVlm(rendered(split.images[pool]), split.labels[pool])
    server.fault = None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def stub_vlm(stub_server):
    return f"http://127.0.0.1:{stub_server.server_address[1]}"


@contextlib.contextmanager
def injected(stub_server, fault: str):
    """The known stub answers with ``fault`` ("fail" or "unsure") inside the block. Only the fault
    tests send to the known cascade then (the held-out traffic has been answered)."""
    stub_server.fault = fault
    try:
        yield
    finally:
        stub_server.fault = None


@pytest.fixture(scope="module")
def digits_vllm(digits_vllm_server):
    return digits_vllm_server, vllm_server.model_version(digits_vllm_server.model_dir)


def photo_vlm_cascade(endpoint: str, **overrides) -> dict:
    """The photo classifier inside the ingress, escalating to the VLM at ``endpoint``: the digits
    LLaVA asked about photos it was never trained on, so only the protocol, schema and routing
    are asserted on it (``test_an_escalated_photo_...``, ``test_a_vlm_that_is_down_...``)."""
    return {
        "tier": {"model": "efficientnet_lite0"},
        "placement": "ingress",
        # The astronaut photo (top-1 0.28) falls between these: it escalates.
        "policy": {"version": "classify-vlm-v1", "accept_threshold": 0.7, "escalate_threshold": 0.1},
        "vlm": {
            "endpoint": endpoint,
            "model": SERVED_MODEL_NAME,
            "labels": PHOTO_LABELS,
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
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("three-tier")


@pytest.fixture(scope="module")
def builds(digits_vllm, stub_vlm, prepared_models_dir, work):
    """The example built against the real vLLM server, and against the known stub."""
    running, version = digits_vllm
    # prepared_models_dir holds digits_cheap and the photo classifier the classify tasks use
    common = {"models_dir": prepared_models_dir, "alpha": ALPHA, "delta": DELTA}
    real = build_example(
        work / "real",
        vlm_endpoint=running.base_url,
        vlm_model=running.model,
        vlm_model_version=version,
        **common,
    )
    known = build_example(
        work / "known",
        vlm_endpoint=f"{stub_vlm}/known/v1",
        vlm_model=SERVED_MODEL_NAME,
        vlm_model_version="known-confidences",
        **common,
    )
    return {TASK: real, KNOWN: known}


@pytest.fixture(scope="module")
def service(builds, digits_vllm, stub_vlm, work):
    """One ``serve run`` for every test here: the two digits cascades (the example's config) and
    the photo classifier's ``classify`` / ``classify_down`` tasks (``photo_vlm_cascade``)."""
    from tests.support.ports import free_port

    running, version = digits_vllm
    document = serve_document(
        builds[TASK],
        http_port=0,
        vlm_endpoint=running.base_url,
        vlm_model=running.model,
        vlm_model_version=version,
    )
    args = document["applications"][0]["args"]
    known = serve_document(
        builds[KNOWN],
        http_port=0,
        vlm_endpoint=f"{stub_vlm}/known/v1",
        vlm_model=SERVED_MODEL_NAME,
        vlm_model_version="known-confidences",
    )["applications"][0]["args"]["cascades"][TASK]
    args["cascades"][KNOWN] = known
    dead_endpoint = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here
    args["cascades"][PHOTO] = photo_vlm_cascade(running.base_url)
    args["cascades"][PHOTO_DOWN] = photo_vlm_cascade(
        dead_endpoint, request_timeout_s=5.0, total_timeout_s=5.0
    )

    def use_example_config(config: dict) -> None:
        config.pop("grpc_options", None)
        args["review"]["path"] = str(work / "review")
        config["applications"] = document["applications"]

    process = ServeProcess(
        work, builds[TASK].models_dir, {"retrieval": {"enabled": False}}, use_example_config
    )
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


def answered_label(body: dict) -> int:
    return int(max(body["answer"], key=lambda a: a["confidence"])["label"])


@pytest.fixture(scope="module")
def held_out_images(split):
    return rendered(split.images[split.held_out])


ACCEPTED_SAMPLE = 60  # cheap accepts sent through the service beside every other held-out digit


@pytest.fixture(scope="module")
def held_out(builds, service, split, held_out_images):
    """Held-out digits through each cascade of the service (8 at a time): per cascade, (labels,
    cheap scores, response bodies, images, positions in the held-out split) of every digit the
    plan does not accept at the cheap tier (the escalations and reviews, where the tiers differ)
    and of ``ACCEPTED_SAMPLE`` cheap accepts (the most confident among them, then a seeded
    sample), aligned by position."""
    labels = split.labels[split.held_out]
    rng = np.random.default_rng(0)
    out = {}
    for task, build in builds.items():
        scores, _ = cheap_answers(cheap_stage(build.models_dir, build.cheap_calibration), held_out_images)
        cheap_accepts = np.flatnonzero(scores >= build.plan.accept_threshold)
        ranked = cheap_accepts[np.argsort(-scores[cheap_accepts])]
        sampled = rng.permutation(ranked[5:])[: ACCEPTED_SAMPLE - 5]
        chosen = np.sort(
            np.concatenate([np.flatnonzero(scores < build.plan.accept_threshold), ranked[:5], sampled])
        )
        images = [held_out_images[i] for i in chosen]
        with ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(lambda image, t=task: analyze(service, image, t), images))
        out[task] = (labels[chosen], scores[chosen], bodies, images, chosen)
    return out


def answers_in_traces(held_out_of_task) -> dict[int, tuple[float, int]]:
    """{position in the held-out split: (raw confidence, class id)} of the digits the service's
    VLM answered: the same request (image bytes, prompt, schema) ``vlm_answers`` sends, to the
    same server at temperature 0, so its answer is the one ``vlm_answers`` would get."""
    _, _, bodies, _, chosen = held_out_of_task
    answers = {}
    for position, body in zip(chosen, bodies):
        vlm = step(body, "vlm")
        details = {} if vlm is None or vlm["error"] is not None else vlm["details"]
        if details.get("answer") not in LABELS or details.get("raw_score") is None:
            continue  # not escalated, or no valid answer: vlm_answers asks again
        answers[int(position)] = (float(details["raw_score"]), LABELS.index(details["answer"]))
    return answers


@pytest.fixture(scope="module")
def held_out_outcomes(builds, digits_vllm, stub_vlm, split, held_out_images, held_out):
    """Per cascade, the held-out digits' ``TierOutcomes`` as the build computes them for the
    calibration and certification digits: calibrated scores, and whether each tier is wrong.
    The VLM's answers to the digits the service escalated are read from its traces (the same
    requests to the same server: ``answers_in_traces``); only the others are asked here."""
    from cascades.calibration import load_calibration
    from policies.risk_control import TierOutcomes

    running, version = digits_vllm
    endpoints = {
        TASK: (running.base_url, running.model, version),
        KNOWN: (f"{stub_vlm}/known/v1", SERVED_MODEL_NAME, "known-confidences"),
    }
    labels = split.labels[split.held_out]
    out = {}
    for task, build in builds.items():
        cheap_score, cheap_predicted = cheap_answers(
            cheap_stage(build.models_dir, build.cheap_calibration), held_out_images
        )
        raw, predicted = np.full(len(labels), np.nan), np.full(len(labels), -1, np.int64)
        known = answers_in_traces(held_out[task])
        for position, (score, answer) in known.items():
            raw[position], predicted[position] = score, answer
        asked = np.array([i for i in range(len(labels)) if i not in known], np.int64)
        raw[asked], predicted[asked] = vlm_answers(*endpoints[task], [held_out_images[i] for i in asked])
        answered = ~np.isnan(raw)
        strong_score = np.full(len(labels), np.nan)
        strong_score[answered] = load_calibration(build.vlm_calibration).calibrate_scores(
            raw[answered], predicted[answered]
        )
        out[task] = TierOutcomes(cheap_score, cheap_predicted != labels, predicted != labels, strong_score)
    return out


# --------------------------------------------------------------------------- the plans


def accepted(plan, outcomes) -> np.ndarray:
    """Which items the plan accepts without a human (the cheap tier's answer or the VLM's): the
    rule of ``TierPlan.decide`` then ``decide_vlm``, over arrays (held equal to them below)."""
    score = outcomes.cheap_score
    cheap_ok = score >= plan.accept_threshold
    escalated = (score >= plan.review_threshold) & ~cheap_ok
    if plan.vlm_accept_threshold is None:
        return cheap_ok | escalated
    with np.errstate(invalid="ignore"):  # NaN (no VLM answer) >= t is False: review
        vlm_ok = outcomes.strong_score >= plan.vlm_accept_threshold
    return cheap_ok | (escalated & vlm_ok)


def test_both_certificates_are_feasible_and_carried_by_the_artefacts(builds):
    for build in builds.values():
        plan = build.plan
        assert build.split_sizes == {
            "training": 718,
            "calibration": 270,
            "certification": 270,
            "held_out": 539,
        }
        assert plan.certificate.alpha == ALPHA and plan.certificate.is_feasible
        assert plan.certificate.risk_upper_bound <= plan.certificate.alpha
        assert plan.review_threshold <= plan.accept_threshold
        for path in (build.cheap_calibration, build.vlm_calibration):
            written = json.loads(path.read_text())["certificate"]["three_tier"]
            assert written["vlm_accept_threshold"] == plan.to_dict()["vlm_accept_threshold"]
            assert written["accept_threshold"] == plan.to_dict()["accept_threshold"]


def test_the_known_vlm_plan_uses_all_three_tiers(builds):
    """By construction (module docstring): cheap accepts, escalations, a finite VLM threshold
    with certification digits on both sides of it."""
    plan, outcomes = builds[KNOWN].plan, builds[KNOWN].outcomes["certification"]
    assert plan.review_threshold < plan.accept_threshold < math.inf
    assert plan.vlm_accept_threshold is not None and 0.0 < plan.vlm_accept_threshold < 1.0
    assert plan.rates["accept"] > 0 and plan.rates["escalate"] > 0
    assert plan.rates["vlm_accept"] > 0  # the VLM answers part of the traffic
    escalated = (outcomes.cheap_score >= plan.review_threshold) & (
        outcomes.cheap_score < plan.accept_threshold
    )
    strong = outcomes.strong_score[escalated]
    assert (strong >= plan.vlm_accept_threshold).any() and (strong < plan.vlm_accept_threshold).any()


def test_the_service_routes_every_held_out_digit_as_its_plan(builds, held_out):
    """Both cascades, every held-out digit the cheap tier does not accept and a sample of those it
    does: the service's decision is the certified plan's (the
    cheap tier's calibrated score, then the VLM's calibrated confidence), with the plan's
    thresholds in the trace."""
    for task, (_, scores, bodies, _, _) in held_out.items():
        plan = builds[task].plan
        for body, score in zip(bodies, scores):
            policy, vlm = step(body, "policy:thresholds"), step(body, "vlm")
            assert policy["score"] == pytest.approx(score, abs=1e-5)
            assert policy["decision"] == plan.decide(score), (task, policy)
            expected = plan.decide(score)
            if expected == "escalate":
                assert vlm is not None and vlm["details"]["calibration"]  # the artefact id
                expected = plan.decide_vlm(vlm["details"].get("calibrated_score", math.nan))
                assert vlm["decision"] == expected
            else:
                assert vlm is None
            assert body["decision"] == expected, (task, body["trace"])
            assert (body["review_item_id"] is not None) == (expected == "review")


def test_an_easy_digit_is_accepted_by_the_cheap_tier(builds, held_out):
    labels, scores, bodies, _, _ = held_out[KNOWN]
    plan = builds[KNOWN].plan
    easy = [i for i in np.argsort(-scores) if scores[i] >= plan.accept_threshold][:5]
    assert easy, "no held-out digit reaches the certified cheap accept threshold"
    for i in easy:
        body = bodies[i]
        policy = step(body, "policy:thresholds")
        assert body["decision"] == "accept" and policy["decision"] == "accept", policy
        assert step(body, "vlm") is None
        assert policy["threshold"]["accept"] == pytest.approx(min(1.0, plan.accept_threshold))
        assert answered_label(body) == labels[i]


def test_the_trained_vlm_answers_the_digits_the_cheap_tier_could_not(builds, held_out_outcomes):
    """The real LLaVA on vLLM, on the fifth of the held-out digits the cheap tier is least sure
    of: it answers them (valid labels), and right more often than the cheap tier does."""
    outcomes = held_out_outcomes[TASK]
    hardest = np.argsort(outcomes.cheap_score)[: len(outcomes) // 5]
    answered = ~np.isnan(outcomes.strong_score[hardest])
    assert answered.mean() > 0.9
    vlm_right = float((~outcomes.strong_error[hardest]).mean())
    cheap_right = float((~outcomes.cheap_error[hardest]).mean())
    assert vlm_right > max(0.6, cheap_right), (vlm_right, cheap_right)


def test_an_escalated_digit_reaches_the_real_vlm(builds, held_out):
    """In the ``digits`` cascade every escalated digit is answered by the real server through the
    service's VLM client: answer, raw and calibrated confidence in the trace."""
    _, scores, bodies, _, _ = held_out[TASK]
    plan = builds[TASK].plan
    escalated = [b for b, s in zip(bodies, scores) if plan.decide(s) == "escalate"]
    for body in escalated:
        vlm = step(body, "vlm")
        if vlm["error"] is None:
            details = vlm["details"]
            assert details["answer"] in [str(d) for d in range(10)]
            assert 0.0 <= details["raw_score"] <= 1.0
            assert vlm["score"] == pytest.approx(details["calibrated_score"])


def test_a_low_confidence_vlm_answer_goes_to_review_and_a_confident_one_is_answered(builds, held_out):
    """Held-out digits escalated to the known VLM: those whose calibrated VLM confidence is below
    the certified VLM threshold go to a human, with the reason and the threshold in the trace;
    those at or above it are answered by the VLM. Both happen by construction."""
    _, scores, bodies, _, _ = held_out[KNOWN]
    plan = builds[KNOWN].plan
    threshold = plan.vlm_accept_threshold
    escalated = [(b, step(b, "vlm")) for b, s in zip(bodies, scores) if plan.decide(s) == "escalate"]
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


def _escalated_image(builds, held_out):
    _, scores, _, images, _ = held_out[KNOWN]
    plan = builds[KNOWN].plan
    return images[next(i for i, s in enumerate(scores) if plan.decide(s) == "escalate")]


def test_a_failing_vlm_sends_the_escalation_to_review(builds, held_out, stub_server, service):
    with injected(stub_server, "fail"):
        body = analyze(service, _escalated_image(builds, held_out), task=KNOWN)
    vlm = step(body, "vlm")
    assert vlm["decision"] == "review" and vlm["error"] and vlm["details"]["status_code"] == 500
    assert body["decision"] == "review" and body["review_item_id"]


def test_a_low_confidence_vlm_answer_is_judged_by_the_certified_threshold(
    builds, held_out, stub_server, service
):
    """The stub answers "3" at 0.05, below every confidence the known VLM was certified on: the
    service calibrates it with the VLM's artefact and compares it with the certificate's VLM
    threshold: below it, so a human reviews it."""
    from cascades.calibration import load_calibration
    from cascades.vlm.calibration import calibrated_confidence

    plan = builds[KNOWN].plan
    with injected(stub_server, "unsure"):
        body = analyze(service, _escalated_image(builds, held_out), task=KNOWN)
    vlm = step(body, "vlm")
    details = vlm["details"]
    assert details["answer"] == "3" and details["raw_score"] == pytest.approx(UNSURE_CONFIDENCE)
    calibrated = calibrated_confidence(load_calibration(builds[KNOWN].vlm_calibration), UNSURE_CONFIDENCE, 3)
    assert details["calibrated_score"] == pytest.approx(calibrated)
    assert vlm["score"] == pytest.approx(calibrated)
    assert calibrated < plan.vlm_accept_threshold and plan.decide_vlm(calibrated) == "review"
    assert vlm["decision"] == "review" and body["decision"] == "review" and body["review_item_id"]
    assert "< accept threshold" in vlm["reason"]


# --------------------------------------------------------------------------- photos to the real server


def analyze_photo(service: ServeProcess, image: bytes, task: str = PHOTO) -> dict:
    response = httpx.post(
        service.url + "/v1/analyze",
        files={"image": ("a.png", image, "image/png")},
        data={"task": task},
        timeout=180,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_an_escalated_photo_gets_a_vlm_answer_with_tokens_cost_and_latency(service, photos_png):
    body = analyze_photo(service, photos_png["astronaut"])
    stages = [step["stage"] for step in body["trace"]["steps"]]
    assert stages[:4] == ["input", "onnx:classify", "policy:thresholds", "vlm"], stages
    escalation, vlm = body["trace"]["steps"][2], body["trace"]["steps"][3]
    assert escalation["decision"] == "escalate"
    assert vlm["error"] is None, vlm
    assert vlm["model"] == SERVED_MODEL_NAME and vlm["latency_ms"] > 0
    assert vlm["details"]["prompt_tokens"] > 0 and vlm["details"]["completion_tokens"] > 0
    assert vlm["cost_units"] > 0 and body["cost_units"] == pytest.approx(1.0 + vlm["cost_units"])
    assert vlm["decision"] == "accept" and body["decision"] == "accept"
    assert body["answer"][0]["label"] in PHOTO_LABELS  # the schema holds even off the model's task
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
    coffee = analyze_photo(service, photos_png["coffee"])
    assert "vlm" not in [s["stage"] for s in coffee["trace"]["steps"]]


def test_a_vlm_that_is_down_sends_escalations_to_review_with_the_reason(service, photos_png):
    body = analyze_photo(service, photos_png["astronaut"], task=PHOTO_DOWN)
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


# --------------------------------------------------------------------------- validity


def violations_over_splits(build, held_out_outcomes, *, n_splits: int = N_SPLITS, seed: int = 0):
    """(violations, draws, feasible draws): the certification set redrawn ``n_splits`` times from
    the certification + held-out digits, each plan certified as the build certifies (ordered on
    the calibration split) and judged on all of those digits (module docstring)."""
    from policies.risk_control import TierCosts, TierOutcomes, choose_tier_thresholds

    certification = build.outcomes["certification"]
    population = TierOutcomes(
        *(
            np.concatenate([getattr(certification, f), getattr(held_out_outcomes, f)])
            for f in ("cheap_score", "cheap_error", "strong_error", "strong_score")
        )
    )
    n_certify = len(certification)
    rng = np.random.default_rng(seed)
    violations = feasible = 0
    for _ in range(n_splits):
        certify = rng.permutation(len(population))[:n_certify]
        plan = choose_tier_thresholds(
            build.outcomes["calibration"],
            population.subset(certify),
            costs=TierCosts(),
            alpha=ALPHA,
            delta=DELTA,
            n_points=N_POINTS,
        )
        feasible += plan.certificate.is_feasible
        ok = accepted(plan, population)
        risk = float(population.cheap_error[ok & (population.cheap_score >= plan.accept_threshold)].sum())
        risk += float(population.strong_error[ok & (population.cheap_score < plan.accept_threshold)].sum())
        violations += bool(ok.any() and risk / ok.sum() > ALPHA)
    return violations, n_splits, feasible


@pytest.mark.parametrize("task", [TASK, KNOWN])
def test_the_certificate_holds_over_many_certification_draws(task, builds, held_out_outcomes):
    violations, n, feasible = violations_over_splits(builds[task], held_out_outcomes[task])
    allowed = int(binom.ppf(1 - FALSE_ALARM, n, DELTA))
    assert violations <= allowed, f"{violations} of {n} draws violated alpha {ALPHA} (allowed {allowed})"
    assert feasible > n // 2  # the check is not vacuous: most draws certify a plan that accepts


def test_the_array_rule_is_the_plans_rule(builds, held_out_outcomes):
    """``accepted`` (used by the validity test) decides as ``TierPlan.decide`` / ``decide_vlm``."""
    for task, build in builds.items():
        plan, outcomes = build.plan, held_out_outcomes[task]
        expected = []
        for score, strong in zip(outcomes.cheap_score, outcomes.strong_score):
            decision = plan.decide(score)
            if decision == "escalate":
                decision = plan.decide_vlm(strong)
            expected.append(decision == "accept")
        assert accepted(plan, outcomes).tolist() == expected
