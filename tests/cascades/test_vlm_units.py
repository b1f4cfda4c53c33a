"""The VLM tier's pure parts: config, prompts and schemas, answer parsing, logprob confidence,
error classification, and the stage's routing over a scripted backend. No server here (see
tests/integration/test_vlm_server.py for the real vLLM server)."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import openai
import pytest
from pydantic import ValidationError

from cascades.vlm import VlmConfig, VlmStage
from cascades.vlm.client import VlmBackendError, VlmCompletion, _classify_error, completion_from_response
from cascades.vlm.confidence import TokenLogprob, span_confidence
from cascades.vlm.prompts import TASKS, InvalidAnswer, parse_answer, response_format
from visionroute.records import Analysis, Decision, Detections

LABELS = ("cat", "dog", "coffee cup")


def classify_config(**overrides) -> VlmConfig:
    return VlmConfig(labels=LABELS, **overrides)


def tokens_for(content: str, pieces: list[str], logprobs: list[float]) -> tuple[TokenLogprob, ...]:
    assert "".join(pieces) == content
    return tuple(TokenLogprob(p, lp, p.encode()) for p, lp in zip(pieces, logprobs))


# -- config ------------------------------------------------------------------------------------


def test_config_rejects_unknown_keys_and_names_the_field():
    with pytest.raises(ValidationError, match="endpoit"):
        VlmConfig(labels=LABELS, endpoit="http://x/v1")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": ("cat",)}, "at least 2 labels"),
        ({"labels": ("cat", "cat")}, "unique"),
        ({"labels": LABELS, "request_timeout_s": 10, "total_timeout_s": 5}, "total_timeout_s"),
        ({"labels": LABELS, "backend": "in_process"}, "in_process"),
        ({"labels": LABELS, "endpoint": "127.0.0.1:8000"}, "endpoint"),
    ],
)
def test_config_cross_field_rules(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        VlmConfig(**kwargs)


def test_non_classify_tasks_need_no_labels():
    assert VlmConfig(task="read_text").labels == ()


# -- prompts, schema, parsing ----------------------------------------------------------------


def test_response_format_is_a_strict_json_schema_with_the_label_enum():
    rf = response_format(classify_config())
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    schema = rf["json_schema"]["schema"]
    assert schema["properties"]["label"]["enum"] == list(LABELS)
    assert schema["required"] == ["label"] and schema["additionalProperties"] is False


def test_every_task_prompt_names_its_json_key():
    context = {"label": "dog", "confidence": 0.4}
    for name, spec in TASKS.items():
        config = VlmConfig(task=name, labels=LABELS)
        assert f'"{spec.answer_key}"' in spec.prompt(config, context)


@pytest.mark.parametrize(
    "content",
    ['{"label":"dog"}', '{ "label" : "dog" }', '{\n  "label": "dog"\n}'],
)
def test_parse_answer_finds_the_value_span(content):
    answer, (start, end) = parse_answer(classify_config(), content)
    assert answer == "dog" and content[start:end] == "dog"


def test_parse_answer_span_with_escapes_and_unicode():
    config = VlmConfig(task="read_text", max_text_chars=50)
    content = json.dumps({"text": 'Caf\u00e9 "No" 5\u20ac'}, ensure_ascii=False)
    answer, (start, end) = parse_answer(config, content)
    assert answer == 'Café "No" 5€'
    assert json.loads('"' + content[start:end] + '"') == answer


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "empty output"),
        ('{"label":"do', "not JSON"),
        ('{"label":"wolf"}', "not one of"),
        ('{"label":"dog","extra":1}', "exactly the key"),
        ('["dog"]', "exactly the key"),
        ('{"label":3}', "must be a string"),
    ],
)
def test_parse_answer_rejects_invalid_output(content, message):
    with pytest.raises(InvalidAnswer, match=message):
        parse_answer(classify_config(), content)


# -- confidence from logprobs ------------------------------------------------------------------


def test_joint_confidence_uses_only_the_answer_tokens():
    content = '{"label":"cat"}'
    tokens = tokens_for(
        content, ['{"', "label", '":', '"', "c", "at", '"}'], [-5, -5, -5, 0.0, -1.0, -0.5, -5]
    )
    _, span = parse_answer(classify_config(), content)
    assert span_confidence(content, tokens, span, "joint") == pytest.approx(math.exp(-1.5))


def test_per_token_confidence_is_the_geometric_mean():
    content = '{"text":"abcd"}'
    tokens = tokens_for(content, ['{"text":"', "ab", "cd", '"}'], [0.0, -1.0, -3.0, 0.0])
    _, span = parse_answer(VlmConfig(task="read_text"), content)
    assert span_confidence(content, tokens, span, "per_token") == pytest.approx(math.exp(-2.0))


def test_empty_text_is_scored_by_the_closing_quote():
    content = '{"text":""}'
    tokens = tokens_for(content, ['{"text":"', '"', "}"], [0.0, -0.7, 0.0])
    _, span = parse_answer(VlmConfig(task="read_text"), content)
    assert span_confidence(content, tokens, span, "per_token") == pytest.approx(math.exp(-0.7))


def test_byte_offsets_handle_multibyte_text_and_pieces_without_bytes():
    content = '{"text":"é€"}'
    tokens = (
        TokenLogprob('{"text":"', 0.0, b'{"text":"'),
        TokenLogprob("é", -1.0, "é".encode()),
        TokenLogprob("", -2.0, b""),  # vLLM sends partial UTF-8 pieces with no bytes
        TokenLogprob("€", -1.0, "€".encode()),
        TokenLogprob('"}', -9.0, b'"}'),
    )
    _, span = parse_answer(VlmConfig(task="read_text"), content)
    assert span_confidence(content, tokens, span, "joint") == pytest.approx(math.exp(-4.0))


def test_no_logprobs_means_no_confidence():
    assert span_confidence('{"label":"cat"}', (), (10, 13), "joint") is None


# -- error classification ------------------------------------------------------------------


def _status_error(status: int) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = httpx.Response(status, request=request, json={"error": {"message": "boom"}})
    return openai.APIStatusError("boom", response=response, body=None)


@pytest.mark.parametrize(
    "status, kind, retryable",
    [
        (500, "server_error", True),
        (503, "server_error", True),
        (429, "rate_limited", True),
        (400, "bad_request", False),
        (404, "bad_request", False),
    ],
)
def test_status_codes_map_to_kinds_and_only_transient_ones_retry(status, kind, retryable):
    error = _classify_error(_status_error(status))
    assert (error.kind, error.is_retryable, error.status_code) == (kind, retryable, status)


def test_a_non_json_body_is_a_malformed_response_not_a_crash():
    with pytest.raises(VlmBackendError) as caught:
        completion_from_response("<html>oops</html>", attempts=1, latency_ms=1.0)
    assert caught.value.kind == "malformed_response" and not caught.value.is_retryable


# -- the stage over a scripted backend ---------------------------------------------------------


class ScriptedBackend:
    """Returns a fixed completion or raises a fixed error: the stage's routing, isolated."""

    def __init__(self, result):
        self.result = result
        self.requests = []

    def complete(self, request):
        self.requests.append(request)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def completion(content: str, pieces: list[str], logprobs: list[float], finish_reason="stop") -> VlmCompletion:
    return VlmCompletion(
        content, finish_reason, tokens_for(content, pieces, logprobs), 100, len(pieces), "m", 1, 5.0
    )


def analysis_with(probabilities=(0.45, 0.35, 0.2)) -> Analysis:
    image = np.zeros((32, 48, 3), np.uint8)
    detections = Detections.from_class_probabilities(
        np.array(probabilities), LABELS, width=48, height=32, top_k=3
    )
    return Analysis(image, "0" * 64, "classify", detections=detections)


def test_confident_consistent_answer_accepts_and_replaces_the_answer():
    backend = ScriptedBackend(completion('{"label":"dog"}', ['{"label":"', "dog", '"}'], [0.0, -0.1, 0.0]))
    stage = VlmStage(
        classify_config(cost_per_1k_prompt_tokens=2.0, cost_per_1k_completion_tokens=4.0), backend
    )
    result = stage.run(analysis_with())
    step = result.trace.steps[-1]
    assert step.stage == "vlm" and step.decision is Decision.ACCEPT, step.reason
    assert step.score == pytest.approx(math.exp(-0.1))
    assert step.cost_units == pytest.approx(100 * 2.0 / 1000 + 3 * 4.0 / 1000)
    assert step.details["prompt_tokens"] == 100 and step.details["disagreement"] == pytest.approx(
        0.10, abs=1e-6
    )
    assert result.detections.labels == ["dog"] and result.detections.confidence[0] == pytest.approx(
        math.exp(-0.1)
    )
    # the request carried the image as a data URL and the schema as response_format
    (request,) = backend.requests
    parts = request.messages[0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert request.response_format["json_schema"]["schema"]["properties"]["label"]["enum"] == list(LABELS)
    json.dumps(result.trace.to_dict())  # the trace stays JSON-serialisable (review queue stores it)


def test_disagreeing_with_a_sure_cheap_tier_goes_to_review():
    backend = ScriptedBackend(
        completion('{"label":"coffee cup"}', ['{"label":"', "coffee cup", '"}'], [0, -0.01, 0])
    )
    result = VlmStage(classify_config(disagreement_margin=0.3), backend).run(analysis_with((0.69, 0.3, 0.01)))
    step = result.trace.steps[-1]
    assert step.decision is Decision.REVIEW and "disagrees" in step.reason
    assert result.detections.labels[0] == "cat"  # the cheap answer stays until a human decides


def test_unsure_answer_goes_to_review():
    backend = ScriptedBackend(completion('{"label":"cat"}', ['{"label":"', "cat", '"}'], [0, -2.0, 0]))
    step = VlmStage(classify_config(accept_threshold=0.5), backend).run(analysis_with()).trace.steps[-1]
    assert step.decision is Decision.REVIEW and "< accept threshold" in step.reason


def test_output_cut_at_max_tokens_is_invalid_and_says_so():
    backend = ScriptedBackend(
        completion('{"label":"ca', ['{"label":"', "ca"], [0, 0], finish_reason="length")
    )
    step = VlmStage(classify_config(), backend).run(analysis_with()).trace.steps[-1]
    assert (
        step.decision is Decision.REVIEW
        and "max_tokens" in step.reason
        and step.error.startswith("invalid_output")
    )


@pytest.mark.parametrize(
    "kind", ["timeout", "connection", "server_error", "malformed_response", "circuit_open"]
)
def test_backend_faults_become_review_steps_with_the_reason(kind):
    backend = ScriptedBackend(VlmBackendError(f"{kind} happened", kind=kind, attempts=3))
    result = VlmStage(classify_config(), backend).run(analysis_with())
    step = result.trace.steps[-1]
    assert step.decision is Decision.REVIEW and step.error.startswith(kind)
    assert step.details["failure"] == kind and step.details["attempts"] == 3 and step.cost_units == 0.0
    assert kind in step.reason


def test_an_unexpected_exception_still_ends_in_review():
    step = (
        VlmStage(classify_config(), ScriptedBackend(RuntimeError("bug"))).run(analysis_with()).trace.steps[-1]
    )
    assert step.decision is Decision.REVIEW and "RuntimeError" in step.error


def test_verify_crops_the_most_confident_box_and_a_no_drops_it():
    image = np.zeros((100, 100, 3), np.uint8)
    detections = Detections(
        np.array([[10, 10, 30, 30], [50, 50, 90, 70]]), np.array([0.4, 0.6]), np.array([0, 1]), ("cat", "dog")
    )
    backend = ScriptedBackend(completion('{"verdict":"no"}', ['{"verdict":"', "no", '"}'], [0, -0.05, 0]))
    stage = VlmStage(
        VlmConfig(task="verify", image_format="png", crop_padding=0.0, disagreement_margin=0.5), backend
    )
    result = stage.run(Analysis(image, "0" * 64, "detect", detections=detections))
    step = result.trace.steps[-1]
    assert step.decision is Decision.ACCEPT, step.reason
    assert step.details["row"] == 1 and step.details["xyxy"] == [50.0, 50.0, 90.0, 70.0]
    assert "dog" in backend.requests[0].messages[0]["content"][1]["text"]
    assert result.detections.labels == ["cat"]


def test_verify_without_detections_is_invalid_not_a_crash():
    backend = ScriptedBackend(AssertionError("must not be called"))
    step = (
        VlmStage(VlmConfig(task="verify"), backend)
        .run(Analysis(np.zeros((8, 8, 3), np.uint8), "0", "detect"))
        .trace.steps[-1]
    )
    assert step.decision is Decision.REVIEW and "needs a detection" in step.reason and backend.requests == []
