"""The background model builds (tests/support/prefetch.py): started for the fixtures a run uses,
run to completion on their own, stopped whole when a run ends before them."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

from tests.support import prefetch


def test_only_the_builds_some_collected_test_waits_for_are_wanted():
    items = [
        SimpleNamespace(fixturenames=["tmp_path", "digits_llava_dir"]),
        SimpleNamespace(fixturenames=["default_service"]),
        SimpleNamespace(),  # a collected item without fixtures (a doctest, say)
    ]
    assert prefetch.wanted_builds(items) == ["digits_llava_dir"]
    assert prefetch.wanted_builds(items[1:]) == []


def test_a_build_runs_on_its_own_and_writes_its_log(tmp_path, monkeypatch):
    out = tmp_path / "built.txt"
    monkeypatch.setitem(
        prefetch.BUILDS, "toy_model", f"open({str(out)!r}, 'w').write('built'); print('done')"
    )
    (process,) = prefetch.start_builds(["toy_model"], tmp_path / "logs")
    assert process.wait(timeout=120) == 0
    assert out.read_text() == "built"
    assert (tmp_path / "logs" / "prefetch-toy_model.log").read_text().strip() == "done"


def test_a_build_still_running_at_the_end_of_the_run_is_stopped_with_its_children(tmp_path, monkeypatch):
    pid_file = tmp_path / "child.pid"
    # the build starts a child of its own (as the trainer does) and outlives the run
    build = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(600)"
    )
    monkeypatch.setitem(prefetch.BUILDS, "slow_model", build)
    started = prefetch.start_builds(["slow_model"], tmp_path / "logs")
    monkeypatch.setattr(prefetch, "_started", list(started))
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the build never started its child"
        time.sleep(0.1)
    child = int(pid_file.read_text())

    prefetch.pytest_unconfigure(config=None)

    assert started[0].poll() is not None and prefetch._started == []
    deadline = time.monotonic() + 30
    while _alive(child):
        assert time.monotonic() < deadline, f"the build's child {child} outlived the run"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, its parent not yet reaped) counts as gone
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"
