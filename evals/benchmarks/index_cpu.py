"""CPU per indexed image (``retrieval.index_analysed``, issue 24): what crosses the hop to the
search tier and what the search tier does with it, before and after, in one run:

    python -m evals.benchmarks.index_cpu [--rounds 3] [--images 48] [--ray]

Workloads, interleaved round by round on the same service, over the bench's photos (decoded,
classified by the packaged classifier, with a trace like the service's):
- ``before``: the ``Analysis`` crosses (its pixels and trace), one image per write (what a
  sequential client's writes were), and one in five images read back for the drift sample
  (``query_vector``, drift.embedding_fraction 0.2);
- ``after``: an ``AnalysedImage`` crosses (outcome and class probabilities, no pixels), the
  write answers with the embeddings (no read back), one image per write; and four per write
  (a batch that lingered ``retrieval.index_queue.linger_ms`` under load).
The same eight photos repeat, as in ``visionroute bench serve``: after the first round every
write replaces an entry.

In process (default) the hop is a pickle round trip and the CPU is this process's (every
thread). ``--ray`` runs the search tier as the service deploys it (router.tiers.SearchTier under
Ray Serve, ``num_cpus=2``) and counts the CPU of this process and every process it started (the
Ray daemons, the replica): the Ray object store, the handle and the replica's request handling
included. Reported: the median over rounds of CPU ms per indexed image and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import os
import pickle
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DRIFT_EVERY = 5  # drift.embedding_fraction 0.2: one image in five read back (before)


def _analyses(n: int, tenant: str) -> list:
    """``n`` analysed images over the bench's photos, with the classify tier's answers."""
    from cascades.images import decode_image
    from cascades.onnx_stage import OnnxStage, OnnxStageConfig
    from evals.benchmarks.serve import bench_photos
    from visionroute.records import Analysis, Decision, Step, Trace

    photos = [(hashlib.sha256(data).hexdigest(), decode_image(data).rgb) for data in bench_photos().values()]
    stage = OnnxStage(OnnxStageConfig(model="efficientnet_lite0"))
    answers, _ = stage.predict([rgb for _, rgb in photos])
    made = []
    for i in range(n):
        sha, rgb = photos[i % len(photos)]
        trace = Trace(f"bench-{i}")
        found = answers[i % len(photos)]
        trace.append(
            Step(
                stage="onnx:classify",
                model="efficientnet_lite0",
                score=float(found.confidence[0]),
                latency_ms=12.0,
                details={"detections": found.to_dicts(), "calibration": "identity"},
            )
        )
        decision = Decision.ACCEPT if i % 3 else Decision.REVIEW
        trace.append(Step(stage="policy:thresholds", decision=decision, score=float(found.confidence[0])))
        analysis = Analysis(image_rgb=rgb, image_sha256=sha, task="classify", tenant=tenant, trace=trace)
        analysis.detections = dataclasses.replace(found)
        analysis.review_item_id = None if i % 3 else f"item-{i}"
        made.append(analysis)
    return made


def _descendants_cpu_s(root: int) -> float:
    """User + system CPU seconds of ``root`` and every live process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        times[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


class InProcess:
    """The search tier in this process; each call's arguments and answer pickled both ways."""

    def __init__(self, service: Any) -> None:
        self.service = service

    async def call(self, method: str, *args: Any) -> Any:
        args = pickle.loads(pickle.dumps(args, protocol=5))
        answer = getattr(self.service, method)(*args)
        return pickle.loads(pickle.dumps(answer, protocol=5))

    def cpu_s(self) -> float:
        return time.process_time()


class OverRay:
    """The search tier as the service deploys it, through a Ray Serve handle."""

    def __init__(self, retrieval: dict[str, Any]) -> None:
        import ray
        from ray import serve

        from evals.benchmarks.serve import _free_port
        from router.tiers import RemoteSearch, SearchTier

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})  # beside other servers
        handle = serve.run(
            SearchTier.options(ray_actor_options={"num_cpus": 0.25}).bind(retrieval), name="idx"
        )
        self.remote = RemoteSearch(handle)

    async def call(self, method: str, *args: Any) -> Any:
        return await self.remote.call(method, *args)

    def cpu_s(self) -> float:
        return _descendants_cpu_s(os.getpid())

    def idle_ms_per_s(self, seconds: float = 5.0) -> tuple[float, float]:
        """CPU ms per second while nothing is indexed: the search replica's process, and every
        process of the session (what a search deployment costs just by being there, in part)."""
        replica = next(
            (
                int(pid)
                for pid in os.listdir("/proc")
                if pid.isdigit() and "SearchTier" in _cmdline(pid) and "ServeReplica" in _cmdline(pid)
            ),
            None,
        )
        before_all, before_replica = self.cpu_s(), _descendants_cpu_s(replica) if replica else 0.0
        time.sleep(seconds)
        after_replica = _descendants_cpu_s(replica) if replica else 0.0
        return (after_replica - before_replica) * 1000 / seconds, (self.cpu_s() - before_all) * 1000 / seconds

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


async def before(search: Any, analyses: list) -> None:
    for n, analysis in enumerate(analyses):
        (search_id,) = await search.call("index_analyses", [analysis])
        if n % DRIFT_EVERY == 0:
            await search.call("query_vector", "search_by_id", search_id, 1)


def after(batch: int) -> Callable:
    from retrieval.analysed import AnalysedImage

    async def run(search: Any, analyses: list) -> None:
        for start in range(0, len(analyses), batch):
            images = [
                AnalysedImage.from_analysis(a, with_pixels=False) for a in analyses[start : start + batch]
            ]
            answer = await search.call("index_analysed", images)
            assert "ids" in answer, answer  # the shipped embedder reuses the tier's probabilities

    return run


WORKLOADS = {
    "before: Analysis, 1 per write, drift read back": before,
    "after: AnalysedImage, 1 per write": after(1),
    "after: AnalysedImage, 4 per write": after(4),
}


def run(rounds: int = 3, images: int = 48, ray: bool = False) -> dict[str, float]:
    from retrieval.config import RetrievalConfig
    from retrieval.service import SearchService

    per_image: dict[str, list[float]] = {name: [] for name in WORKLOADS}
    walls: dict[str, list[float]] = {name: [] for name in WORKLOADS}
    with tempfile.TemporaryDirectory() as tmp:
        config = {"index_dir": str(Path(tmp) / "search"), "index_analysed": True}
        analyses = _analyses(images, "bench")
        if ray:
            search = OverRay(config)
        else:
            search = InProcess(SearchService(RetrievalConfig.model_validate(config)))
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(after(8)(search, analyses[:8]))  # warm-up: the entries exist
            for _ in range(rounds):
                for name, workload in WORKLOADS.items():
                    started, wall = search.cpu_s(), time.perf_counter()
                    loop.run_until_complete(workload(search, analyses))
                    per_image[name].append((search.cpu_s() - started) * 1000.0 / len(analyses))
                    walls[name].append(time.perf_counter() - wall)
            if ray:
                replica_idle, session_idle = search.idle_ms_per_s()
        finally:
            loop.close()
            search.close() if ray else search.service.close()
    where = "over Ray Serve (every process of the session)" if ray else "in process"
    results = {name: statistics.median(values) for name, values in per_image.items()}
    print(f"CPU per indexed image, {where}, median of {rounds} rounds of {images} images:")
    baseline = results[next(iter(WORKLOADS))]
    for name, value in results.items():
        print(
            f"  {name}: {value:.2f} ms ({value / baseline:.2f}x); rounds {[round(v, 2) for v in per_image[name]]}"
        )
    if ray:
        print(
            f"  idle: the search replica {replica_idle:.1f} CPU ms/s, "
            f"every process of the session {session_idle:.1f} CPU ms/s; less that idle CPU over "
            "each workload's wall time:"
        )
        for name, values in per_image.items():
            net = [v - session_idle * w / images for v, w in zip(values, walls[name])]
            results[f"{name} (net of idle)"] = statistics.median(net)
            print(f"  {name}: {statistics.median(net):.2f} ms; rounds {[round(v, 2) for v in net]}")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--ray", action="store_true", help="the search tier under Ray Serve")
    args = parser.parse_args()
    run(args.rounds, args.images, args.ray)


if __name__ == "__main__":
    main()
