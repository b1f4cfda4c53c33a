"""Start the real service the way the README does (`serve run <config>`, or `visionroute serve`
for the restart tests), on free ports."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
        # `serve run` with Ray's dashboard off, which no test reads (tests/support/serve_run.py)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.serve_run", "run", str(self.config_path)],
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
            time.sleep(0.25)  # a poll, not a wait: every shared service's start passes here
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


def config_copy(workdir: Path, models_dir: Path, http_port: int, grpc_port: int) -> Path:
    """serve_config.yaml with the ports, the models and every state folder moved into ``workdir``."""
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    config["grpc_options"]["port"] = grpc_port
    args = config["applications"][0]["args"]
    args["models_dir"] = str(models_dir)
    args["review"]["path"] = str(workdir / "review")
    args["retrieval"]["index_dir"] = str(workdir / "index")
    path = workdir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def session_pids(sid: int) -> list[int]:
    """The processes of session ``sid`` (/proc: Linux only, like the CI machines)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (/proc: Linux only, like the CI machines)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


class VisionRouteServe:
    """``visionroute serve --config <copy>`` as the README starts it: Ray's token auth on (a token
    of the work dir's own, never ~/.ray), Ray's temp dir of its own per start, the ready line read
    from its output. ``visionroute serve`` runs ``serve run`` in a session of its own (with the
    local Ray cluster in it), so a SIGKILL of the service is a SIGKILL of that session too."""

    def __init__(self, workdir: Path, models_dir: Path) -> None:
        self.workdir = workdir
        self.port, self.grpc_port = free_port(), free_port()
        self.config_path = config_copy(workdir, models_dir, self.port, self.grpc_port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.search_enabled = True
        self.lines: list[str] = []
        self.ready_at: float | None = None
        self.process: subprocess.Popen | None = None
        self.serve_run_pid: int | None = None  # the session leader of `serve run` and its Ray

    def start(self, timeout_s: float = 420.0) -> VisionRouteServe:
        """Start, wait for the ready line, then warm up with real read-only requests."""
        token = self.workdir / "ray_token"
        if not token.exists():
            token.write_text("0123456789abcdef" * 4)
        # short: Ray's socket paths; a new one per start, so no start sees a killed cluster's files
        self.ray_tmp = tempfile.mkdtemp(prefix="vr", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
        env.update(
            VISIONROUTE_HOME=str(self.workdir / "home"),
            PYTHONPATH=str(REPO),
            RAY_TMPDIR=self.ray_tmp,
            RAY_AUTH_TOKEN_PATH=str(token),  # token auth on (the default) without touching ~/.ray
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "visionroute.cli", "serve", "--config", str(self.config_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + timeout_s
        while self.ready_at is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"visionroute serve did not get ready:\n{self.log_tail()}")
            time.sleep(0.5)
        leaders = [pid for pid in child_pids(self.process.pid) if os.getsid(pid) == pid]
        self.serve_run_pid = leaders[0] if leaders else None
        try:
            warm_up_service(self.url, search=self.search_enabled)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from None
        return self

    def _read(self) -> None:
        with open(self.workdir / "serve.log", "a") as log:
            for line in self.process.stdout:
                log.write(line)
                self.lines.append(line.rstrip("\n"))
                if line.startswith("VisionRoute ready on") and self.ready_at is None:
                    self.ready_at = time.monotonic()

    def kill(self) -> None:
        """SIGKILL to everything at once, without waiting: ``serve run``'s session (its Ray
        cluster) first, so it never sees its parent die and shut down cleanly, then the parent.
        Every process of the session, not only its process group: Ray puts workers (the proxy,
        the replicas) in groups of their own, and they would answer for seconds after the rest
        died (a kill -9 test saw every request sent after the kill answered 200)."""
        if self.serve_run_pid is not None:
            for pid in [self.serve_run_pid, *session_pids(self.serve_run_pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop with ``sig`` (SIGTERM: the clean stop; SIGKILL: ``kill``) and wait; the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            if sig == signal.SIGKILL:
                self.kill()
            else:
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.kill()
                self.process.wait(timeout=30)
        self.reader.join(timeout=10)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return self.process.returncode

    def output(self) -> str:
        return "\n".join(self.lines)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.lines[-lines:])


class RestartableService:
    """A service of its own for the tests that stop, kill and restart it (never the session's
    shared ones), started the README way (``visionroute serve``, ``VisionRouteServe``): each
    restart is a new start on the same work dir, so the review queue, the index and the blobs
    carry over, as they do for an operator. Its tests (test_serve_start.py) share one first
    start and one restart, and look only at what they created."""

    def __init__(self, workdir: Path, models_dir: Path) -> None:
        self.workdir = workdir
        self.models_dir = models_dir
        self.current: VisionRouteServe | None = None
        self.failed_start: str | None = None

    def running(self) -> VisionRouteServe:
        """The running service, started (on the same work dir) if there is none. A start that
        failed is not tried again: each later test gets its error at once, not a new start."""
        if self.current is None or self.current.process is None or self.current.process.poll() is not None:
            if self.failed_start is not None:
                raise RuntimeError(f"an earlier start of this service failed: {self.failed_start}")
            try:
                self.current = VisionRouteServe(self.workdir, self.models_dir).start()
            except RuntimeError as exc:
                self.failed_start = str(exc)
                raise
        return self.current

    def restart(self, sig: int = signal.SIGTERM) -> VisionRouteServe:
        """Stop the running service with ``sig`` (nothing to do if it is gone) and start a new one."""
        self.stop(sig)
        return self.running()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.current is not None:
            self.current.stop(sig)
            self.current = None
