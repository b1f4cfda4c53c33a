"""A rollout candidate is added to a running deployment with `serve deploy` (Ray Serve's in-place
update): every request sent while the update happens is answered, and the candidate can then be
rolled out without a restart. A real Ray head (`ray start`) on free ports, `serve deploy` twice."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.serve_process import REPO
from tests.router.colour_model import LABELS, solid_png, write_colour_model
from tests.support.ports import free_port

pytestmark = [pytest.mark.server, pytest.mark.slow]
BIN = Path(sys.executable).parent
RED = solid_png((230, 20, 20))


def serve_config(path: Path, port: int, models: Path, review: Path, candidates: dict) -> Path:
    document = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    document["http_options"]["port"] = port
    document.pop("grpc_options", None)
    args = document["applications"][0]["args"]
    model = write_colour_model(models / "colour.onnx")
    tier = {"model": str(model), "decoder": "classifier", "labels": LABELS, "size_hw": 32}
    args.update(
        {
            "models_dir": str(models),
            "default_task": "colour",
            "retrieval": {"enabled": False},
            "review": {**args["review"], "path": str(review)},
            "rollouts": {"refresh_s": 0.2},
            "cascades": {
                "colour": {
                    "tier": {**tier, "cost_units": 1.0},
                    "policy": {"version": "colour-v1", "accept_threshold": 0.9, "escalate_threshold": 0.2},
                    "candidates": {name: {"tier": {**tier, **extra}} for name, extra in candidates.items()},
                }
            },
        }
    )
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def ray_head(tmp_path):
    """``ray start --head --block`` in a session of its own; stopped by killing that session.

    Never ``ray stop``: it stops every Ray process on the machine, so the session's shared
    services (tests/integration/conftest.py) and any other run's clusters would go with it. And a
    temp dir of its own: ``ray start`` writes its address to ``<temp dir>/ray_current_cluster``,
    and with the default /tmp/ray every ``serve run`` (``ray.init()``) on the machine would join
    this head while it runs, or try to reach it after it is gone.
    """
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="vr-ray-")  # short: Ray's socket paths must fit 107 bytes
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "VISIONROUTE_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(REPO),
        "RAY_ADDRESS": f"127.0.0.1:{gcs}",
    }
    log_path = tmp_path / "ray_head.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                "--port",
                str(gcs),
                "--dashboard-port",
                str(dashboard),
                "--dashboard-host",
                "127.0.0.1",
                "--num-cpus",
                "2",
                "--disable-usage-stats",
                "--temp-dir",
                temp_dir,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:  # the head is up when its dashboard (serve deploy's address) answers
            assert head.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, (
                "no Ray head within 180 s:\n" + log_path.read_text(errors="replace")[-3000:]
            )
            try:
                if httpx.get(url + "/api/version", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield env, url
    finally:
        stop_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def session_pids(sid: int) -> list[int]:
    """The processes still in session ``sid`` (/proc: Linux only, like the CI machines)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def stop_session(process: subprocess.Popen) -> None:
    """SIGKILL to the process's whole session (the head, its GCS, raylet, dashboard, workers), as
    ``ray stop --force`` would send to every Ray process here; waits until none is left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while session_pids(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def deploy(env, dashboard: str, config: Path) -> None:
    done = subprocess.run(
        [str(BIN / "serve"), "deploy", "-a", dashboard, str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_serve_deploy_adds_a_candidate_in_place_and_it_rolls_out_without_a_restart(tmp_path, ray_head):
    env, dashboard = ray_head
    port, models, review = free_port(), tmp_path / "models", tmp_path / "review"
    url = f"http://127.0.0.1:{port}"
    deploy(env, dashboard, serve_config(tmp_path / "v1.yaml", port, models, review, {}))
    deadline = time.monotonic() + 300
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.monotonic() < deadline:
            try:
                if (
                    client.post("/v1/analyze", files={"image": ("x.png", RED, "image/png")}).status_code
                    == 200
                ):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        else:
            pytest.fail("the first deploy never answered")
        refused = client.post("/v1/rollouts", json={"task": "colour", "candidate": "cheaper"})
        assert refused.status_code == 400 and refused.json()["field"] == "candidate"

        answers: list = []
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=url, timeout=60) as prober:
                while not stop.is_set():
                    try:
                        answers.append(
                            prober.post(
                                "/v1/analyze", files={"image": ("x.png", RED, "image/png")}
                            ).status_code
                        )
                    except httpx.HTTPError as exc:
                        answers.append(type(exc).__name__)
                    time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            deploy(
                env,
                dashboard,
                serve_config(tmp_path / "v2.yaml", port, models, review, {"cheaper": {"cost_units": 0.5}}),
            )
            while time.monotonic() < deadline:  # the update is done when the new ingress knows the candidate
                started = client.post(
                    "/v1/rollouts",
                    json={"task": "colour", "candidate": "cheaper", "mode": "canary", "fraction": 1.0},
                )
                if started.status_code == 200:
                    break
                time.sleep(0.25)
            assert started.status_code == 200, started.text
            time.sleep(1.0)
        finally:
            stop.set()
            prober.join()
        assert answers and Counter(answers) == Counter({200: len(answers)}), Counter(answers)
        served = client.post("/v1/analyze", files={"image": ("x.png", RED, "image/png")}).json()
        assert [s["details"]["arm"] for s in served["trace"]["steps"] if s["stage"] == "rollout"] == [
            "candidate"
        ]
