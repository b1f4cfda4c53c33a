"""Model builds a later test needs, started in the background as soon as the run is collected.
(The shared servers themselves start early too, on a thread: tests/support/early_start.py; the
tiny LLaVA is built there, by the vLLM server's start, since its builder takes no lock.)

On a fresh clone the digits LLaVA is trained once (examples/train_digits.py: one to two
minutes of CPU), and its first user, the three-tier digits module, runs minutes into the suite.
Until then the run is mostly tests waiting on servers, with CPU to spare, so the training starts
right after collection in a process of its own and the fixture that needs it
(``digits_llava_dir``) later finds it built, or waits for it under the builder's own file lock
(``examples.vllm_server.ensure_digits_llava`` trains once across processes, swapping the
finished model in). Nothing else changes: a build that fails here is simply built again by the
fixture, which reports the error as it always did.

Only builds that lock against a concurrent build go here (the fixture may ask while one runs).
``VISIONROUTE_TEST_PREFETCH=0`` turns this off.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# session fixture -> the build it waits for (run in a process of its own, from the repository root)
BUILDS = {
    "digits_llava_dir": "from examples import vllm_server as v; v.ensure_digits_llava(python=v.ensure_vllm_venv())",
}
REPO_ROOT = Path(__file__).resolve().parents[2]

_started: list[subprocess.Popen] = []


def wanted_builds(items) -> list[str]:
    """The builds some collected test's fixtures wait for, in ``BUILDS`` order."""
    used = {name for item in items for name in getattr(item, "fixturenames", ())}
    return [name for name in BUILDS if name in used]


def _enabled(config: pytest.Config) -> bool:
    if os.environ.get("VISIONROUTE_TEST_PREFETCH", "1") == "0":
        return False
    return not (config.option.collectonly or getattr(config.option, "setuponly", False))


def start_builds(names: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """One background process per build, in a session of its own (so it can be stopped whole)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    for name in names:
        with open(log_dir / f"prefetch-{name}.log", "w") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", BUILDS[name]],
                    cwd=REPO_ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return processes


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    if not _enabled(session.config) or hasattr(session.config, "workerinput"):
        return  # under xdist the controller, which collects nothing, cannot see the fixtures; a
        # worker's build would race its lane's fixture for nothing: the file lock already shares it
    names = wanted_builds(session.items)
    if names:
        from examples.vllm_server import work_dir

        _started.extend(start_builds(names, work_dir() / "logs"))


def pytest_unconfigure(config: pytest.Config) -> None:
    """A build still running when the run ends (a run stopped early, -x) is stopped, not orphaned;
    the builder's lock and its swap-in leave no half-written model behind."""
    while _started:
        process = _started.pop()
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
