"""One prompt template, JSON schema and answer parser per VLM task.

The schema goes to the server as ``response_format`` (vLLM structured outputs), so the model can
only emit JSON of that shape; the parser still checks it, because a server (or a proxy) can send
anything. ``TASKS`` is keyed by the names ``VlmConfig.task`` accepts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from json.decoder import scanstring
from typing import Any

from cascades.vlm.config import VlmConfig


class InvalidAnswer(ValueError):
    """The model's output is not a valid answer for the task (what it is and what was expected)."""


@dataclass(frozen=True)
class TaskSpec:
    answer_key: str  # the JSON field holding the answer; its tokens give the confidence
    prompt: Callable[[VlmConfig, dict[str, Any]], str]  # (config, context) -> user text
    schema: Callable[[VlmConfig], dict[str, Any]]
    allowed: Callable[[VlmConfig], tuple[str, ...] | None]  # the closed answer set, if any
    # "joint": probability of the whole answer (closed sets); "per_token": geometric mean per
    # token, so long and short readings of free text are comparable.
    confidence: str


def _object_schema(key: str, value_schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {key: value_schema},
        "required": [key],
        "additionalProperties": False,
    }


TASKS: dict[str, TaskSpec] = {
    "classify": TaskSpec(
        answer_key="label",
        prompt=lambda config, _: (
            "Classify the main subject of this image. Choose exactly one label from this list: "
            + ", ".join(json.dumps(label) for label in config.labels)
            + '. Reply with JSON only: {"label": "<one label from the list>"}.'
        ),
        schema=lambda config: _object_schema("label", {"type": "string", "enum": list(config.labels)}),
        allowed=lambda config: config.labels,
        confidence="joint",
    ),
    "verify": TaskSpec(
        answer_key="verdict",
        prompt=lambda _, context: (
            f"A detector says this image region shows a {context['label']!s} "
            f"(detector confidence {context['confidence']:.2f}). Is that correct? "
            'Reply with JSON only: {"verdict": "yes"} or {"verdict": "no"}.'
        ),
        schema=lambda _: _object_schema("verdict", {"type": "string", "enum": ["yes", "no"]}),
        allowed=lambda _: ("yes", "no"),
        confidence="joint",
    ),
    "read_text": TaskSpec(
        answer_key="text",
        prompt=lambda _, __: (
            "Read all the text in this image exactly as written, in reading order. "
            'Reply with JSON only: {"text": "<the text>"}; use an empty string if there is no text.'
        ),
        schema=lambda config: _object_schema("text", {"type": "string", "maxLength": config.max_text_chars}),
        allowed=lambda _: None,
        confidence="per_token",
    ),
}


def response_format(config: VlmConfig) -> dict[str, Any]:
    """The OpenAI ``response_format`` that makes vLLM decode only schema-valid JSON."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": f"visionroute_{config.task}",
            "schema": TASKS[config.task].schema(config),
            "strict": True,
        },
    }


def parse_answer(config: VlmConfig, content: str | None) -> tuple[str, tuple[int, int]]:
    """The answer and its character span in ``content`` (inside the quotes), or InvalidAnswer."""
    spec = TASKS[config.task]
    if not content:
        raise InvalidAnswer("empty output; expected a JSON object")
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        raise InvalidAnswer(f"output is not JSON ({exc.msg} at char {exc.pos}): {content[:80]!r}") from None
    if not isinstance(data, dict) or set(data) != {spec.answer_key}:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise InvalidAnswer(f"expected an object with exactly the key {spec.answer_key!r}, got {got}")
    answer = data[spec.answer_key]
    if not isinstance(answer, str):
        raise InvalidAnswer(f"{spec.answer_key!r} must be a string, got {type(answer).__name__}")
    allowed = spec.allowed(config)
    if allowed is not None and answer not in allowed:
        raise InvalidAnswer(f"{spec.answer_key}={answer!r} is not one of {list(allowed)}")
    if config.task == "read_text" and len(answer) > config.max_text_chars:
        raise InvalidAnswer(f"text has {len(answer)} chars; the limit is {config.max_text_chars}")
    return answer, _value_span(content, spec.answer_key)


def _value_span(content: str, key: str) -> tuple[int, int]:
    """Where the (only) key's string value sits in the JSON text, without its quotes."""
    decoder = json.JSONDecoder()
    # The object has exactly one key, so the first string after '{' is that key.
    position = content.index("{") + 1
    while content[position].isspace():
        position += 1
    _, position = scanstring(content, position + 1)  # past the key
    position = content.index(":", position) + 1
    while content[position].isspace():
        position += 1
    _, end = decoder.raw_decode(content, position)
    return position + 1, end - 1
