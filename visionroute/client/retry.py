"""When a call is tried again, and how long the client waits first (tenacity).

Two kinds of failed attempt are sent again:

- "not now": 429 and 503 (the service's, or Ray Serve's own overload answer), after the wait
  their Retry-After names; and a connection that could not be made. The request was not worked
  on, so any call may be sent again.
- "no answer": the attempt may have reached the service and been worked on, but no answer came
  back: a read timeout, a dropped connection, a gateway's 502 or 504, and a 500 that is not the
  service's own error body (Ray Serve's plain-text 500, gRPC INTERNAL/UNKNOWN, when the replica
  died under the request). Only an idempotent call is sent again then: every attempt carries the
  same request id, on which the service keys its budget reservations and review items
  (policies/review/intake.py), so an analyse or a read sent again never charges twice or makes
  a second review item. A claim of the next item or an index write is not: it could take a
  second item. The service's own 500 (its JSON body: a bug) is never retried: it would repeat.

A Retry-After above ``max_retry_after_s`` (a budget whose window resets in an hour) is not
waited out: the error is raised at once with ``retry_after_s``, for the caller to decide.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from visionroute.client.errors import ServiceError, ServiceUnreachable
from visionroute.errors import ConfigError

RETRY_STATUSES = (429, 503)  # not now: any call
RESEND_STATUSES = (500, 502, 504)  # maybe worked on: an idempotent call (a 500: not the service's own)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` in all (1: never retry); without a Retry-After the wait doubles from
    ``backoff_s`` up to ``backoff_max_s``, with jitter."""

    attempts: int = 4
    max_retry_after_s: float = 30.0
    backoff_s: float = 0.25
    backoff_max_s: float = 4.0
    statuses: tuple[int, ...] = RETRY_STATUSES
    resend_statuses: tuple[int, ...] = RESEND_STATUSES

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
        if not isinstance(error, ServiceError):
            return False
        if error.status in self.statuses:
            return error.retry_after_s is None or error.retry_after_s <= self.max_retry_after_s
        if error.status in self.resend_statuses and idempotent:
            return error.status != 500 or error.proxy_answer
        return False

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
