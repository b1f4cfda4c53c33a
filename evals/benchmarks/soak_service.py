"""The soak's service: the shipped config with the soak's state, replicas, budget and
indexing, started with ``serve run`` in its own session, and the waits for it to serve."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from evals.benchmarks.soak_images import noise_png
from evals.benchmarks.soak_measurements import role_of, session_processes
from evals.benchmarks.soak_options import APP, BUDGET_NAME, BUDGET_WINDOW_S, METERED_TENANT, REPO, SoakOptions
from evals.benchmarks.soak_vlm import (
    VLM_TASK,
    vlm_cascade,
)

# -- the service ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def soak_document(
    models_dir: Path, workdir: Path, options: SoakOptions, vlm_endpoint: str | None = None
) -> dict[str, Any]:
    """The shipped serve_config.yaml with the soak's state, replicas, budget and indexing; with
    ``vlm_endpoint``, a second task whose escalations go to the VLM there."""
    import yaml

    document = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    document["http_options"]["port"] = _free_port()
    document["grpc_options"]["port"] = _free_port()
    args = document["applications"][0]["args"]
    classify = args["cascades"]["classify"]
    classify["num_cpus"] = 0.25
    # random-noise images land between the thresholds: every analysed image is a review item
    classify["policy"] = {**classify["policy"], "accept_threshold": 0.99, "escalate_threshold": 0.0}
    args["cascades"] = {"classify": classify}  # the text tier adds start time, not faults
    if vlm_endpoint is not None:
        args["cascades"][VLM_TASK] = vlm_cascade(classify, vlm_endpoint)
    args["models_dir"] = str(models_dir)
    args["review"] = {"path": str(workdir / "review"), "lease_s": 60}
    args["state"] = {"backend": "postgres", "connect_timeout_s": 3}
    if options.pool_size:
        args["state"].update(pool_min=options.pool_size, pool_max=options.pool_size)
    args["policies"] = {
        "version": "soak-v1",
        "budgets": [
            {
                "name": BUDGET_NAME,
                "tenant": METERED_TENANT,
                "tiers": ["onnx"],
                "window_s": BUDGET_WINDOW_S,
                "cap_units": options.budget_cap_units,
            }
        ],
    }
    retrieval = args["retrieval"]
    retrieval["index_dir"] = str(workdir / "index")
    retrieval["index"] = {"max_staleness_s": 1.0}
    # durable: an analysed image's search id is promised, so a lost one shows
    retrieval["index_queue"] = {"mode": "durable", "max_pending": 1024, "max_batch": 32}
    args["ingress_replicas"] = options.ingress_replicas
    args["ingress_num_cpus"] = 0.25
    args["search_replicas"] = options.search_replicas
    args["search_num_cpus"] = 0.25
    return document


class SoakService:
    """``serve run`` of the soak config in its own session (its pid is the session id every
    replica process carries), on the given PostgreSQL database."""

    def __init__(
        self, models_dir: Path, workdir: Path, dsn: str, options: SoakOptions, vlm_endpoint: str | None = None
    ) -> None:
        import yaml

        self.workdir = workdir
        self.dsn = dsn
        document = soak_document(models_dir, workdir, options, vlm_endpoint)
        self.http_port = document["http_options"]["port"]
        self.grpc_port = document["grpc_options"]["port"]
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_url = f"grpc://127.0.0.1:{self.grpc_port}"
        self.config_path = workdir / "soak_config.yaml"
        self.config_path.write_text(yaml.safe_dump(document))
        self.log_path = workdir / "serve.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300.0) -> SoakService:
        from router.serve_runner import _preexec, child_environment, ready

        env, _ = child_environment(
            {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        )
        env.pop("RAY_ADDRESS", None)
        env.update(
            {
                "RAY_ADDRESS": "local",  # its own Ray: never a cluster another run left on this machine
                "VISIONROUTE_PG_DSN": self.dsn,
                "VISIONROUTE_HOME": str(self.workdir / "home"),
                "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            }
        )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).with_name("serve")), "run", str(self.config_path)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_preexec,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not ready(self.url + "/readyz"):
            if self.process.poll() is not None:
                raise RuntimeError(f"serve run exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the soak service was not ready after {timeout_s:g} s:\n{self.log_tail()}"
                )
            time.sleep(1.0)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # serve run and the local Ray it started
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(text[-lines:])

    def replica_pids(self, deployment: str) -> list[int]:
        return sorted(
            pid
            for pid, cmdline in session_processes(self.process.pid).items()
            if f"ServeReplica:{APP}:" in cmdline and role_of(cmdline) == f"replica:{deployment}"
        )


def wait_until_serving(service: SoakService, deadline_s: float = 180.0) -> float:
    """Seconds until the service answers a review listing and a search with 200 again."""
    import httpx

    started = time.monotonic()
    checks = (
        ("GET", "/v1/review/items", {"params": {"limit": 1}}),
        ("POST", "/v1/search", {"json": {"text": "x", "k": 1}}),
    )
    for method, path, options in checks:
        while True:
            try:
                if httpx.request(method, service.url + path, timeout=30, **options).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > deadline_s:
                raise RuntimeError(f"the service did not serve {method} {path} within {deadline_s:g} s")
            time.sleep(1.0)
    return time.monotonic() - started


def warm_up_analysis(service: SoakService, deadline_s: float = 300.0) -> None:
    """One analysis over each face until it is served: the first pays the cheap tier's and the
    index writer's first calls, which would otherwise stall the traffic's first seconds."""
    from visionroute.client import RetryPolicy, VisionRouteClient

    retry = RetryPolicy(attempts=30, backoff_s=1.0, max_retry_after_s=10.0)
    for url in (service.url, service.grpc_url):
        with VisionRouteClient(url, timeout_s=deadline_s, retry=retry) as client:
            client.analyze(noise_png(2**31), tenant="soak-warm-up")
