"""The classifier replica's RSS under batches of varying size, in process: ONNX Runtime's
defaults (memory pattern on, no warm-up) against the session as ``OnnxModel`` builds it (memory
pattern off) warmed at every batch size as the serving tier does (``OnnxModel.warm_up``).

Like the soak, a short warm-up phase of small batches comes first, then the mark, then batches
of every size up to ``--max-batch`` (what serve.batch gathers after a fault's burst)::

    python -m evals.benchmarks.soak_onnx_memory --model ~/.visionroute/models/efficientnet_lite0.onnx

Each setting runs in its own process (RSS is per process); prints RSS at load, at the mark and
at the end, and the growth after the mark.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

SETTINGS = ("ort-defaults", "shipped")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def measure(setting: str, model_path: Path, iterations: int, max_batch: int, seed: int) -> dict:
    """One setting in this process: RSS at load, after the warm-up phase (the mark), at the end."""
    import numpy as np

    from cascades.onnx_runner import OnnxModel

    model = OnnxModel(model_path, intra_op_threads=1)
    if setting == "ort-defaults":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        model.session = ort.InferenceSession(str(model_path), options, providers=model.providers)
    loaded = rss_mib()
    if setting == "shipped":
        model.warm_up(max_batch)
    hw, channels = model.input_hw, model.input_channels
    if hw is None or channels is None:
        raise SystemExit(f"{model_path} has a dynamic image size: nothing to measure")
    rng = random.Random(seed)
    images = np.random.default_rng(seed).random((max_batch, channels, *hw), dtype=np.float32)
    warm_iterations = max(1, iterations // 10)
    for _ in range(warm_iterations):  # quiet traffic: small batches
        model.run(images[: rng.randint(1, min(4, max_batch))])
    mark = rss_mib()
    for _ in range(iterations - warm_iterations):
        model.run(images[: rng.randint(1, max_batch)])
    end = rss_mib()
    return {
        "setting": setting,
        "loaded_mib": round(loaded, 1),
        "mark_mib": round(mark, 1),
        "end_mib": round(end, 1),
        "growth_after_mark": round(end / mark - 1.0, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("~/.visionroute/models/efficientnet_lite0.onnx"))
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--max-batch", type=int, default=8, help="serve.batch's max_batch_size (8 shipped)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setting", choices=SETTINGS, help="run one setting here (the child process)")
    args = parser.parse_args(argv)
    model_path = args.model.expanduser()
    if args.setting:
        print(json.dumps(measure(args.setting, model_path, args.iterations, args.max_batch, args.seed)))
        return 0
    for setting in SETTINGS:
        child = [sys.executable, "-m", "evals.benchmarks.soak_onnx_memory", "--setting", setting]
        child += ["--model", str(model_path), "--iterations", str(args.iterations)]
        child += ["--max-batch", str(args.max_batch), "--seed", str(args.seed)]
        row = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
        print(
            f"{setting:<13} loaded {row['loaded_mib']:7.1f}  mark {row['mark_mib']:7.1f}  "
            f"end {row['end_mib']:7.1f} MiB  after the mark {row['growth_after_mark']:+.1%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
