"""In-process time of the learned router's stage per request, and of each of its parts
(issue 22: the router stage's latency target; docs/routing_figures.md).

    .venv/bin/python scripts/router_stage_profile.py [--work-dir /tmp/rtr_profile] [--rounds 200]

The bench's router (``evals.benchmarks.serve.classify_router``: the shipped classify tier,
every feature block) on the bench photos, each request as the service sees it (the decoded
upload and the cheap tier's answer rows). Two orders, both p50 per request:
- ``warm``: the router's parts back to back;
- ``after onnx``: one ONNX Runtime run of the cheap tier before each request, as the service's
  replica does between requests (its threads and caches are what the features then share).
Prints the load average before and after: on a shared machine compare figures of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import numpy as np


def _p50(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values), 50))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/rtr_profile"))
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()

    from cascades.images import decode_image
    from cascades.learned_router import RouterArtefact
    from cascades.models import prepare_models
    from cascades.onnx_stage import OnnxStage, OnnxStageConfig
    from cascades.router_stage import RouterScoreStage, ServedRouter
    from evals.benchmarks.serve import bench_photos, classify_router
    from visionroute.paths import models_dir
    from visionroute.records import Analysis, Trace

    print(f"load average at start: {os.getloadavg()}")
    prepare_models(models_dir(), ["efficientnet_lite0"])
    photos = bench_photos()
    router_path, _ = classify_router(models_dir(), args.work_dir, photos)
    stage = OnnxStage(OnnxStageConfig(model="efficientnet_lite0"), models_dir=models_dir())
    artefact = RouterArtefact.load(router_path, class_names=tuple(stage.decoder.labels))
    router = ServedRouter.from_artefact(artefact)
    print(f"router {router_path.name}: features {artefact.spec.to_document()}")
    images = [decode_image(data).rgb for data in photos.values()]
    answers = stage.predict(images)[0]

    def analysis(i: int) -> Analysis:
        return Analysis(
            image_rgb=images[i % len(images)],
            image_sha256=str(i),
            task="classify",
            trace=Trace(),
            detections=answers[i % len(images)],
        )

    class State:  # what the stage reads of the cascade's state
        cheap_tier_failed = False
        arm = None
        route = None

    served_stage = RouterScoreStage({"classify": router})

    async def one_stage(i: int) -> float:
        state = State()
        state.analysis = analysis(i)
        await served_stage.run(state)
        return next(s for s in state.analysis.trace.steps if s.stage == "router").latency_ms

    for mode in ("warm", "after onnx"):
        features, cpu, stage_ms = [], [], []
        for i in range(args.rounds):
            if mode == "after onnx":
                stage.predict([images[i % len(images)]])
            started, cpu_started = time.perf_counter(), time.thread_time()
            router.scored(analysis(i))
            features.append((time.perf_counter() - started) * 1000.0)
            cpu.append((time.thread_time() - cpu_started) * 1000.0)
            if mode == "after onnx":
                stage.predict([images[i % len(images)]])
            stage_ms.append(asyncio.run(one_stage(i)))
        print(
            f"{mode:>10}: features+score p50 {_p50(features):.3f} ms (CPU {_p50(cpu):.3f} ms), "
            f"stage (its step's latency_ms) p50 {_p50(stage_ms):.3f} ms ({args.rounds} requests)"
        )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
