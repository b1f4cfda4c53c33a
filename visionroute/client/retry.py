"""When a call is tried again, and how long the client waits first (tenacity).

A call is retried when the service said "not now": 429 and 503 (with the wait its Retry-After
names), 502 and 504 (a proxy's or gateway's); and when no answer came. A call that may have
reached the service without an answer (a read timeout, a dropped connection) is retried only if
it is idempotent: every attempt carries the same request id, which the service keys its review
items on (policies/review/intake.py), so an analyse retried after a lost answer never makes a
second review item. A claim or an index write is not retried then: it could take a second item.

A Retry-After above ``max_retry_after_s`` (a budget whose window resets in an hour) is not
waited out: the error is raised at once with ``retry_after_s``, for the caller to decide.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from visionroute.client.errors import ServiceError, ServiceUnreachable
from visionroute.errors import ConfigError

RETRY_STATUSES = (429, 502, 503, 504)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` in all (1: never retry); without a Retry-After the wait doubles from
    ``backoff_s`` up to ``backoff_max_s``, with jitter."""

    attempts: int = 4
    max_retry_after_s: float = 30.0
    backoff_s: float = 0.25
    backoff_max_s: float = 4.0
    statuses: tuple[int, ...] = RETRY_STATUSES

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError(
                f"retry.attempts must be an integer >= 1, got {self.attempts!r}", field="attempts"
            )
        for name in ("max_retry_after_s", "backoff_s", "backoff_max_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value >= 0:
                raise ConfigError(f"retry.{name} must be a number >= 0, got {value!r}", field=name)

    def should_retry(self, error: BaseException, idempotent: bool) -> bool:
        if isinstance(error, ServiceUnreachable):
            return idempotent or not error.sent
        if not isinstance(error, ServiceError) or error.status not in self.statuses:
            return False
        return error.retry_after_s is None or error.retry_after_s <= self.max_retry_after_s

    def wait_s(self, error: BaseException | None, attempt: int) -> float:
        """Seconds before attempt ``attempt + 1``: the service's Retry-After, else backoff."""
        after = getattr(error, "retry_after_s", None)
        if after is not None:
            return float(after)
        backoff = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        return backoff * (0.5 + random.random() / 2)

    def tenacity_kwargs(self, idempotent: bool) -> dict:
        """Arguments for ``tenacity.Retrying`` / ``AsyncRetrying`` for one call."""
        import tenacity

        return {
            "stop": tenacity.stop_after_attempt(self.attempts),
            "retry": tenacity.retry_if_exception(lambda error: self.should_retry(error, idempotent)),
            "wait": lambda state: self.wait_s(state.outcome.exception(), state.attempt_number),
            "reraise": True,  # the last ServiceError itself, not tenacity's RetryError
        }


NO_RETRY = RetryPolicy(attempts=1)
