"""Shared servers started in the background (tests/support/early_start.py): started in order, taken
by their fixtures (errors included), stopped when nobody took them; never when the first test
needs one; and the integration folder runs last so the starts overlap the rest of the suite."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support import early_start


class Server:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log
        log.append(f"start {name}")

    def stop(self) -> None:
        self.log.append(f"stop {self.name}")


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(early_start, "RECIPES", {"a_service": None, "b_service": None, "c_server": None})
    monkeypatch.setattr(early_start, "_futures", {})
    monkeypatch.setattr(early_start, "_thread", None)


def item(*fixtures: str) -> SimpleNamespace:
    return SimpleNamespace(fixturenames=list(fixtures))


def test_only_servers_later_tests_use_are_wanted_and_none_when_the_first_test_uses_one(registry):
    items = [item("tmp_path"), item("b_service"), item("a_service", "b_service")]
    assert early_start.wanted(items) == ["b_service", "a_service"]  # the order of their first users
    assert early_start.wanted([item("a_service"), *items]) == []
    assert early_start.wanted([]) == []


def test_servers_start_in_order_on_one_thread_and_each_fixture_takes_its_own(registry):
    log: list[str] = []
    threads: set[str] = set()

    def start(name):
        def run():
            threads.add(threading.current_thread().name)
            return Server(name, log)

        return run

    early_start.begin([("a_service", start("a")), ("b_service", start("b"))])
    b = early_start.take("b_service")
    a = early_start.take("a_service")
    assert (a.name, b.name) == ("a", "b") and log == ["start a", "start b"]
    assert threads == {"early-server-starts"}
    assert early_start.take("a_service") is None  # taken once; a server never started early: None
    early_start.end()
    assert log == ["start a", "start b"]  # taken servers belong to their fixtures: not stopped here


def test_a_failed_start_is_raised_by_the_fixture_that_takes_it(registry):
    def broken():
        raise RuntimeError("service not ready after 420 s")

    early_start.begin([("a_service", broken)])
    with pytest.raises(RuntimeError, match="not ready"):
        early_start.take("a_service")
    early_start.end()


def test_servers_nobody_took_are_stopped_and_starts_not_begun_are_cancelled(registry):
    log: list[str] = []

    def slow():  # still starting when the run ends (a run stopped by -x)
        b_future = early_start._futures["b_service"]  # begin() made both futures first
        deadline = time.monotonic() + 30
        while not b_future.cancelled() and time.monotonic() < deadline:
            time.sleep(0.01)
        return Server("a", log)

    early_start.begin([("a_service", slow), ("b_service", lambda: Server("b", log))])
    early_start.end()
    assert log == ["start a", "stop a"]  # a finished starting and was stopped; b never began


def test_the_integration_folder_runs_after_everything_else(tmp_path):
    def at(path):
        return SimpleNamespace(path=tmp_path / path)

    items = [
        at("test_a.py"),
        at("integration/test_z.py"),
        at("integration/test_y.py"),
        at("router/test_b.py"),
    ]
    ordered = early_start.integration_last(items, tmp_path / "integration")
    assert [str(i.path.relative_to(tmp_path)) for i in ordered] == [
        "test_a.py",
        "router/test_b.py",
        "integration/test_z.py",  # its own order kept
        "integration/test_y.py",
    ]


def test_early_starts_need_the_memory_to_hold_every_server_at_once(monkeypatch):
    config = SimpleNamespace(option=SimpleNamespace(collectonly=False))
    monkeypatch.delenv("VISIONROUTE_TEST_EARLY_START", raising=False)
    monkeypatch.setattr(early_start, "available_memory_gib", lambda: early_start.MIN_AVAILABLE_GIB + 1)
    assert early_start.enabled(config)
    monkeypatch.setattr(early_start, "available_memory_gib", lambda: early_start.MIN_AVAILABLE_GIB - 1)
    assert not early_start.enabled(config)  # each server then starts when its first user needs it
    monkeypatch.setattr(early_start, "available_memory_gib", lambda: None)  # not Linux: unknown
    assert not early_start.enabled(config)
    monkeypatch.setattr(early_start, "available_memory_gib", lambda: early_start.MIN_AVAILABLE_GIB + 1)
    monkeypatch.setenv("VISIONROUTE_TEST_EARLY_START", "0")
    assert not early_start.enabled(config)


def test_this_machines_free_memory_is_read_or_unknown_where_there_is_no_proc():
    free = early_start.available_memory_gib()
    if not Path("/proc/meminfo").exists():  # not Linux: unknown, so no early starts
        assert free is None
        return
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    assert 0 < free <= total_gib


def test_the_recipes_are_the_integration_servers_with_one_vllm_server_and_each_has_a_lane():
    """What the integration conftest registers: its shared session fixtures, one recipe each, the
    suite's one vLLM server among them, and each a lane fixture (xdist keeps its users together).
    A test module may register a recipe for a fixture of its own (test_soak.py's background
    soak): that fixture lives in the module that registers it, whose tests are its only users."""
    import sys

    from tests.integration import conftest
    from tests.support.lanes import LANE_FIXTURES

    assert set(early_start.RECIPES) >= {"default_service", "keyed_service", "restartable_service"}
    assert [name for name in early_start.RECIPES if "vllm" in name] == ["digits_vllm_server"]
    for name, recipe in early_start.RECIPES.items():
        if recipe.__module__ == conftest.__name__:
            assert name in LANE_FIXTURES and callable(getattr(conftest, name)), name
        else:
            assert callable(getattr(sys.modules[recipe.__module__], name, None)), name
