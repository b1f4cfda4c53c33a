"""Per-key rate limits (token buckets) and the lockout of addresses that keep failing to log in.

Both live in the ``Authenticator`` of each ingress replica (router/auth/keys.py), so the HTTP
and the gRPC face share them, and both are per replica: with N ingress replicas a key may
reach N times its rate, and an address locked out by one replica can still try on another
until it is locked out there too. Nothing here ever sees or logs a presented key: buckets are
keyed by the digest of a key that matched, lockouts by the client's address.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from visionroute.errors import BudgetExceeded

log = logging.getLogger("visionroute.security")

MAX_TRACKED_ADDRESSES = 10_000


class RateLimitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_s: float = Field(50.0, gt=0, description="sustained requests per second per key")
    burst: int = Field(100, ge=1, description="requests a key may make at once after being idle")


class LockoutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_failures: int = Field(10, ge=1, description="failed authentications from one address ...")
    window_s: float = Field(60.0, gt=0, description="... within this many seconds lock it out ...")
    cooldown_s: float = Field(300.0, gt=0, description="... for this long (429 with Retry-After)")


class RateLimited(BudgetExceeded):
    """Too many requests for a key, or too many failed logins from an address (429, RESOURCE_EXHAUSTED)."""


def retry_after(seconds: float) -> float:
    return float(max(1, math.ceil(seconds)))


@dataclass
class _Bucket:
    tokens: float
    updated: float


class KeyRateLimiter:
    """One token bucket per key digest: ``burst`` tokens, refilled at ``requests_per_s``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key_sha256: str, limit: RateLimitConfig | None, *, who: str) -> None:
        """Spend one token of the key's bucket, or raise RateLimited with the wait for the next."""
        if limit is None:
            return
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(key_sha256)
            if bucket is None:
                bucket = self._buckets[key_sha256] = _Bucket(float(limit.burst), now)
            bucket.tokens = min(
                float(limit.burst), bucket.tokens + (now - bucket.updated) * limit.requests_per_s
            )
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait = (1.0 - bucket.tokens) / limit.requests_per_s
        raise RateLimited(
            f"the API key {who} is over its rate limit of {limit.requests_per_s:g} requests/s "
            f"(burst {limit.burst}); retry in {wait:.2f} s",
            retry_after_s=retry_after(wait),
            field="x-api-key",
        )


@dataclass
class _Address:
    failures: deque = field(default_factory=deque)
    locked_until: float = 0.0


class Lockout:
    """Lock an address out for ``cooldown_s`` after ``max_failures`` failed authentications
    within ``window_s``. While locked, every credential it presents is refused unchecked,
    so guessing goes no faster with a right key among the wrong ones."""

    def __init__(self, config: LockoutConfig | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._addresses: OrderedDict[str, _Address] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, address: str) -> None:
        if self.config is None:
            return
        now = self.clock()
        with self._lock:
            state = self._addresses.get(address)
            wait = state.locked_until - now if state is not None else 0.0
        if wait > 0:
            raise RateLimited(
                f"too many failed authentications from this address; locked out for another {wait:.0f} s",
                retry_after_s=retry_after(wait),
                field="x-api-key",
            )

    def failed(self, address: str) -> None:
        """Count one failed authentication; lock the address out once it has too many."""
        if self.config is None:
            return
        now = self.clock()
        with self._lock:
            state = self._addresses.pop(address, None) or _Address()
            self._addresses[address] = state  # most recent last
            while len(self._addresses) > MAX_TRACKED_ADDRESSES:
                self._addresses.popitem(last=False)
            state.failures.append(now)
            while state.failures and state.failures[0] <= now - self.config.window_s:
                state.failures.popleft()
            if len(state.failures) < self.config.max_failures:
                return
            state.failures.clear()
            state.locked_until = now + self.config.cooldown_s
        log.warning(
            "locked out client %s for %.0f s after %d failed authentications within %.0f s",
            address,
            self.config.cooldown_s,
            self.config.max_failures,
            self.config.window_s,
        )

    def is_locked(self, address: str) -> bool:
        with self._lock:
            state = self._addresses.get(address)
            return state is not None and state.locked_until > self.clock()
