"""The exit hook in tests/conftest.py, run for real: pytest in a subprocess with that conftest
loaded ends with pytest's final exit code, taken after the whole session (the terminal summary
and every hook after the tests included), and skips the interpreter's teardown, except in an
xdist worker, which ends normally. And a missing server or browser (``missing_server``) is a skip,
or a failure under VISIONROUTE_REQUIRE_SERVERS=1 (scripts/test.sh's full run)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")
TEARDOWN_MARKER = "interpreter-teardown-ran"
# Registered by the inner test module: it runs only if the interpreter's own teardown does.
PROBE = f"""
import atexit
from pathlib import Path

atexit.register(lambda: Path({TEARDOWN_MARKER!r}).write_text("yes"))
"""


@pytest.fixture
def inner(pytester: pytest.Pytester):
    """A fresh directory holding tests/conftest.py as its conftest; ``run(test_source, *args)``
    runs pytest there in a subprocess (the hook ends the process, so never in this one)."""
    pytester.makeconftest(CONFTEST.read_text())

    def run(test_source: str, *args: str, plugin: str | None = None) -> pytest.RunResult:
        pytester.makepyfile(test_inner=PROBE + test_source)
        if plugin is not None:
            pytester.makepyfile(late_plugin=plugin)
            args = ("-p", "late_plugin", *args)
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=120)

    run.teardown_ran = lambda: (pytester.path / TEARDOWN_MARKER).exists()
    return run


def test_a_passing_run_exits_0_after_its_summary_and_skips_the_interpreter_teardown(inner):
    result = inner("def test_ok():\n    assert True\n")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*1 passed*"])  # the summary was written before the exit
    assert not inner.teardown_ran(), "the hook did not end the process: the native teardown ran"


def test_a_failing_run_exits_1(inner):
    result = inner("def test_ok():\n    assert True\n\ndef test_bad():\n    assert 1 == 2\n")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(["*1 failed, 1 passed*"])
    assert not inner.teardown_ran()


def test_no_tests_collected_keeps_pytests_own_code(inner):
    result = inner("")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED, result.stdout.str()


def test_a_session_fixture_failing_at_teardown_fails_the_run(inner):
    source = """
import pytest

@pytest.fixture(scope="session")
def server():
    yield
    raise RuntimeError("server did not stop")

def test_uses_it(server):
    pass
"""
    result = inner(source)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(["*1 passed, 1 error*"])


@pytest.mark.parametrize(
    "hook",
    [
        # raised while the terminal summary is written: after every test passed and after
        # pytest_sessionfinish has seen exit status 0 (the old hook exited 0 here)
        "def pytest_terminal_summary(terminalreporter):\n    raise RuntimeError('summary broke')\n",
        "import pytest\n\n@pytest.hookimpl(trylast=True)\n"
        "def pytest_sessionfinish(session):\n    raise RuntimeError('late sessionfinish broke')\n",
        "def pytest_unconfigure(config):\n    raise RuntimeError('unconfigure broke')\n",
    ],
    ids=["terminal-summary", "sessionfinish", "unconfigure"],
)
def test_a_failure_raised_after_the_tests_passed_fails_the_run(inner, hook):
    result = inner("def test_ok():\n    assert True\n", plugin=hook)
    assert result.ret != 0, result.stdout.str() + result.stderr.str()
    assert "broke" in result.stdout.str() + result.stderr.str()


def test_pytest_exit_with_a_code_in_a_late_hook_is_the_exit_code(inner):
    hook = "import pytest\n\ndef pytest_sessionfinish(session):\n    pytest.exit('stop', returncode=7)\n"
    result = inner("def test_ok():\n    assert True\n", plugin=hook)
    assert result.ret == 7, result.stdout.str() + result.stderr.str()


def test_an_xdist_worker_is_left_to_end_normally(inner):
    # a real worker (-n 1): its interpreter teardown runs (the marker), the controller still exits 0
    result = inner("def test_ok():\n    assert True\n", "-n", "1")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*1 passed*"])
    assert inner.teardown_ran(), "the hook ended an xdist worker's process itself"


@pytest.mark.parametrize("required, code", [("", 0), ("0", 0), ("1", 1)])
def test_a_missing_server_skips_or_under_require_servers_fails(inner, monkeypatch, required, code):
    monkeypatch.setenv("VISIONROUTE_REQUIRE_SERVERS", required)
    result = inner("def test_needs_it(missing_server):\n    missing_server('no frobnicator here')\n", "-rs")
    assert result.ret == code, result.stdout.str()
    result.stdout.fnmatch_lines(["*no frobnicator here*", "*1 failed*" if code else "*1 skipped*"])
