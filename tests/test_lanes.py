"""tests/support/lanes.py run for real: pytest with two xdist workers in a subprocess, on modules
that share (or do not share) an expensive session fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]

CONFTEST = """
import json, os, pytest

@pytest.fixture(scope="session")
def default_service():
    # one line per start: the lane must start it once for all its users
    with open("starts.jsonl", "a") as f:
        f.write(json.dumps({"worker": os.environ["PYTEST_XDIST_WORKER"]}) + "\\n")
    return "service"
"""

USER = """
import json, os, pytest

@pytest.mark.server
@pytest.mark.parametrize("n", range(3))
def test_uses_the_service(default_service, n):
    with open("ran.jsonl", "a") as f:
        f.write(json.dumps({"module": __name__, "worker": os.environ["PYTEST_XDIST_WORKER"]}) + "\\n")
"""

LONER = """
import json, os

def test_alone():
    with open("ran.jsonl", "a") as f:
        f.write(json.dumps({"module": __name__, "worker": os.environ["PYTEST_XDIST_WORKER"]}) + "\\n")
"""


@pytest.mark.slow
def test_modules_sharing_a_server_run_on_one_worker_which_starts_it_once(
    pytester: pytest.Pytester, monkeypatch
):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    server: a server test\n")
    pytester.makepyfile(test_a_user=USER, test_b_user=USER, test_c_loner=LONER, test_d_loner=LONER)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    result = pytester.runpytest_subprocess(
        "-p", "tests.support.lanes", "-n", "2", "--dist", "loadgroup", "--no-loadscope-reorder", timeout=120
    )
    result.assert_outcomes(passed=8)

    starts = [json.loads(line) for line in (pytester.path / "starts.jsonl").read_text().splitlines()]
    assert len(starts) == 1, starts
    ran = [json.loads(line) for line in (pytester.path / "ran.jsonl").read_text().splitlines()]
    users = {row["worker"] for row in ran if row["module"].endswith("_user")}
    assert users == {starts[0]["worker"]}  # both users, every test, on the worker that started it
    assert len(ran) == 8
