"""How the suite splits over pytest-xdist workers (``VISIONROUTE_TEST_WORKERS=N scripts/test.sh``:
``-n N --dist loadgroup``; the default is one process, see scripts/test.sh).

Most of the suite's time is servers starting and tests waiting on them (Ray Serve, vLLM,
PostgreSQL), which overlap well even on 2 cores. Three rules keep that safe and cheap:

- **A lane per shared server.** Modules that share an expensive session fixture (a running
  service, a vLLM server, the trained digits LLaVA) are one unit of work, so that fixture
  starts once, on one worker, and its "stop after the last user" hook
  (tests/integration/conftest.py) still sees every user. Modules linked through any such
  fixture are one lane (connected components), every other module is a group of its own (its
  module-scoped fixtures run once).
- **Long lanes first.** xdist hands out groups in collection order (``--no-loadscope-reorder``:
  its default orders by test count, which says nothing about time), so lanes with the most
  server tests are collected first and start at once on both workers; the short modules fill in
  behind them.
- **Inside a lane, each server lives only as long as its users**: modules using the no-key
  service first, then those using both services, then the keyed one's (the order the
  integration conftest uses when the suite runs in one process).

Each worker computes the groups while collecting (it sees the fixtures) and writes them beside
its temp dir; the controller's scheduler (``LaneScheduling``, xdist's ``LoadScopeScheduling``
with lanes for scopes) reads them once every worker has collected. (xdist's own ``xdist_group``
mark renames node ids, which pytest 9.2's structured node ids no longer allow.)

Without ``--dist loadgroup`` (a developer's plain ``pytest``) nothing here changes the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Session fixtures worth starting once: each is a server or minutes of work.
LANE_FIXTURES = (
    "default_service",
    "unused_default_service",  # test_golden.py: runs first among default_service's users
    "keyed_service",
    "restartable_service",
    "colour_service",
    "digits_llava_dir",
    "digits_vllm_server",
)


_GROUPS_FILE = "lanes-{worker}.json"


def grouped_run(config: pytest.Config) -> bool:
    return (
        bool(getattr(config.option, "loadgroup", False)) or getattr(config.option, "dist", "") == "loadgroup"
    )


def _module_order_in_lane(fixtures: set[str]) -> tuple[int, int]:
    if "unused_default_service" in fixtures:
        return (0, -1)
    if "default_service" in fixtures:
        return (1 if "keyed_service" in fixtures else 0, int("restartable_service" in fixtures))
    return (2, 0) if "keyed_service" in fixtures else (3, 0)


@pytest.hookimpl(trylast=True)  # after deselection (-m, -k): group what runs
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    worker = getattr(config, "workerinput", {}).get("workerid")
    if not worker or not grouped_run(config) or not items:
        return
    modules: dict[Path, list] = {}
    for item in items:
        modules.setdefault(Path(str(item.path)), []).append(item)
    uses = {
        path: {name for item in its for name in LANE_FIXTURES if name in item.fixturenames}
        for path, its in modules.items()
    }

    # union-find over modules, joined through the fixtures they share
    parent = {path: path for path in modules}

    def root(path: Path) -> Path:
        while parent[path] != path:
            parent[path] = parent[parent[path]]
            path = parent[path]
        return path

    first_user: dict[str, Path] = {}
    for path, fixtures in uses.items():
        for name in fixtures:
            if name in first_user:
                parent[root(path)] = root(first_user[name])
            else:
                first_user[name] = path

    lanes: dict[Path, list[Path]] = {}
    for path in modules:
        lanes.setdefault(root(path), []).append(path)

    def weight(lane: list[Path]) -> tuple[int, int]:
        tests = [item for path in lane for item in modules[path]]
        servers = sum(1 for item in tests if item.get_closest_marker("server"))
        slow = sum(1 for item in tests if item.get_closest_marker("slow"))
        return (-servers, -slow)

    ordered_lanes = sorted(lanes.values(), key=weight)  # stable: collection order among equals
    reordered, groups = [], {}
    for lane in ordered_lanes:
        name = (
            "lane:" + "+".join(sorted({f for path in lane for f in uses[path]}))
            if len(lane) > 1 or uses[lane[0]]
            else None
        )
        for path in sorted(lane, key=lambda p: _module_order_in_lane(uses[p])):
            group = name or str(path.relative_to(config.rootpath))
            for item in modules[path]:
                groups[item.nodeid] = group
                reordered.append(item)
    items[:] = reordered
    # the controller's basetemp is this worker's parent (xdist's workermanage)
    target = config._tmp_path_factory.getbasetemp().parent / _GROUPS_FILE.format(worker=worker)
    target.write_text(json.dumps(groups))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if not grouped_run(config):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        """xdist's scope scheduling with the workers' lanes for scopes."""

        _groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:
                written = sorted(config._tmp_path_factory.getbasetemp().glob(_GROUPS_FILE.format(worker="*")))
                self._groups = json.loads(written[0].read_text()) if written else {}
            return self._groups.get(nodeid) or nodeid.split("::", 1)[0]

    return LaneScheduling(config, log)
