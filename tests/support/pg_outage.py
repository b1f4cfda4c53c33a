"""A PostgreSQL outage on a short clock, for the tests that stop the session's server.

Two waits made those tests slow without proving anything more: each refused request waits the
pool's whole connect timeout (``StateConfig.connect_timeout_s``, 1-2 s, often twice per
request), and once the server is back the pool retries on psycopg_pool's backoff (1 s, then 2, 4,
8 s), so a test waited out a retry scheduled seconds after the server had returned. The outage
still happens (the server is stopped and started), every refusal is still the same
StateUnavailable, and the pool still reconnects by itself: only the clock is shorter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

# How long a request waits for a connection in an outage test. Not shorter: before the outage the
# store's first request waits for the pool's first connection, which a loaded 2-core machine can
# take a few hundred milliseconds to open.
OUTAGE_CONNECT_TIMEOUT_S = 0.5


@pytest.fixture
def quick_reconnect(monkeypatch):
    """psycopg_pool's reconnect backoff starts at 50 ms and grows by half (instead of 1 s, doubling)."""
    from psycopg_pool.base import AttemptWithBackoff

    monkeypatch.setattr(AttemptWithBackoff, "INITIAL_DELAY", 0.05)
    monkeypatch.setattr(AttemptWithBackoff, "DELAY_BACKOFF", 1.5)


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Polls ``check`` every 50 ms until it holds; fails naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(0.05)
