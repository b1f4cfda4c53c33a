"""CPU per request of the served app, by process, search indexing off against on (issue 24):

    python -m evals.benchmarks.serve_cpu [--requests 80] [--clients 8] [--rounds 2]

The app as ``visionroute bench serve --placement ingress`` builds it (the shipped config's args;
indexing off is ``retrieval.enabled: false``, as there), the bench's photos over HTTP from
``clients`` threads. Each round serves indexing off, then on, and reads every process's CPU
(Linux /proc: the Ray daemons, the proxy, the ingress and search replicas, the client threads in
this process) before and after the loaded requests. Throughput on a shared 2-core machine is
noise; CPU per request per process is what throughput is made of, and it says where indexing's
share goes (the search replica, the ingress's side of the hop, the Ray daemons, background).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from evals.benchmarks.index_cpu import _cmdline
from evals.benchmarks.serve import APP_NAME, Face, _free_port, bench_photos, service_args


def _name(pid: str) -> str:
    """A process's group: its Ray title (``ray::ServeReplica:bench:Ingress``) or program name."""
    line = _cmdline(pid).split("\0")
    if line[0].startswith("ray::"):  # the title names the task running now: keep the actor
        return line[0].split(" ")[0].split(".")[0]
    program = Path(line[0]).name
    if program.startswith("python") and len(line) > 1:
        script = next((Path(arg).name for arg in line[1:] if arg.endswith(".py")), line[1])
        return f"python {script}"
    return program


def cpu_by_process(root: int) -> dict[str, float]:
    """CPU seconds of ``root`` and everything below it, by group (``this process`` for root)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, seconds = {}, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(pid)] = int(fields[1])
        seconds[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
    groups: dict[str, float] = {}
    for pid, cpu in seconds.items():
        up, chain = pid, 0
        while up not in (root, 0, 1) and chain < 50:
            up, chain = parent.get(up, 0), chain + 1
        if up != root:
            continue
        name = "this process (clients)" if pid == root else _name(str(pid))
        groups[name] = groups.get(name, 0.0) + cpu
    return groups


def measure(
    url: str, photos: dict[str, bytes], requests: int, clients: int
) -> tuple[dict[str, float], float]:
    face = Face("http", url)
    encoded = list(photos.items())

    def one(n: int) -> None:
        name, data = encoded[n % len(encoded)]
        face.call(name, data)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients * 2)))  # warm-up, connections open
        time.sleep(0.5)  # the warm-up's after-response work is done
        before, started = cpu_by_process(os.getpid()), time.perf_counter()
        list(pool.map(one, range(requests)))
        time.sleep(0.3)  # ... and the measured requests' (a linger, the last batch)
        after, wall = cpu_by_process(os.getpid()), time.perf_counter() - started
    per_request = {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1000.0 / requests for k in after}
    return per_request, requests / wall


def run(requests: int = 80, clients: int = 8, rounds: int = 2) -> None:
    import ray
    from ray import serve

    from router.app import build_app
    from visionroute import paths

    photos = bench_photos()
    models_dir = paths.models_dir()
    port = _free_port()
    rows: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    rates: dict[bool, list[float]] = {False: [], True: []}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for _ in range(rounds):
            for indexing in (False, True):
                with tempfile.TemporaryDirectory() as tmp:
                    args = service_args(models_dir, Path(tmp), "ingress", indexing, 8, None)
                    args["cascades"] = {"classify": args["cascades"]["classify"]}
                    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
                    try:
                        per_request, rate = measure(f"http://127.0.0.1:{port}", photos, requests, clients)
                    finally:
                        serve.delete(APP_NAME)
                rows[indexing].append(per_request)
                rates[indexing].append(rate)
    finally:
        serve.shutdown()
        ray.shutdown()
    names = sorted({k for row in rows[False] + rows[True] for k in row})
    median = {on: {k: statistics.median(r.get(k, 0.0) for r in rows[on]) for k in names} for on in rows}
    print(f"CPU ms per request by process, ingress placement, {clients} clients, {requests} requests, ")
    print(f"median of {rounds} interleaved rounds (indexing off | on | on - off):")
    for name in sorted(names, key=lambda k: -median[True][k]):
        off, on = median[False][name], median[True][name]
        if max(off, on) >= 0.05:
            print(f"  {name[:60]:60s} {off:7.2f} | {on:7.2f} | {on - off:+7.2f}")
    service = {on: sum(v for k, v in median[on].items() if not k.startswith("this process")) for on in rows}
    print(
        f"  {'every process but the clients':60s} {service[False]:7.2f} | {service[True]:7.2f} | "
        f"{service[True] - service[False]:+7.2f}"
    )
    print(
        f"req/s (noise on a shared machine): off {[round(r, 1) for r in rates[False]]}, "
        f"on {[round(r, 1) for r in rates[True]]}; load average {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    run(args.requests, args.clients, args.rounds)


if __name__ == "__main__":
    main()
