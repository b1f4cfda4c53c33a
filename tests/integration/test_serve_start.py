"""``visionroute serve`` as the README starts it: loopback only, a ready line, a kill -9 and a
restart that lose nothing acknowledged, a clean SIGTERM.

One service start and one restart for the module (issue 21: each start is a new Ray cluster,
20-40 CPU-seconds): the session's ``restartable_service`` (tests/integration/serve_process.py
``VisionRouteServe``: Ray Serve from a copy of serve_config.yaml, real models, Ray's token auth).
The first start serves the start checks and the newcomer paths that need a running service
(/docs offline, the CLI's ``index`` / ``retrieval search|stats`` going through HTTP instead of
fighting for the index); then a review item is created, the whole service is killed with
SIGKILL while items are enqueued, and the one restart serves both the review-queue-survives and
the exactly-once checks; the SIGTERM test stops the restarted service last.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.integration.open_loop import jpeg, listed_items, open_loop

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


@pytest.fixture
def started(restartable_service):
    """The module's running service: the first start until the kill -9, the restart after it."""
    return restartable_service.running()


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


@pytest.fixture(scope="module")
def unsure_item(restartable_service, photos_png) -> dict:
    """A review item created before the kill -9 and the restart: its id and the image a
    reviewer gets (face blurred)."""
    service = restartable_service.running()
    response = httpx.post(
        service.url + "/v1/analyze",
        files={"image": ("x.png", photos_png["astronaut"], "image/png")},
        timeout=60,
    )
    item_id = response.json()["review_item_id"]
    assert item_id, response.text
    image = httpx.get(f"{service.url}/v1/review/items/{item_id}/image", timeout=60)
    assert image.status_code == 200, image.text
    return {"id": item_id, "image": image.content}


@pytest.fixture(scope="module")
def killed_while_enqueuing(restartable_service, unsure_item, photos_png) -> list[dict]:
    """The whole service (``serve run``'s session: its Ray cluster) killed with SIGKILL while
    items are enqueued, then one restart on its work dir; every request's outcome. The module's
    only restart: the review-queue check shares it (kill -9 is the harder case for both)."""
    image = jpeg(photos_png["astronaut"])  # unsure: every success is a review item
    first = restartable_service.running()
    try:
        results = asyncio.run(open_loop(first.url, image, 2, 1.0))  # acknowledged before the storm
        # 10 requests/s, the kill after the first half (1 s): requests are in flight at once
        # (issue 21: 1 + 2 s of requests, were 1.5 + 3 s; the claim needs some acknowledged
        # before the kill and some cut off by it, not more of either)
        results += asyncio.run(open_loop(first.url, image, 10, 2.0, during=first.kill))
    finally:
        restartable_service.stop(signal.SIGKILL)  # waits for it (kills it if the storm failed first)
    restartable_service.running()  # a new `visionroute serve` on the killed one's work dir
    return results


def test_review_queue_survives_a_restart(restartable_service, unsure_item, killed_while_enqueuing):
    after = restartable_service.running()
    item = httpx.get(f"{after.url}/v1/review/items/{unsure_item['id']}", timeout=60)
    assert item.status_code == 200 and item.json()["status"] == "pending", item.text
    image = httpx.get(f"{after.url}/v1/review/items/{unsure_item['id']}/image", timeout=60)
    assert image.content == unsure_item["image"]


def test_kill_9_while_enqueuing_keeps_every_acknowledged_item_exactly_once(
    restartable_service, killed_while_enqueuing
):
    results = killed_while_enqueuing
    acknowledged = {r["request_id"]: r["item"] for r in results if r["status"] == 200}
    assert acknowledged and len(acknowledged) < len(results)  # some before the kill, some cut off
    listed = listed_items(restartable_service.running().url)  # with the module's other items
    by_request: dict[str, list[str]] = {}
    for item in listed:
        by_request.setdefault(item["request_id"], []).append(item["id"])
    sent = {r["request_id"] for r in results}
    figures = {
        "sent": len(results),
        "acknowledged": len(acknowledged),
        "stored_after_restart": sum(len(by_request.get(request_id, [])) for request_id in sent),
    }
    (restartable_service.workdir / "kill_9.json").write_text(json.dumps(figures, indent=2))
    print("\nkill -9 figures:", figures)
    for request_id, item_id in acknowledged.items():
        assert by_request.get(request_id) == [item_id], request_id
    assert all(len(ids) == 1 for ids in by_request.values())


def test_sigterm_stops_serve_cleanly_and_leaves_nothing_running(restartable_service, unsure_item):
    """Last: the module's service (restarted after the kill -9 when the module runs whole)."""
    started = restartable_service.running()
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
        time.sleep(0.2)
    alive = [pid for pid in tree if Path(f"/proc/{pid}").exists()]
    assert not alive, alive
    # The clean stop keeps the queue: the item made before it, read from the stopped service's
    # own folder (no restart needed to look).
    from policies.review_queue import ReviewQueue

    queue = ReviewQueue(restartable_service.workdir / "review")
    try:
        assert queue.get(unsure_item["id"]).status == "pending"
        assert queue.image(unsure_item["id"]) == unsure_item["image"]
    finally:
        queue.close()
