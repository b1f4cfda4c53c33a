"""``visionroute bench calibration|retrieval|vlm|audit`` (``bench serve`` is registered by router/cli.py).

Each benchmark module has ``run(args) -> int`` and is imported only when its command runs.
"""

from __future__ import annotations

import importlib

from visionroute import paths


def _runner(module: str):
    def run(args) -> int:
        return importlib.import_module(f"evals.benchmarks.{module}").run(args)

    return run


def register(subparsers, bench) -> None:
    calibration = bench.add_parser(
        "calibration", help="ECE before/after, validity over random splits, escalation needed"
    )
    calibration.add_argument("--splits", type=int, default=200)
    calibration.add_argument("--alpha", type=float, default=0.05)
    calibration.add_argument("--delta", type=float, default=0.1)
    calibration.add_argument("--method", default="temperature", choices=("temperature", "platt", "isotonic"))
    calibration.add_argument("--seed", type=int, default=0)
    calibration.add_argument("--json", help="also write the figures as JSON here")
    calibration.set_defaults(func=_runner("calibration"))

    retrieval = bench.add_parser("retrieval", help="exact vs HNSW vs IVF-PQ+refine; ONNX vs eager; zero-shot")
    retrieval.add_argument(
        "--parts", default="ann,rebuild,embed,zeroshot", help="comma list of ann, rebuild, embed, zeroshot"
    )
    retrieval.add_argument("--n", type=int, default=100_000)
    retrieval.add_argument("--dim", type=int, default=512)
    retrieval.add_argument(
        "--dim2", type=int, default=384, help="dimension of the heavy-tailed second distribution"
    )
    retrieval.add_argument(
        "--rebuild-n", type=int, default=100_000, help="vectors in the background-rebuild part"
    )
    retrieval.add_argument("--writes", type=int, default=300, help="timed writes before the rebuild")
    retrieval.add_argument("--queries", type=int, default=1000)
    retrieval.add_argument(
        "--ivfpq-1m", action="store_true", help="also IVF-PQ+refine on 1M vectors (~5 GB RAM)"
    )
    retrieval.add_argument("--clip-model", default="ViT-B-32")
    retrieval.add_argument(
        "--clip-pretrained", default=None, help="checkpoint path or tag (default: random weights)"
    )
    retrieval.add_argument("--images", type=int, default=64)
    retrieval.add_argument("--batch-size", type=int, default=16)
    retrieval.add_argument("--models-dir", default=str(paths.models_dir()))
    retrieval.set_defaults(func=_runner("retrieval"))

    vlm = bench.add_parser("vlm", help="vLLM server: sequential vs concurrent throughput, client overhead")
    vlm.add_argument(
        "--endpoint", help="an already running OpenAI-compatible server (default: start the tiny one)"
    )
    vlm.add_argument("--model", default="tiny-llava", help="served model name with --endpoint")
    vlm.add_argument("--requests", type=int, default=64)
    vlm.add_argument("--concurrency", type=int, default=8)
    vlm.set_defaults(func=_runner("vlm"))

    audit = bench.add_parser("audit", help="coverage of the audit estimator's bounds over simulated runs")
    audit.add_argument("--error-rates", type=float, nargs="+", default=[0.01, 0.03, 0.05, 0.1, 0.2])
    audit.add_argument("--accepted", type=int, default=5000)
    audit.add_argument("--fraction", type=float, default=0.05)
    audit.add_argument("--confidence", type=float, default=0.9)
    audit.add_argument("--runs", type=int, default=2000)
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--json")
    audit.set_defaults(func=_runner("audit"))

    importlib.import_module("evals.benchmarks.state").register(bench)
