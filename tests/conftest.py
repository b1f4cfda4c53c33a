"""Fixtures every test folder may use: the prepared default models and real photos."""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

# OpenMP threads (torch's) sleep when idle instead of spinning, as scripts/test.sh sets it, also
# for a bare `pytest`: set before numpy or torch load their thread pools (figures: scripts/test.sh).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# OpenCV's first import saves sys.path, edits it and puts the saved copy back, so a path another
# thread adds meanwhile is lost: Ray's vendored psutil (ray/thirdparty_files) went missing when a
# fixture imported ray while a background thread (early starts, prefetch) first imported cv2
# ("No module named 'psutil'", "partially initialized module 'ray'"). Imported here, on the main
# thread before any test thread runs, it swaps nothing later (80 ms).
import cv2  # noqa: F401
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Ray writes an auth token on first init; without this, later `serve` CLI calls fail.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray's start in tests (issue 21): what no test reads, off for every Ray cluster the suite starts;
# `serve run`, `visionroute serve`, `ray start` and an in-process ray.init all inherit it. Usage
# stats (its reporter and prompt), Ray's own metrics (the service's /metrics is prometheus_client's,
# not Ray's; no test reads Ray's) and task events (the state API's and dashboard's: none used).
# The product keeps Ray's defaults. tests/support/serve_run.py turns the dashboard off for the
# tests' `serve run`; figures there.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_enable_metrics_collection", "0")
os.environ.setdefault("RAY_task_events_report_interval_ms", "0")

# Property tests assert behaviour, never speed: on a busy 2-core CI machine an example may take
# longer than hypothesis's 200 ms default deadline, or generate slowly, without anything wrong.
settings.register_profile(
    "visionroute", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("visionroute")

# How the suite splits over pytest-xdist workers (VISIONROUTE_TEST_WORKERS=N): tests/support/lanes.py.
# (tests/test_exit_hook.py runs copies of this file where the package is not importable.)
try:
    _lanes_found = importlib.util.find_spec("tests.support.lanes") is not None
except ModuleNotFoundError:
    _lanes_found = False
if _lanes_found:
    # and what starts in the background while the suite runs: model builds right after collection
    # (tests/support/prefetch.py), the integration folder's shared servers (early_start.py)
    pytest_plugins = ("tests.support.lanes", "tests.support.prefetch", "tests.support.early_start")


@pytest.fixture(scope="session")
def prepared_models_dir(tmp_path_factory) -> Path:
    """The embedded default models, prepared once per session exactly as the CLI does."""
    from cascades.models import prepare_models

    if "PYTEST_XDIST_WORKER" not in os.environ:
        models_dir = tmp_path_factory.mktemp("models")
        prepare_models(models_dir)
        return models_dir
    # Under xdist the run's workers share one copy (their base temp dirs have one parent): the
    # first to take the lock prepares it (about 15 s of CPU), the others wait and reuse it.
    from filelock import FileLock

    models_dir = tmp_path_factory.getbasetemp().parent / "prepared-models"
    done = models_dir / ".prepared"
    with FileLock(f"{models_dir}.lock"):
        if not done.exists():
            shutil.rmtree(models_dir, ignore_errors=True)  # a worker that died half-way
            models_dir.mkdir()
            prepare_models(models_dir)
            done.touch()
    return models_dir


def photo_rgb(name: str) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def photo_png(name: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(photo_rgb(name)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photos_png() -> dict[str, bytes]:
    return {name: photo_png(name) for name in ("coffee", "chelsea", "astronaut", "camera", "page")}


# A server or browser a test needs (PostgreSQL, Chromium) and cannot find: a skip that says why
# on a developer's machine, a failure where the run must cover everything (scripts/test.sh's
# full run, which CI runs, sets VISIONROUTE_REQUIRE_SERVERS=1).
REQUIRE_SERVERS = "VISIONROUTE_REQUIRE_SERVERS"


def servers_required() -> bool:
    return os.environ.get(REQUIRE_SERVERS, "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail_missing(reason: str) -> NoReturn:
    if servers_required():
        pytest.fail(f"{reason} ({REQUIRE_SERVERS} is set: a missing server fails the run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def missing_server() -> Callable[[str], NoReturn]:
    """``missing_server(reason)``: the test's server or browser is missing; it skips, or fails
    under VISIONROUTE_REQUIRE_SERVERS=1."""
    return skip_or_fail_missing


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL server for the session (visionroute/pg_local.py)."""
    from visionroute import pg_local

    reason = pg_local.available()
    if reason:
        skip_or_fail_missing(f"no PostgreSQL here: {reason}")
    server = pg_local.LocalPostgres()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def state(request):
    """Each store test runs on both backends: None (the embedded SQLite default) and a
    ``StateConfig`` for a fresh PostgreSQL database (``postgres_dsn``)."""
    from visionroute.state import StateConfig

    if request.param == "sqlite":
        return None
    request.getfixturevalue("postgres_dsn")
    return StateConfig(backend="postgres")


@pytest.fixture
def postgres_dsn(postgres_server, monkeypatch) -> str:
    """A fresh, empty database on the session's server, its DSN also in VISIONROUTE_PG_DSN."""
    dsn = postgres_server.create_database()
    monkeypatch.setenv("VISIONROUTE_PG_DSN", dsn)
    return dsn


# -- the exit ---------------------------------------------------------------------------------
# Once pytest has finished (every test, every fixture teardown, the terminal summary, junit
# and cache files, unconfigure), the run's result is final. What is left is the interpreter's
# own teardown, where native libraries that tests loaded in this process (FAISS and OpenMP,
# ONNX Runtime, gRPC, a Ray driver) may still have threads running, and on a loaded machine
# one of them can crash the teardown (CI once saw exit 139 after "635 passed"), which would
# turn a passing run into a failed one. So the process ends with pytest's own final exit code,
# skipping that teardown. The code is taken where pytest returns it (around
# ``pytest_cmdline_main``, which spans the whole session), never earlier: a failure raised in a
# later hook (a session teardown, the summary) still fails the run. An exception out of pytest
# itself is not caught here: Python reports it and exits non-zero. An xdist worker is left alone: its
# controller owns the exit and the channel to it must close normally.


def _in_xdist_worker(config: pytest.Config) -> bool:
    # config.workerinput only: a pytest run from inside a worker (tests/test_exit_hook.py) inherits
    # PYTEST_XDIST_WORKER but is no worker, and must end itself
    return hasattr(config, "workerinput")


def _end_process(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_cmdline_main(config: pytest.Config):
    if _in_xdist_worker(config):
        return (yield)
    code = yield  # an exception out of pytest itself propagates: the run fails as usual
    _end_process(int(code))
