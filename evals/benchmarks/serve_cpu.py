"""CPU per request of the served app, by process, search indexing off against on (issue 24):

    python -m evals.benchmarks.serve_cpu [--requests 80] [--clients 8] [--rounds 2]
                                          [--linger-ms 100 300]

The app as ``visionroute bench serve --placement ingress`` builds it (the shipped config's args;
indexing off is ``retrieval.enabled: false``, as there), the bench's photos over HTTP from
``clients`` threads. Each round serves indexing off, then on, and reads every process's CPU
(Linux /proc: the Ray daemons, the proxy, the ingress and search replicas, the client threads in
this process) before and after the loaded requests. Throughput on a shared 2-core machine is
noise; CPU per request per process is what throughput is made of, and it says where indexing's
share goes (the search replica, the ingress's side of the hop, the Ray daemons, background).

``--linger-ms A B ...`` serves indexing on once per value of ``retrieval.index_queue.linger_ms``
in each round (interleaved), so the index queue's batching is compared in one run: the search
replica's CPU is mostly Ray Serve's per-call cost (its own work is ~0.3 ms per image), so it
goes with the number of ``index_analysed`` calls, which the linger sets.
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
    url: str, photos: dict[str, bytes], requests: int, clients: int, linger_s: float = 0.1
) -> tuple[dict[str, float], float]:
    """CPU ms per request by process, and requests per second; the after-response work of the
    warm-up and of the measured requests (a ``linger_s`` then the last batch's write) is given
    time to finish outside and inside the window respectively."""
    face = Face("http", url)
    encoded = list(photos.items())

    def one(n: int) -> None:
        name, data = encoded[n % len(encoded)]
        face.call(name, data)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients * 2)))  # warm-up, connections open
        time.sleep(0.4 + linger_s)  # the warm-up's after-response work is done
        before, started = cpu_by_process(os.getpid()), time.perf_counter()
        list(pool.map(one, range(requests)))
        time.sleep(0.2 + linger_s)  # ... and the measured requests' (a linger, the last batch)
        after, wall = cpu_by_process(os.getpid()), time.perf_counter() - started
    per_request = {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1000.0 / requests for k in after}
    return per_request, requests / wall


def run(requests: int = 80, clients: int = 8, rounds: int = 2, lingers: list[float] | None = None) -> None:
    import ray
    from ray import serve

    from router.app import build_app
    from visionroute import paths

    photos = bench_photos()
    models_dir = paths.models_dir()
    port = _free_port()
    # Each config: "off", or "on" at one linger ("on" alone: the shipped linger).
    configs = ["off"] + ([f"on, linger {ms:g} ms" for ms in lingers] if lingers else ["on"])
    linger_of = dict(zip(configs[1:], lingers or [None]))
    rows: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    rates: dict[str, list[float]] = {c: [] for c in configs}
    linger_s = max(lingers or [100.0]) / 1000.0  # every config waits as long: the same idle share
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for _ in range(rounds):
            for config in configs:
                with tempfile.TemporaryDirectory() as tmp:
                    args = service_args(models_dir, Path(tmp), "ingress", config != "off", 8, None)
                    args["cascades"] = {"classify": args["cascades"]["classify"]}
                    if linger_of.get(config) is not None:
                        queue = args["retrieval"].setdefault("index_queue", {})
                        queue["linger_ms"] = linger_of[config]
                    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
                    try:
                        per_request, rate = measure(
                            f"http://127.0.0.1:{port}", photos, requests, clients, linger_s
                        )
                    finally:
                        serve.delete(APP_NAME)
                rows[config].append(per_request)
                rates[config].append(rate)
    finally:
        serve.shutdown()
        ray.shutdown()
    names = sorted({k for row in rows.values() for r in row for k in r})
    median = {c: {k: statistics.median(r.get(k, 0.0) for r in rows[c]) for k in names} for c in configs}
    print(f"CPU ms per request by process, ingress placement, {clients} clients, {requests} requests, ")
    print(f"median of {rounds} interleaved rounds (indexing {' | '.join(configs)}):")
    last = configs[-1]
    for name in sorted(names, key=lambda k: -median[last][k]):
        if max(median[c][name] for c in configs) >= 0.05:
            print(f"  {name[:60]:60s} " + " | ".join(f"{median[c][name]:7.2f}" for c in configs))
    service = {c: sum(v for k, v in median[c].items() if not k.startswith("this process")) for c in configs}
    print(f"  {'every process but the clients':60s} " + " | ".join(f"{service[c]:7.2f}" for c in configs))
    print(
        "req/s (noise on a shared machine): "
        + "; ".join(f"{c} {[round(r, 1) for r in rates[c]]}" for c in configs)
        + f"; load average {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--linger-ms",
        type=float,
        nargs="+",
        help="indexing on at each of these retrieval.index_queue.linger_ms (default: the shipped one)",
    )
    args = parser.parse_args()
    if args.linger_ms and any(not 0 <= ms <= 5000 for ms in args.linger_ms):
        parser.error(
            f"--linger-ms: each value must be in [0, 5000] (the config's range), got {args.linger_ms}"
        )
    run(args.requests, args.clients, args.rounds, args.linger_ms)


if __name__ == "__main__":
    main()
