"""VisionRoute on a real two-node Ray cluster with its state on a real PostgreSQL.

``ray.cluster_utils.Cluster`` starts two Ray nodes on this machine (each its own raylet with one
CPU and its own custom resource), Serve deploys ``router.app:build_app`` declaratively with
two ingress replicas spread one per node (``max_replicas_per_node: 1``), and every durable
store lives in PostgreSQL (``state.backend: postgres``). Each answer names the node that
served it (``X-VisionRoute-Node``), which is how these tests prove the work really spread.

The tests run in file order and share one cluster: the PostgreSQL restart and the node kill
come last because they disturb it.

The cluster is as light as these claims allow: the classifier runs inside each ingress replica
(``placement: ingress``, the shipped default; no test here is about the tier hop), the head runs
no autoscaler monitor or log monitor (nothing here autoscales or reads worker logs), and the
head's health checks run every 0.5 s, so a killed node is marked dead in about 3 s instead of 15
(a live node still has to miss 5 checks in a row, each with the default 10 s timeout).
"""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

from router.auth.keys import hash_key
from tests.support.ports import free_port
from tests.support.service import warm_up_service

pytestmark = [pytest.mark.server, pytest.mark.slow]

ADMIN = "vr_admin_" + uuid.uuid4().hex
REVIEWERS = {name: f"vr_{name}_" + uuid.uuid4().hex for name in ("ana", "ben")}
NODE_HEADER = "x-visionroute-node"
# Budget windows are aligned to the epoch: the longest one makes a window boundary inside the
# test (which would serve 10 in each window) all but impossible.
BUDGET_WINDOW_S = 366 * 86400
# How often the head's GCS checks each raylet (default 3000): 5 failed checks mark a node dead.
HEALTH_CHECK_PERIOD_MS = 500


def headers(key: str = ADMIN) -> dict[str, str]:
    return {"x-api-key": key}


def noise_png(seed: int, size: int = 64) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class ClusterService:
    def __init__(self, url: str, cluster, worker, schema_dsn: str) -> None:
        self.url = url
        self.cluster = cluster
        self.worker = worker
        self.dsn = schema_dsn

    def analyze(self, seed: int, tenant: str, timeout: float = 120) -> httpx.Response:
        return httpx.post(
            self.url + "/v1/analyze",
            files={"image": ("x.png", noise_png(seed), "image/png")},
            data={"tenant": tenant},
            headers=headers(),
            timeout=timeout,
        )

    def sql(self, query: str, *params) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()


def _app_args(models_dir: str, workdir) -> dict:
    api_keys = [{"sha256": hash_key(ADMIN), "tenant": "ops", "role": "admin", "name": "ops"}]
    api_keys += [
        {"sha256": hash_key(key), "tenant": "ops", "role": "reviewer", "name": name}
        for name, key in REVIEWERS.items()
    ]
    return {
        "models_dir": models_dir,
        "review": {"path": str(workdir / "review"), "lease_s": 120},
        "state": {"backend": "postgres", "connect_timeout_s": 3},
        "cascades": {
            "classify": {
                "tier": {"model": "efficientnet_lite0", "cost_units": 1.0},
                "placement": "ingress",
                # noise images land between the thresholds: every answer is a review item
                "policy": {"version": "classify-v1", "accept_threshold": 0.99, "escalate_threshold": 0.0},
            }
        },
        "policies": {
            "version": "cluster-v1",
            "budgets": [
                {
                    "name": "ten",
                    "tenant": "metered",
                    "tiers": ["onnx"],
                    "window_s": BUDGET_WINDOW_S,
                    "cap_units": 10,
                }
            ],
        },
        "ingress_num_cpus": 0.25,
        # search: two replicas, one per node, each its own FAISS copy following PostgreSQL
        "retrieval": {
            "enabled": True,
            "index_dir": str(workdir / "index"),
            "index": {"max_staleness_s": 1.0},
        },
        "search_replicas": 2,
        "search_num_cpus": 0.25,
        "security": {"api_keys": api_keys, "session": {"secret_file": str(workdir / "session_secret")}},
    }


@pytest.fixture(scope="module")
def cluster_service(prepared_models_dir, tmp_path_factory, postgres_server):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    workdir = tmp_path_factory.mktemp("cluster")
    dsn = postgres_server.create_database("cluster")
    previous = os.environ.get("VISIONROUTE_PG_DSN")
    os.environ["VISIONROUTE_PG_DSN"] = dsn  # every node's workers inherit it, as on a real cluster
    # On one machine only one node's proxy can own the HTTP port, and a proxy prefers replicas on
    # its own node; a real cluster has a proxy per node behind a load balancer. Turning the
    # preference off lets the one proxy spread requests over both nodes, as the balancer would.
    os.environ["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"node_a": 1},
            "include_dashboard": False,
            "no_monitor": True,
            "include_log_monitor": False,
            "_system_config": {"health_check_period_ms": HEALTH_CHECK_PERIOD_MS},
        },
    )
    # The head wrote its address to /tmp/ray/ray_current_cluster, where any other process's bare
    # ray.init() on this machine would find it and join this cluster (another test run, an xdist
    # worker): it would deploy its Serve app here. Everything here connects by address: drop it.
    from ray._common.utils import reset_ray_address

    reset_ray_address()
    try:
        worker = cluster.add_node(num_cpus=1, resources={"node_b": 1})
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        app = {
            "name": "visionroute",
            "route_prefix": "/",
            "import_path": "router.app:build_app",
            "args": _app_args(str(prepared_models_dir), workdir),
            "deployments": [
                {"name": "Ingress", "num_replicas": 2, "max_replicas_per_node": 1},
                {"name": "search", "max_replicas_per_node": 1},
            ],
        }
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
        deadline = time.monotonic() + 300
        status = "?"
        while time.monotonic() < deadline:
            time.sleep(0.25)
            app_status = serve.status().applications.get("visionroute")
            status = app_status.status if app_status else "?"
            if status == "RUNNING":
                break
        assert status == "RUNNING", f"the app did not start on the cluster: {status}"
        service = ClusterService(f"http://127.0.0.1:{port}", cluster, worker, dsn)
        warm_up_service(service.url, search=True, headers=headers(), deadline_s=300)
        yield service
    finally:  # also when the set-up failed: no cluster outlives the module
        _remove_cluster(cluster)
        os.environ.pop("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", None)
        if previous is None:
            os.environ.pop("VISIONROUTE_PG_DSN", None)
        else:
            os.environ["VISIONROUTE_PG_DSN"] = previous


def _remove_cluster(cluster) -> None:
    """Every process of the cluster killed, and the driver's Serve client forgotten.

    ``serve.shutdown()`` alone stops each deployment gracefully, one after another (2 s or more
    each, 5 s for a replica still pending after the node kill): 10-13 s spent on a cluster that
    is removed next. With its controller killed first, it only forgets the client, so a later
    module's ``serve`` calls start afresh.
    """
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    if ray.is_initialized():
        try:
            ray.kill(ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE), no_restart=True)
        except ValueError:  # Serve never started
            pass
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def _served_or_refused(
    service: ClusterService, seed: int, tenant: str, deadline_s: float = 240
) -> tuple[httpx.Response, int]:
    """Send one analyze request until it is served or refused: a 503 (a busy or restarting
    backend, which says when to come back) is retried. The answer and how many 503s came first."""
    deadline = time.monotonic() + deadline_s
    unavailable = 0
    while True:
        answer = service.analyze(seed, tenant)
        if answer.status_code != 503:
            return answer, unavailable
        unavailable += 1
        assert "retry-after" in answer.headers, answer.headers
        assert time.monotonic() < deadline, f"still 503 after {deadline_s} s: {answer.text}"
        time.sleep(min(float(answer.headers["retry-after"]), 2.0))


def test_fifty_requests_over_two_nodes_spend_a_ten_unit_budget_exactly(cluster_service):
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda i: _served_or_refused(cluster_service, 100 + i, "metered"), range(50)))
    answers = [answer for answer, _ in results]
    unexpected = [(a.status_code, a.text[:300]) for a in answers if a.status_code not in (200, 429)]
    assert not unexpected, unexpected  # never a 500, never an auth or input error
    served = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    # every 429 is this budget's refusal (not a rate limit) and says when the window resets
    assert {a.json()["field"] for a in refused} <= {"budget:ten"}, [a.json() for a in refused]
    assert all(1 <= int(a.headers["retry-after"]) <= BUDGET_WINDOW_S for a in refused)
    assert (len(served), len(refused)) == (10, 40), f"{len(served)} served, {len(refused)} refused"
    nodes = {a.headers.get(NODE_HEADER) for a in answers}
    assert len(nodes - {None}) == 2, f"answers came from {nodes}: the ingress replicas did not spread"
    charged = cluster_service.sql(
        "SELECT COALESCE(SUM(units), 0), COUNT(*) FROM visionroute_budgets.reservations WHERE budget = 'ten'"
    )[0]
    assert (float(charged[0]), charged[1]) == (10.0, 10)  # the ledger charged exactly what was served
    retried = sum(n for _, n in results)
    print(f"\nbudget over two nodes: 10 served, 40 refused, {retried} 503s retried on the way")


def test_two_reviewers_on_two_nodes_never_hold_one_item(cluster_service):
    # Pairs of simultaneous claims until one pair was served by the two nodes (the proxy picks a
    # replica per request, and a busy replica is skipped for a while: 8 pairs once all went to
    # one node); every pair, on one node or two, must give one claim and one 409.
    across_nodes = 0
    for seed in range(500, 540):
        if across_nodes >= 1 and seed >= 508:
            break
        item = cluster_service.analyze(seed, "ops").json()["review_item_id"]
        barrier = threading.Barrier(2)

        def claim(name: str, item_id: str = item, barrier: threading.Barrier = barrier) -> httpx.Response:
            barrier.wait()
            return httpx.post(
                cluster_service.url + "/v1/review/claim",
                json={"reviewer": name, "item_id": item_id},
                headers=headers(REVIEWERS[name]),
                timeout=60,
            )

        with ThreadPoolExecutor(max_workers=2) as pool:
            answers = list(pool.map(claim, REVIEWERS))
        assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
        across_nodes += len({a.headers.get(NODE_HEADER) for a in answers}) == 2
        events = httpx.get(
            f"{cluster_service.url}/v1/review/items/{item}/audit", headers=headers(), timeout=60
        ).json()["events"]
        assert [e["action"] for e in events].count("claim") == 1
    assert across_nodes >= 1, "no claim pair was served by two different nodes"


def test_an_item_indexed_through_one_node_is_found_through_the_other_within_the_bound(cluster_service):
    import base64

    bound_s = 1.0  # retrieval.index.max_staleness_s
    image = noise_png(900, size=96)
    added = httpx.post(
        cluster_service.url + "/v1/search/items",
        json={"image_base64": base64.b64encode(image).decode(), "metadata": {"tenant": "ops", "tags": ["x"]}},
        headers=headers(),
        timeout=120,
    )
    assert added.status_code == 200, added.text
    item_id, writer_node = added.json()["id"], added.headers[NODE_HEADER]
    time.sleep(bound_s)  # the bound: from now on every replica on every node must find it
    nodes = set()
    # every search after the bound must find it; searches go on until one was served through the
    # other node (the proxy's choice of replica: once 12 in a row went to the writer's node)
    for attempt in range(60):
        if attempt >= 12 and nodes - {writer_node}:
            break
        answer = httpx.post(
            cluster_service.url + "/v1/search",
            json={"image_base64": base64.b64encode(image).decode(), "k": 3},
            headers=headers(),
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        assert item_id in [hit["id"] for hit in answer.json()["hits"]], answer.json()
        nodes.add(answer.headers[NODE_HEADER])
    assert nodes - {writer_node}, "no search was served through the other node"
    stats = httpx.get(cluster_service.url + "/v1/search/stats", headers=headers(), timeout=60).json()
    assert stats["backend"] == "postgres" and stats["lag_ops"] >= 0


@dataclass
class Sent:
    """One request of a load: when it was sent and answered, and its answer (or transport error)."""

    started: float
    ended: float
    answer: httpx.Response | httpx.HTTPError


class Load:
    """Analyse requests from 4 threads until ``stop()``; every answer (or transport error) kept in
    ``sent`` as it comes, so a test waits for what it needs to have seen instead of sleeping."""

    def __init__(self, service: ClusterService, tenant: str, seed0: int) -> None:
        self.sent: list[Sent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._worker, args=(service, tenant, seed0 + n * 10_000), daemon=True)
            for n in range(4)
        ]
        for thread in self._threads:
            thread.start()

    def _worker(self, service: ClusterService, tenant: str, seed: int) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                answer = service.analyze(seed, tenant, timeout=60)
            except httpx.HTTPError as error:
                answer = error
            with self._lock:
                self.sent.append(Sent(started, time.monotonic(), answer))
            seed += 1

    def wait_for(self, what: str, enough, timeout_s: float = 120) -> None:
        """Until ``enough(sent)`` holds (polled every 0.1 s); fails naming ``what`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                sent = list(self.sent)
            if enough(sent):
                return
            if time.monotonic() > deadline:
                self._stop.set()
                raise AssertionError(f"{what}: not within {timeout_s:g} s ({len(sent)} answers)")
            time.sleep(0.1)

    def stop(self) -> list[Sent]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in self._threads), "the load did not stop: a request hung"
        return self.sent


def served(s: Sent) -> bool:
    return isinstance(s.answer, httpx.Response) and s.answer.status_code == 200


def _assert_each_present_once(service: ClusterService, sent: list[Sent], since: float) -> None:
    """Every acknowledged item (a 200 with its review item id) is stored exactly once; a missing
    one is named with when it was sent and answered (seconds after ``since``)."""
    acknowledged = {
        s.answer.json()["review_item_id"]: s
        for s in sent
        if isinstance(s.answer, httpx.Response) and s.answer.status_code == 200
    }
    assert acknowledged, "nothing was acknowledged"
    rows = service.sql(
        "SELECT id, COUNT(*) FROM visionroute_review.items WHERE id = ANY(%s) GROUP BY id", list(acknowledged)
    )
    stored = {row[0]: row[1] for row in rows}
    wrong = {
        item: (stored.get(item, 0), round(s.started - since, 1), round(s.ended - since, 1))
        for item, s in acknowledged.items()
        if stored.get(item) != 1
    }
    assert not wrong, (
        f"{len(wrong)} of {len(acknowledged)} acknowledged items (copies, sent s, answered s): {wrong}"
    )


def test_postgres_restart_under_load_answers_503_never_500_and_loses_nothing(
    cluster_service, postgres_server
):
    load = Load(cluster_service, "ops", 20_000)
    load.wait_for("served before the restart", lambda sent: sum(map(served, sent)) >= 4)
    restarted_at = time.monotonic()
    postgres_server.restart(down_s=4)
    back_at = time.monotonic()
    # until requests sent after PostgreSQL is back are served again (a few, as the load runs)
    load.wait_for(
        "served again after the restart",
        lambda sent: sum(served(s) for s in sent if s.started > back_at) >= 4,
    )
    sent = load.stop()
    result = [s.answer for s in sent]
    responses = [a for a in result if isinstance(a, httpx.Response)]
    statuses = {a.status_code for a in responses}
    assert statuses <= {200, 503}, statuses
    assert 503 in statuses, "the outage never showed: the restart did not overlap the load"
    assert all("retry-after" in a.headers for a in responses if a.status_code == 503)
    _assert_each_present_once(cluster_service, sent, since=restarted_at)


def test_a_worker_node_killed_under_load_loses_no_acknowledged_item(cluster_service):
    import ray

    load = Load(cluster_service, "ops", 40_000)
    load.wait_for("served before the kill", lambda sent: sum(map(served, sent)) >= 4)
    killed_at = time.monotonic()
    worker_id = cluster_service.worker.node_id
    cluster_service.cluster.remove_node(cluster_service.worker, allow_graceful=False)  # kill -9 its processes
    deadline = killed_at + 120
    while any(n["NodeID"] == worker_id and n["Alive"] for n in ray.nodes()):
        assert time.monotonic() < deadline, "Ray never marked the killed node dead"
        time.sleep(0.2)
    dead_at = time.monotonic()  # the cluster knows: from here on every request gets an answer
    # Load after that for at least 4 s and 12 answers (was a fixed 6 s or more), so the
    # surviving node's answers, and any wrong one, show.
    load.wait_for(
        "answers to requests sent after the node was marked dead",
        lambda sent: time.monotonic() - dead_at >= 4 and sum(s.started >= dead_at for s in sent) >= 12,
    )
    sent = load.stop()

    def described(s: Sent) -> tuple:  # (sent, ended: s after the kill; status or error; body)
        answer = s.answer
        outcome = answer.status_code if isinstance(answer, httpx.Response) else repr(answer)
        body = answer.text[:200] if isinstance(answer, httpx.Response) else ""
        return round(s.started - killed_at, 1), round(s.ended - killed_at, 1), outcome, body

    def served_or_unavailable(s: Sent) -> bool:  # unavailable: 503 with when to come back
        answer = s.answer
        return isinstance(answer, httpx.Response) and (
            answer.status_code == 200 or (answer.status_code == 503 and "retry-after" in answer.headers)
        )

    def died_in_flight(s: Sent) -> bool:
        """No answer (the client timed out), or Ray Serve's own 500 (plain text, not a project
        error): what a request gets when the replica serving it is killed mid-request."""
        answer = s.answer
        if not isinstance(answer, httpx.Response):
            return True
        return answer.status_code == 500 and "json" not in answer.headers.get("content-type", "")

    served_before = [s for s in sent if s.ended < killed_at and served_or_unavailable(s)]
    assert served_before, "no request was answered before the kill: the load never ran"
    # Sent once Ray had marked the node dead: served, or 503 with Retry-After. Never a 500,
    # never unanswered.
    wrong = [described(s) for s in sent if s.started >= dead_at and not served_or_unavailable(s)]
    assert not wrong, (
        f"answers to requests sent after the node was marked dead {dead_at - killed_at:.1f} s after"
        f" the kill (sent s, ended s, status, body): {wrong}"
    )
    # Sent before: a request on the killed node's replicas may have died with them, nothing else.
    before = [s for s in sent if s.started < dead_at and not served_or_unavailable(s)]
    assert all(died_in_flight(s) for s in before), [described(s) for s in before]
    _assert_each_present_once(cluster_service, sent, since=killed_at)
    # the surviving node serves; until it does, every answer is a 503 with Retry-After
    deadline = time.monotonic() + 120
    while True:
        answer = Sent(time.monotonic(), time.monotonic(), cluster_service.analyze(77_777, "ops"))
        assert served_or_unavailable(answer), described(answer)
        if answer.answer.status_code == 200:
            break
        assert time.monotonic() < deadline, "the service did not recover on the surviving node"
        time.sleep(0.25)
    later = [Sent(0, 0, cluster_service.analyze(78_000 + i, "ops")) for i in range(8)]
    assert all(s.answer.status_code == 200 for s in later), [described(s) for s in later]
    print(
        f"\nnode kill: {len(sent)} requests, the node marked dead {dead_at - killed_at:.1f} s after the kill;"
        " died with the node (sent s, ended s, status, body): "
        f"{[described(s) for s in before]}"
    )
