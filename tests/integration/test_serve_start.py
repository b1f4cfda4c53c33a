"""``visionroute serve`` as the README starts it: loopback only, a ready line, a clean SIGTERM.

One real service for the module (Ray Serve from a copy of serve_config.yaml, real models).
It also serves the newcomer paths that need a running service: /docs offline and the CLI's
``index`` / ``retrieval search|stats`` going through HTTP instead of fighting for the index.
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from tests.support.ports import free_port

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket the given processes hold (/proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = local.split(":")
            raw = bytes.fromhex(hex_address)
            # /proc writes each 32-bit word in host (little-endian) order
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(packed) if width == 8 else ipaddress.IPv6Address(packed)
            found.append((str(address), int(hex_port, 16), inodes[inode]))
    return found


def descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, changed = {root}, True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                changed = True
    return tree


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class Started:
    def __init__(self, tmp: Path, models_dir: Path) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
        config["http_options"]["port"] = self.port
        config["grpc_options"]["port"] = self.grpc_port
        args = config["applications"][0]["args"]
        args["models_dir"] = str(models_dir)
        args["review"]["path"] = str(tmp / "review")
        args["retrieval"]["index_dir"] = str(tmp / "index")
        self.config_path = tmp / "serve_config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        token = tmp / "ray_token"
        token.write_text("0123456789abcdef" * 4)
        self.ray_tmp = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's socket paths
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
        env.update(
            VISIONROUTE_HOME=str(tmp / "home"),
            PYTHONPATH=str(REPO),
            RAY_TMPDIR=self.ray_tmp,
            RAY_AUTH_TOKEN_PATH=str(token),  # token auth on (the default) without touching ~/.ray
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.ready_at: float | None = None
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

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("VisionRoute ready on") and self.ready_at is None:
                self.ready_at = time.monotonic()

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.ready_at is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("visionroute serve did not get ready:\n" + "\n".join(self.lines[-60:]))
            time.sleep(0.5)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                for pid in descendants(self.process.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                self.process.wait(timeout=30)
        self.reader.join(timeout=10)
        return self.process.returncode

    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture(scope="module")
def started(prepared_models_dir, tmp_path_factory):
    service = Started(tmp_path_factory.mktemp("serve_start"), prepared_models_dir)
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()
        shutil.rmtree(service.ray_tmp, ignore_errors=True)


def test_a_ready_line_names_both_ports_once_the_service_answers(started):
    ready = [line for line in started.lines if line.startswith("VisionRoute ready on")]
    assert ready == [f"VisionRoute ready on http://127.0.0.1:{started.port} (gRPC :{started.grpc_port})"]
    assert httpx.get(started.url + "/readyz", timeout=30).status_code == 200


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "?"


def test_everything_it_starts_listens_on_loopback_but_what_serve_hard_codes(started):
    tree = descendants(started.process.pid)
    sockets = listening_sockets(tree)
    assert {started.port, started.grpc_port} <= {port for _, port, _ in sockets}, sockets
    names = {pid: process_name(pid) for _, _, pid in sockets}
    assert any("gcs_server" in name for name in names.values()), names  # Ray's own servers were seen
    assert any("raylet" in name for name in names.values()), names
    exposed = [(address, port, names[pid]) for address, port, pid in sockets if not is_loopback(address)]
    # Ray Serve 2.60 binds these two to [::] in its own code (docs/operations.md): the gRPC
    # proxy (VisionRoute's API keys guard it; check-config demands keys or allow_insecure_bind)
    # and each replica's inter-deployment gRPC server (Ray's token auth guards it).
    unexpected = [
        entry
        for entry in exposed
        if entry[1] != started.grpc_port and not entry[2].startswith("ray::ServeReplica")
    ]
    assert not unexpected, f"listening beyond loopback: {unexpected}"
    replica_ports = [port for _, port, name in exposed if name.startswith("ray::ServeReplica")]
    assert replica_ports, exposed
    started.replica_ports = replica_ports


def test_serves_all_interface_replica_ports_refuse_calls_without_rays_token(started):
    import grpc

    for port in getattr(started, "replica_ports", []):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
            with pytest.raises(grpc.RpcError) as caught:
                call(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, (port, caught.value)


def test_grpc_answers_with_ray_token_auth_on(started):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{started.grpc_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), metadata=(("application", "visionroute"),), timeout=30
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_docs_load_without_a_cdn(started):
    page = httpx.get(started.url + "/docs", timeout=30)
    assert page.status_code == 200
    assert not re.findall(r"""(?:src|href)=["'](https?:)?//""", page.text)
    bundle = httpx.get(started.url + "/docs?asset=swagger-ui-bundle.js", timeout=30)
    assert bundle.status_code == 200 and b"SwaggerUIBundle" in bundle.content


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VISIONROUTE_API_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "visionroute.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def test_index_search_and_stats_go_through_the_running_service(started, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, colour in (("red.png", (250, 10, 10)), ("blue.png", (10, 10, 250))):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
        (folder / name).write_bytes(buffer.getvalue())
    indexed = cli("index", str(folder), "--url", started.url, "--tag", "cli-test")
    assert indexed.returncode == 0, indexed.stderr
    assert f"indexing through the service at {started.url}" in indexed.stdout
    assert '"indexed": 2' in indexed.stdout and "open for writing" not in indexed.stderr
    again = cli("index", str(folder), "--url", started.url, "--tag", "cli-test")
    assert again.returncode == 0 and '"replaced": 2' in again.stdout, again.stdout + again.stderr
    found = cli(
        "retrieval",
        "search",
        "red",
        "-k",
        "2",
        "--url",
        started.url,
        "--filters",
        '{"tags_any": ["cli-test"]}',
    )
    assert found.returncode == 0, found.stderr
    assert '"hits"' in found.stdout and "red.png" in found.stdout and "blue.png" in found.stdout
    stats = cli("retrieval", "stats", "--url", started.url)
    assert stats.returncode == 0, stats.stderr
    assert str(Path(started.config_path).parent / "index") in stats.stdout  # the service's own index


def test_the_local_index_is_refused_at_once_while_the_service_owns_it(started, tmp_path):
    started_at = time.monotonic()
    local = cli("retrieval", "stats", "--index-dir", str(Path(started.config_path).parent / "index"))
    assert local.returncode == 2
    assert "open for writing in another process" in local.stderr and "--url" in local.stderr
    assert "Traceback" not in local.stderr
    assert time.monotonic() - started_at < 60  # refused before any model loads (was ~11 s + a traceback)


def analysed_and_queued_for_search(url: str, count: int) -> None:
    """``count`` images analysed; the shipped config queues each for search (eventual indexing),
    so the ingress has writes to search after their responses."""
    with httpx.Client(timeout=120) as client:
        for n in range(count):
            buffer = io.BytesIO()
            Image.new("RGB", (64, 64), (40 * n, 200, 255 - 40 * n)).save(buffer, format="PNG")
            answer = client.post(
                url + "/v1/analyze", files={"image": ("x.png", buffer.getvalue(), "image/png")}
            )
            assert answer.status_code == 200, answer.text
            (index,) = [s for s in answer.json()["trace"]["steps"] if s["stage"] == "retrieval:index"]
            assert index["details"]["search_index"]["mode"] == "eventual", index


def test_sigterm_stops_serve_cleanly_and_leaves_nothing_running(started):
    tree = descendants(started.process.pid)
    analysed_and_queued_for_search(started.url, 6)  # the stop comes right after: work is in flight
    returncode = started.stop()
    output = started.output()
    assert returncode == 0, output[-3000:]
    # No traceback before or after "stopping:": the ingress stops its work after responses (the
    # index queue's writes to search) in its __del__, before Serve removes the search deployment.
    assert "Traceback" not in output and "SIGTERM received" not in output, output[-3000:]
    assert "stopped" in started.lines
    with pytest.raises(httpx.HTTPError):
        httpx.get(started.url + "/healthz", timeout=2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in tree):
        time.sleep(1)
    alive = [pid for pid in tree if Path(f"/proc/{pid}").exists()]
    assert not alive, alive
