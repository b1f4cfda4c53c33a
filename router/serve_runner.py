"""``visionroute serve``: check the config, prepare models, run ``serve run``, say when ready.

What the single-machine start listens on (docs/operations.md, "What listens where"):

- Ray's own servers (GCS, raylets, workers' RPC ports, dashboard, metrics and runtime-env
  agents) bind to 127.0.0.1 only: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray treat
  this node as a single-machine cluster whose node address is loopback (Ray's own setting for
  machines where multi-node clusters are off; with it no other node can join). Without it
  Ray binds most of them to all interfaces. A cluster start (``--address`` / RAY_ADDRESS)
  leaves this alone.
- Ray's token authentication stays on (``RAY_AUTH_MODE=token``, the token in
  ``~/.ray/auth_token``, created on the first start), unless the caller set RAY_AUTH_MODE.
- VisionRoute's own HTTP proxy binds to ``http_options.host`` (127.0.0.1 as shipped); the gRPC
  proxy, when ``grpc_options`` lists servicers, to the node address (loopback here).

It then runs ``serve run`` as a child, polls ``/readyz`` and prints one line,
``VisionRoute ready on http://HOST:PORT (gRPC :PORT)``, once the service answers. SIGTERM or
SIGINT shuts Serve down (SIGINT to ``serve run``, which calls ``serve.shutdown()``; its local
Ray stops with it) and exits 0, without Ray's crash-style dump. If this process dies, the
child gets SIGTERM from the kernel (PR_SET_PDEATHSIG), so nothing is left running.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

READY_POLL_S = 0.5
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Endpoints:
    http_host: str
    http_port: int
    route_prefix: str
    grpc_port: int | None

    @property
    def probe_url(self) -> str:
        host = "127.0.0.1" if self.http_host in ("0.0.0.0", "::", "") else self.http_host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.http_port}{self.route_prefix.rstrip('/')}/readyz"

    def ready_line(self) -> str:
        host = f"[{self.http_host}]" if ":" in self.http_host else self.http_host
        grpc = f"gRPC :{self.grpc_port}" if self.grpc_port else "gRPC off"
        return f"VisionRoute ready on http://{host}:{self.http_port} ({grpc})"


def endpoints_of(document: dict) -> Endpoints:
    """Where ``serve run`` of this config document will listen (Serve's defaults filled in)."""
    http = document.get("http_options") or {}
    grpc = document.get("grpc_options") or {}
    grpc_on = bool(grpc.get("grpc_servicer_functions")) and int(grpc.get("port", 9000)) > 0
    prefix = next(
        (
            app.get("route_prefix") or "/"
            for app in document.get("applications", [])
            if app.get("import_path") == "router.app:build_app"
        ),
        "/",
    )
    return Endpoints(
        http_host=str(http.get("host", "0.0.0.0")),  # Serve's default for a config file
        http_port=int(http.get("port", 8000)),
        route_prefix=prefix,
        grpc_port=int(grpc.get("port", 9000)) if grpc_on else None,
    )


def child_environment(base: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """The environment for ``serve run`` and the notes to print about it."""
    env = dict(os.environ if base is None else base)
    notes = []
    cluster = env.get("RAY_ADDRESS")
    if cluster:
        notes.append(f"joining the Ray cluster at RAY_ADDRESS={cluster}; its own bind settings apply")
    else:
        env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's servers on 127.0.0.1 only
        if env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] != "0":
            notes.append("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is set: Ray's servers listen on all interfaces")
    mode = env.setdefault("RAY_AUTH_MODE", "token")
    if mode.lower() != "token":
        notes.append(
            f"RAY_AUTH_MODE={mode}: Ray's token authentication is off; anyone who can reach Ray's "
            "ports can run code (docs/operations.md)"
        )
    return env, notes


def _preexec() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background parent may have ignored it
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: stop with us
    except (OSError, AttributeError):
        pass


def ready(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (our own URL)
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def run_serve(config: Path, endpoints: Endpoints, *, ready_timeout_s: float = 600.0) -> int:
    """``serve run config`` until SIGTERM/SIGINT (exit 0) or until it exits by itself."""
    env, notes = child_environment()
    for note in notes:
        print(f"note: {note}", flush=True)
    serve_cli = Path(sys.executable).with_name("serve")
    command = [str(serve_cli), "run", str(config)]
    if env.get("RAY_ADDRESS"):
        command += ["--address", env["RAY_ADDRESS"]]
    print("starting:", " ".join(command), flush=True)
    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    # Its own session: a terminal's Ctrl-C reaches this process only, which forwards it once.
    child = subprocess.Popen(command, env=env, preexec_fn=_preexec, start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout_s
        announced = timed_out = False
        while not stop.is_set() and child.poll() is None:
            if not announced and ready(endpoints.probe_url):
                print(endpoints.ready_line(), flush=True)
                announced = True
            elif not announced and time.monotonic() > deadline:
                print(f"error: not ready after {ready_timeout_s:g} s ({endpoints.probe_url})", flush=True)
                timed_out = True
                break
            stop.wait(READY_POLL_S if not announced else 1.0)
        if child.poll() is not None and not stop.is_set():
            print(f"error: serve run exited with {child.returncode}", flush=True)
            return child.returncode or 1
        print("stopping: shutting Ray Serve down", flush=True)
        _stop(child)
        return 1 if timed_out else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(child: subprocess.Popen) -> None:
    """SIGINT (serve run's own clean shutdown: serve.shutdown()), then SIGTERM, then SIGKILL."""
    for sig, wait_s in ((signal.SIGINT, STOP_TIMEOUT_S), (signal.SIGTERM, 15.0), (signal.SIGKILL, 15.0)):
        try:
            child.send_signal(sig)
        except ProcessLookupError:
            break
        try:
            child.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    print("stopped", flush=True)
