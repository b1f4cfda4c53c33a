"""Shared servers started in the background while the tests that do not need them run.

The suite runs the integration folder last (tests/conftest.py), after minutes of tests that use
one core and no server. The shared servers its modules wait for (a Ray Serve service with the
shipped config, the keyed one, the vLLM server: each half a minute to a minute to start on 2
cores) are started meanwhile, one after another on a background thread, in the order their first
users run. A server's fixture then takes the one started for it (waiting if it is still starting)
instead of starting it; any error of the start is raised there, as if the fixture had started it.

This module is a pytest plugin (tests/conftest.py loads it). The integration conftest registers a *recipe* per server: called on the main thread with the
pytest request (it may take fixtures: the prepared models, a temp dir), it returns the function
that starts the server, which runs on the background thread. Servers started early but never
taken (a run stopped with -x) are stopped when the session ends.

Only when it helps and is safe: one process (not an xdist worker), at least ``MIN_AVAILABLE_GIB``
of memory free, and the run's first test uses
none of these servers (a developer running one integration module starts them as before, never
under a test that measures load). ``VISIONROUTE_TEST_EARLY_START=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

# server fixture name -> recipe (request -> start function)
RECIPES: dict[str, Callable[[pytest.FixtureRequest], Callable[[], object]]] = {}

_futures: dict[str, Future] = {}
_thread: threading.Thread | None = None


def wanted(items) -> list[str]:
    """The registered servers some collected test uses, in the order of their first users; none
    when the first test already uses one (nothing would run beside the starts)."""
    first_use: dict[str, int] = {}
    for index, item in enumerate(items):
        for name in RECIPES:
            if name in getattr(item, "fixturenames", ()):
                first_use.setdefault(name, index)
    if 0 in first_use.values():
        return []
    return sorted(first_use, key=first_use.get)


def begin(starts: list[tuple[str, Callable[[], object]]]) -> None:
    """Run each start in order on one background thread; each server becomes a future."""
    global _thread
    for name, _ in starts:
        _futures[name] = Future()

    def run() -> None:
        for name, start in starts:
            future = _futures.get(name)
            if future is None or not future.set_running_or_notify_cancel():
                continue  # cancelled: the session ended first
            try:
                log.info("starting %s in the background", name)
                future.set_result(start())
            except BaseException as error:  # raised again by take(), in the fixture
                future.set_exception(error)

    _thread = threading.Thread(target=run, name="early-server-starts", daemon=True)
    _thread.start()


def take(name: str) -> object | None:
    """The server started early as ``name`` (waiting while it starts), or None if none was."""
    future = _futures.pop(name, None)
    return None if future is None else future.result()


def end() -> None:
    """Cancel the starts not begun, wait for the one running, stop every server nobody took."""
    for future in _futures.values():
        future.cancel()
    if _thread is not None:
        _thread.join()
    while _futures:
        _, future = _futures.popitem()
        if future.done() and not future.cancelled() and future.exception() is None:
            future.result().stop()


def integration_last(items: list, folder: Path) -> list:
    """``items`` with those under ``folder`` moved to the end, each part in its own order."""
    inside = [item for item in items if folder in Path(str(item.path)).parents]
    return [item for item in items if folder not in Path(str(item.path)).parents] + inside


# Everything started early is up at once while the rest of the suite runs: three Ray Serve
# services and two vLLM servers took about 10 GiB beside the suite's own 2-3 (2026-12-07, 24 GiB
# machine); the suite now starts one vLLM server (~3 GiB less), and the bar is kept as it was
# measured. A machine with less memory free starts each server when its first user needs it.
MIN_AVAILABLE_GIB = 14.0


def available_memory_gib() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def enabled(config: pytest.Config) -> bool:
    available = available_memory_gib()
    return (
        os.environ.get("VISIONROUTE_TEST_EARLY_START", "1") != "0"
        and not hasattr(config, "workerinput")  # an xdist worker: its lanes order the servers
        and not config.option.collectonly
        and available is not None
        and available >= MIN_AVAILABLE_GIB
    )


INTEGRATION = Path(__file__).resolve().parents[1] / "integration"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """The integration folder runs last, so its servers start while the rest of the suite runs."""
    items[:] = integration_last(items, INTEGRATION)


@pytest.fixture(scope="session", autouse=True)
def _shared_servers_started_early(request):
    """Begin the starts before the first test; end them (stop what nobody took) after the run."""
    names = wanted(request.session.items) if enabled(request.config) else []
    if names:
        begin([(name, RECIPES[name](request)) for name in names])
    try:
        yield
    finally:
        end()
