"""Start the real service the way the README does (`serve run <config>`), on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.ports import free_port
from tests.support.service import warm_up_service

REPO = Path(__file__).resolve().parents[2]


def shipped_args() -> dict[str, Any]:
    """A fresh copy of the VisionRoute args in the shipped serve_config.yaml."""
    return yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]


class ServeProcess:
    """``serve run`` in a subprocess with a copy of serve_config.yaml (port, dirs overridden)."""

    def __init__(
        self,
        workdir: Path,
        models_dir: Path,
        extra_args: dict[str, Any] | None = None,
        edit_config: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.grpc_port = free_port()
        config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
        config["http_options"]["port"] = self.port
        if "grpc_options" in config:
            config["grpc_options"]["port"] = self.grpc_port
        args = config["applications"][0]["args"]
        args["models_dir"] = str(models_dir)
        args["review"]["path"] = str(workdir / "review")
        for key, value in (extra_args or {}).items():
            args[key] = value
        if edit_config is not None:  # e.g. deployment options for overload tests
            edit_config(config)
        self.search_enabled = bool((args.get("retrieval") or {}).get("enabled", True))
        self.config_path = workdir / "serve_config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 420.0, warm_up_headers: dict[str, str] | None = None) -> ServeProcess:
        """Start, wait for /readyz, then warm up with real read-only requests (tests/support/service.py).

        ``warm_up_headers``: credentials for the warm-up when the config has API keys (an admin key).
        """
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            # its own local Ray: never a cluster another run left in /tmp/ray/ray_current_cluster
            "RAY_ADDRESS": os.environ.get("VISIONROUTE_TEST_RAY_ADDRESS", "local"),
            "VISIONROUTE_HOME": str(self.workdir / "home"),
            "PYTHONPATH": str(REPO),
        }
        log = open(self.workdir / "serve.log", "ab")
        serve_cli = Path(sys.executable).with_name("serve")
        self.process = subprocess.Popen(
            [str(serve_cli), "run", str(self.config_path)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve run exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        else:
            self.stop()
            raise RuntimeError(f"service not ready after {timeout_s} s:\n{self.log_tail()}")
        try:
            warm_up_service(self.url, search=self.search_enabled, headers=warm_up_headers)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # The whole session: serve run and the local Ray cluster it started.
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def log_tail(self, lines: int = 60) -> str:
        text = (self.workdir / "serve.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class RestartableService:
    """A service of its own for the tests that stop, kill and restart it (never the session's
    shared ones): each restart is a new ``serve run`` on the same work dir, so the review queue,
    the index and the blobs carry over, as they do for an operator. Tests that use it leave it
    running for the next one and look only at what they created."""

    def __init__(self, workdir: Path, models_dir: Path) -> None:
        self.workdir = workdir
        self.models_dir = models_dir
        self.current: ServeProcess | None = None

    def running(self) -> ServeProcess:
        """The running service, started (on the same work dir) if there is none."""
        if self.current is None or self.current.process is None or self.current.process.poll() is not None:
            self.current = ServeProcess(self.workdir, self.models_dir).start()
        return self.current

    def restart(self, sig: int = signal.SIGTERM) -> ServeProcess:
        """Stop the running service with ``sig`` (nothing to do if it is gone) and start a new one."""
        self.stop(sig)
        return self.running()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.current is not None:
            self.current.stop(sig)
            self.current = None
