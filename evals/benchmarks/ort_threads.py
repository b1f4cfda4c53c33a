"""ONNX Runtime's thread settings, in process: CPU and wall time per inference with 1 and 2
intra-op threads, spinning on and off, on the machine as it is and beside a busy competitor.

ORT's idle worker threads spin (busy-wait) for the next inference by default; on a 2-core
machine shared by many processes (pytest, Ray replicas, vLLM) that spinning is CPU taken from
them. Each setting builds its own session and runs ``--seconds`` of single-image inferences with
``--gap-ms`` of sleep between them (requests that arrive apart, as in serving and in tests);
CPU is the process's user+sys over the whole loop (the spinning between inferences included)
per inference::

    python -m evals.benchmarks.ort_threads                       # efficientnet_lite0 + a tiny model
    python -m evals.benchmarks.ort_threads --rounds 3 --seconds 2

"competitor": one ``python -c "while True: pass"`` runs for the duration of the measurement
(started before, killed after). Rounds interleave the settings and the two conditions; the
table gives medians over rounds and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETTINGS = [(threads, spin) for threads in (1, 2) for spin in (True, False)]


def tiny_model(path: Path) -> Path:
    """ReduceMean + MatMul over a (n, 3, 32, 32) input: the size of most test models."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.eye(3, dtype=np.float32), "weight")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["images"], ["means"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["means", "weight"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def measure(path: Path, threads: int, spin: bool, seconds: float, gap_s: float) -> dict[str, float]:
    from cascades.onnx_runner import OnnxModel

    model = OnnxModel(
        path, providers=["CPUExecutionProvider"], intra_op_threads=threads, thread_spinning=spin
    )
    hw = model.input_hw or (224, 224)
    image = np.random.default_rng(0).random((1, model.input_channels or 3, *hw), dtype=np.float32)
    for _ in range(3):
        model.run(image)
    walls: list[float] = []
    cpu0, started = time.process_time(), time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        model.run(image)
        walls.append(time.perf_counter() - t0)
        if gap_s:
            time.sleep(gap_s)
    cpu = time.process_time() - cpu0
    del model
    gc.collect()
    return {"cpu_ms": 1e3 * cpu / len(walls), "wall_ms": 1e3 * statistics.median(walls), "n": len(walls)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_model = Path("~/.visionroute/models/efficientnet_lite0.onnx").expanduser()
    parser.add_argument(
        "--model", type=Path, action="append", help=f"ONNX file(s) (default {default_model} and a tiny model)"
    )
    parser.add_argument("--seconds", type=float, default=1.5, help="per setting, condition and round")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="sleep between inferences")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        models = args.model or [m for m in (default_model,) if m.is_file()] + [
            tiny_model(Path(tmp, "tiny.onnx"))
        ]
        rows: dict[tuple, list[dict]] = {}
        load_start = os.getloadavg()
        for _ in range(args.rounds):
            for condition in ("as is", "competitor"):
                busy = None
                if condition == "competitor":
                    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                try:
                    for path in models:
                        for threads, spin in SETTINGS:
                            key = (path.stem, condition, threads, spin)
                            result = measure(path, threads, spin, args.seconds, args.gap_ms / 1e3)
                            rows.setdefault(key, []).append(result)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
        load_end = os.getloadavg()
    print(
        f"load average (1, 5, 15 min) start {tuple(round(x, 1) for x in load_start)}, "
        f"end {tuple(round(x, 1) for x in load_end)}; {args.rounds} rounds x {args.seconds} s, "
        f"gap {args.gap_ms} ms; medians over rounds"
    )
    print("| model | condition | threads | spinning | CPU ms / inference | wall p50 ms | inferences |")
    print("|---|---|---|---|---|---|---|")
    for (model, condition, threads, spin), results in rows.items():
        cpu = statistics.median(r["cpu_ms"] for r in results)
        wall = statistics.median(r["wall_ms"] for r in results)
        n = sum(r["n"] for r in results)
        print(
            f"| {model} | {condition} | {threads} | {'on' if spin else 'off'} | {cpu:.2f} | {wall:.2f} | {n} |"
        )


if __name__ == "__main__":
    main()
