"""The client for a vLLM (or any OpenAI-compatible) chat-completions server.

One ``complete(request)`` call = a concurrency slot, a circuit breaker, and tenacity retries
with jittered exponential back-off for the failures worth retrying (timeouts, dropped
connections, 429, 5xx), all inside one overall deadline. Everything else (400s, a body that is
not a chat completion) fails at once. Failures surface as ``VlmBackendError`` with a ``kind``;
the stage turns them into a review step.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import circuitbreaker
import openai
import tenacity

from cascades.vlm.confidence import TokenLogprob
from cascades.vlm.config import VlmConfig
from visionroute.errors import BackendUnavailable

log = logging.getLogger(__name__)

# Kinds worth another attempt, and kinds that say the backend itself is unwell (they count
# towards opening the circuit). A 400 or a full local queue says neither.
RETRYABLE_KINDS = frozenset({"timeout", "connection", "rate_limited", "server_error"})
BACKEND_FAULT_KINDS = RETRYABLE_KINDS | {"malformed_response"}


class VlmBackendError(BackendUnavailable):
    """The VLM could not give an answer: ``kind`` says why, ``attempts`` how hard we tried."""

    def __init__(self, message: str, *, kind: str, attempts: int = 1, status_code: int | None = None) -> None:
        super().__init__(message, field="vlm")
        self.kind = kind
        self.attempts = attempts
        self.status_code = status_code

    @property
    def is_retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS


@dataclass(frozen=True)
class VlmRequest:
    messages: list[dict[str, Any]]  # OpenAI chat messages (image as a data URL part)
    response_format: dict[str, Any]  # {"type": "json_schema", ...}
    max_tokens: int
    temperature: float


@dataclass(frozen=True)
class VlmCompletion:
    content: str | None
    finish_reason: str | None
    tokens: tuple[TokenLogprob, ...]  # one per generated token; empty when none came back
    prompt_tokens: int
    completion_tokens: int
    model: str
    attempts: int
    latency_ms: float  # all attempts and back-off included


class VlmBackend(Protocol):
    """What the stage needs from a VLM: the OpenAI-server client or the in-process engine."""

    def complete(self, request: VlmRequest) -> VlmCompletion: ...


def _classify_error(exc: BaseException) -> VlmBackendError:
    """Map the openai SDK's exceptions onto our kinds (order matters: subclasses first)."""
    if isinstance(exc, VlmBackendError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return VlmBackendError(f"VLM request timed out: {exc}", kind="timeout")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return VlmBackendError(
            f"cannot reach the VLM server: {type(cause).__name__}: {cause}", kind="connection"
        )
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        kind = "rate_limited" if status == 429 else "server_error" if status >= 500 else "bad_request"
        return VlmBackendError(
            f"VLM server answered HTTP {status}: {exc.message}", kind=kind, status_code=status
        )
    # A 200 whose body is not JSON, or not a chat completion.
    return VlmBackendError(
        f"malformed response from the VLM server: {type(exc).__name__}: {exc}", kind="malformed_response"
    )


def completion_from_response(response: Any, *, attempts: int, latency_ms: float) -> VlmCompletion:
    """Read what we need from an openai ChatCompletion; anything missing is a malformed response."""
    if not hasattr(response, "choices"):  # the SDK returns raw text for a non-JSON content type
        raise VlmBackendError(
            f"malformed response from the VLM server: expected a chat completion, got {str(response)[:120]!r}",
            kind="malformed_response",
        )
    if not response.choices:
        raise VlmBackendError("malformed response from the VLM server: no choices", kind="malformed_response")
    choice = response.choices[0]
    logprobs = getattr(choice, "logprobs", None)
    tokens = tuple(
        TokenLogprob(
            token=item.token,
            logprob=float(item.logprob),
            utf8=bytes(item.bytes) if item.bytes is not None else None,
        )
        for item in ((logprobs.content or []) if logprobs is not None else [])
    )
    usage = response.usage
    return VlmCompletion(
        content=choice.message.content if choice.message is not None else None,
        finish_reason=choice.finish_reason,
        tokens=tokens,
        prompt_tokens=int(usage.prompt_tokens) if usage else 0,
        completion_tokens=int(usage.completion_tokens) if usage else len(tokens),
        model=str(response.model),
        attempts=attempts,
        latency_ms=latency_ms,
    )


class OpenAiVlmClient:
    """Thread-safe; share one per process (it holds the connection pool, slots and breaker)."""

    def __init__(self, config: VlmConfig) -> None:
        self.config = config
        api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        self._openai = openai.OpenAI(
            base_url=config.endpoint,
            api_key=api_key or "EMPTY",  # vLLM accepts any key unless started with --api-key
            max_retries=0,  # tenacity below owns retries
            timeout=openai.Timeout(config.request_timeout_s, connect=config.connect_timeout_s),
        )
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        self.breaker = circuitbreaker.CircuitBreaker(
            failure_threshold=config.breaker_failure_threshold,
            recovery_timeout=config.breaker_recovery_s,
            expected_exception=lambda _type, exc: (
                isinstance(exc, VlmBackendError) and exc.kind in BACKEND_FAULT_KINDS
            ),
            name=f"vlm:{config.endpoint}:{config.model}:{id(self)}",
        )
        self._guarded_complete = self.breaker.decorate(self._complete_with_retries)

    def close(self) -> None:
        self._openai.close()

    def complete(self, request: VlmRequest) -> VlmCompletion:
        try:
            return self._guarded_complete(request)
        except circuitbreaker.CircuitBreakerError:
            raise VlmBackendError(
                f"circuit open after {self.breaker.failure_count} consecutive failed requests "
                f"(last: {self.breaker.last_failure}); next try in {max(0.0, self.breaker.open_remaining):.1f}s",
                kind="circuit_open",
                attempts=0,
            ) from None

    def _complete_with_retries(self, request: VlmRequest) -> VlmCompletion:
        config = self.config
        started = time.monotonic()
        deadline = started + config.total_timeout_s
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(
                lambda exc: isinstance(exc, VlmBackendError) and exc.is_retryable
            ),
            stop=tenacity.stop_after_attempt(config.max_attempts)
            | tenacity.stop_after_delay(config.total_timeout_s),
            wait=tenacity.wait_random_exponential(
                multiplier=config.backoff_initial_s, max=config.backoff_max_s
            ),
            before_sleep=lambda state: log.warning(
                "VLM attempt %d failed (%s); backing off", state.attempt_number, state.outcome.exception()
            ),
            reraise=True,
        )
        attempt = 0
        try:
            for attempt_state in retrying:
                with attempt_state:
                    attempt = attempt_state.retry_state.attempt_number
                    response = self._attempt(request, deadline)
        except VlmBackendError as exc:
            exc.attempts = attempt
            raise
        latency_ms = (time.monotonic() - started) * 1000.0
        try:
            return completion_from_response(response, attempts=attempt, latency_ms=latency_ms)
        except VlmBackendError as exc:
            exc.attempts = attempt
            raise
        except Exception as exc:  # a JSON body that is not shaped like a chat completion
            error = _classify_error(exc)
            error.attempts = attempt
            raise error from exc

    def _attempt(self, request: VlmRequest, deadline: float) -> Any:
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise VlmBackendError(
                f"no time left of total_timeout_s={self.config.total_timeout_s}", kind="timeout"
            )
        if not self._slots.acquire(timeout=min(self.config.queue_timeout_s, remaining_s)):
            raise VlmBackendError(
                f"all {self.config.max_concurrency} VLM request slots stayed busy for "
                f"{self.config.queue_timeout_s}s (max_concurrency)",
                kind="overloaded",
            )
        remaining_s = deadline - time.monotonic()  # waiting for the slot used some of it
        try:
            if remaining_s <= 0:
                raise VlmBackendError(
                    f"no time left of total_timeout_s={self.config.total_timeout_s}", kind="timeout"
                )
            return self._openai.chat.completions.create(
                model=self.config.model,
                messages=request.messages,
                response_format=request.response_format,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                logprobs=True,
                timeout=openai.Timeout(
                    min(self.config.request_timeout_s, remaining_s), connect=self.config.connect_timeout_s
                ),
            )
        except (openai.OpenAIError, json.JSONDecodeError) as exc:
            raise _classify_error(exc) from exc
        finally:
            self._slots.release()
