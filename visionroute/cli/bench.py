"""``visionroute bench NAME``: every benchmark (evals/benchmarks/), each printing a figure and its
baseline.

Each benchmark module has ``run(args) -> int`` and is imported only when its command runs.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from visionroute import paths


def _runner(module: str):
    def run(args) -> int:
        return importlib.import_module(f"evals.benchmarks.{module}").run(args)

    return run


def _bench_serve(args) -> int:
    from evals.benchmarks.serve import run_bench

    placements = ("ingress", "deployment") if args.placement == "both" else (args.placement,)
    indexing = {"both": (False, True), "off": (False,), "on": (True,)}[args.indexing]
    run_bench(
        Path(args.models_dir),
        requests=args.requests,
        clients=args.clients,
        max_batch_size=args.max_batch_size,
        placements=placements,
        indexing=indexing,
        faces=tuple(args.faces),
        intra_op_threads=args.intra_op_threads,
        redaction=args.redaction,
        quick=args.quick,
        json_path=Path(args.json) if args.json else None,
        batch_images=args.batch_images,
        routers={"both": (False, True), "off": (False,), "on": (True,)}[args.router],
        work_dir=Path(args.work_dir) if args.work_dir else None,
    )
    return 0


def _bench_decode(args) -> int:
    from evals.benchmarks.decode import run

    return run(args)


def _add_calibration(bench) -> None:
    calibration = bench.add_parser(
        "calibration",
        help="ECE before/after, validity over random splits, escalation needed, the certificate's power",
    )
    calibration.add_argument("--splits", type=int, default=200)
    calibration.add_argument("--alpha", type=float, default=0.05)
    calibration.add_argument("--delta", type=float, default=0.1)
    calibration.add_argument("--method", default="temperature", choices=("temperature", "platt", "isotonic"))
    calibration.add_argument("--seed", type=int, default=0)
    calibration.add_argument("--json", help="also write the figures as JSON here")
    calibration.add_argument(
        "--parts",
        default="ece,power",
        help="comma list of ece (items 1-3) and power (4: the certificate's power)",
    )
    calibration.add_argument(
        "--power-splits", type=int, default=1000, help="random draws per row of the power table"
    )
    calibration.add_argument(
        "--sizes", default="250,500,1000", help="labelled items per draw in the power table (comma list)"
    )
    calibration.set_defaults(func=_runner("calibration"))


def _add_retrieval(bench) -> None:
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
    retrieval.add_argument(
        "--writes", type=int, default=1000, help="timed writes before the rebuild (p99 of 1000)"
    )
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


def _add_vlm(bench) -> None:
    vlm = bench.add_parser("vlm", help="vLLM server: sequential vs concurrent throughput, client overhead")
    vlm.add_argument(
        "--endpoint", help="an already running OpenAI-compatible server (default: start the tiny one)"
    )
    vlm.add_argument("--model", default="tiny-llava", help="served model name with --endpoint")
    vlm.add_argument("--requests", type=int, default=64)
    vlm.add_argument("--concurrency", type=int, default=8)
    vlm.set_defaults(func=_runner("vlm"))


def _add_vlm_digits(bench) -> None:
    vlm_digits = bench.add_parser(
        "vlm-digits", help="the LLaVA trained on the digits via vLLM: held-out accuracy vs cheap tier, ECE"
    )
    vlm_digits.add_argument(
        "--endpoint", help="an already running server with the digits LLaVA (default: train/start one)"
    )
    vlm_digits.add_argument("--model", default="digits-llava", help="served model name with --endpoint")
    vlm_digits.add_argument("--model-dir", help="with --endpoint: the model's folder, for its version")
    vlm_digits.add_argument("--limit", type=int, help="first N calibration and held-out items only")
    vlm_digits.add_argument(
        "--splits", type=int, default=200, help="random splits for the three-tier certificate (0: off)"
    )
    vlm_digits.add_argument("--concurrency", type=int, default=8)
    vlm_digits.add_argument("--image-format", default="jpeg", choices=("jpeg", "png"))
    vlm_digits.add_argument("--models-dir", default=str(paths.models_dir()), help="the cheap tier's model")
    vlm_digits.add_argument("--json", help="also write the figures as JSON here")
    vlm_digits.set_defaults(func=_runner("vlm_digits"))


def _add_router(bench) -> None:
    router = bench.add_parser(
        "router",
        help="learned vs confidence router through the same certificate: cost/1000, accepted accuracy, "
        "tier shares, APGR/CPT; median and IQR over draws and seeds",
    )
    router.add_argument(
        "--task",
        default="digits,textures",
        help="comma list of tasks: registered names (evals.benchmarks.router.TASKS) or module:function "
        "loaders (default: %(default)s)",
    )
    router.add_argument("--seeds", default="0,1,2", help="training seeds of the tiers (comma list)")
    router.add_argument(
        "--draws", type=int, default=170, help="fit/certification draws per seed (3 seeds x 170 >= 500)"
    )
    router.add_argument(
        "--frontier-draws",
        type=int,
        default=5,
        help="draws per seed that also certify at every frontier alpha, for the plot (0: no plot)",
    )
    router.add_argument("--alpha", type=float, default=0.04)
    router.add_argument("--delta", type=float, default=0.1)
    router.add_argument(
        "--work-dir", default=None, help="trained tiers, plots and the JSON (default: data dir)"
    )
    router.add_argument("--json", default=None, help="figures, per-item and per-draw records (JSON)")
    router.add_argument(
        "--plot-dir", default=None, help="where router_frontier_<task>.png go (default: work dir)"
    )
    router.add_argument(
        "--input-features", action="store_true", help="add the shift guard's input statistics to the features"
    )
    router.add_argument(
        "--votes", action="store_true", help="add the neighbours' class vote and the output's log-odds"
    )
    router.set_defaults(func=_runner("router"))


def _add_cascade(bench) -> None:
    cascade = bench.add_parser(
        "cascade",
        help="three-tier digits cascade through the service: accuracy, tier shares, cost/1000 per policy",
    )
    cascade.add_argument(
        "--work-dir",
        default=str(paths.data_dir() / "bench-cascade"),
        help="the example's artefacts, serve config, review queue (default: %(default)s)",
    )
    cascade.add_argument("--json", help="also write the figures (and every item's record) as JSON here")
    cascade.add_argument(
        "--plot", help="PNG of the cost-accuracy frontier (default: WORK_DIR/cascade_frontier.png)"
    )
    cascade.add_argument("--concurrency", type=int, default=8, help="clients / VLM requests in flight")
    cascade.add_argument("--limit", type=int, help="first N held-out items only (a quick run)")
    cascade.add_argument(
        "--alpha",
        type=float,
        default=0.04,
        help="certificate's target error among accepted items (default %(default)s: all three tiers in use)",
    )
    cascade.set_defaults(func=_runner("cascade"))


def _add_audit(bench) -> None:
    audit = bench.add_parser("audit", help="coverage of the audit estimator's bounds over simulated runs")
    audit.add_argument("--error-rates", type=float, nargs="+", default=[0.01, 0.03, 0.05, 0.1, 0.2])
    audit.add_argument("--accepted", type=int, default=5000)
    audit.add_argument("--fraction", type=float, default=0.05)
    audit.add_argument("--confidence", type=float, default=0.9)
    audit.add_argument("--runs", type=int, default=2000)
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--json")
    audit.set_defaults(func=_runner("audit"))


def _add_rollout(bench) -> None:
    rollout = bench.add_parser(
        "rollout", help="anytime-valid rollout test: false promotion/rollback rates, labels to decide"
    )
    rollout.add_argument("--streams", type=int, default=1000, help="simulated rollouts per scenario")
    rollout.add_argument("--horizon", type=int, default=5000, help="labels per stream (both arms)")
    rollout.add_argument("--alpha", type=float, default=0.05)
    rollout.add_argument("--delta", type=float, default=0.05)
    rollout.add_argument("--incumbent-risk", type=float, default=0.02)
    rollout.add_argument("--equal-risk", type=float, default=0.03, help="both arms' risk, false-rollback row")
    rollout.add_argument(
        "--double-from",
        type=float,
        nargs="+",
        default=[0.02, 0.03, 0.04],
        help="incumbent risks of the 2x rows",
    )
    rollout.add_argument(
        "--candidate-share", type=float, default=0.5, help="share of labels from the candidate"
    )
    rollout.add_argument("--seed", type=int, default=0)
    rollout.add_argument("--json", help="also write the figures as JSON here")
    rollout.set_defaults(func=_runner("rollout"))


def _add_drift(bench) -> None:
    drift = bench.add_parser("drift", help="drift monitors: false alarms per 1000 windows, requests to alarm")
    drift.add_argument("--window-sizes", type=int, nargs="+", default=[10, 25, 50, 100])
    drift.add_argument("--windows", type=int, default=1000, help="unshifted windows per window size")
    drift.add_argument("--shifted-windows", type=int, default=100, help="windows per shift and size")
    drift.add_argument(
        "--references", type=int, default=1000, help="reference draws the windows are spread over"
    )
    drift.add_argument("--reference-size", type=int, default=200)
    drift.add_argument("--level", type=float, default=0.01, help="each monitor's false-alarm level")
    drift.add_argument("--permutations", type=int, default=200, help="MMD permutation test")
    drift.add_argument("--pool", type=int, default=800, help="unshifted requests featurised")
    drift.add_argument("--shifted-pool", type=int, default=250, help="requests featurised per shift")
    drift.add_argument("--models-dir", default=str(paths.models_dir()))
    drift.add_argument("--seed", type=int, default=0)
    drift.add_argument("--json", help="also write the figures as JSON here")
    drift.set_defaults(func=_runner("drift"))


def _add_privacy(bench) -> None:
    privacy = bench.add_parser(
        "privacy", help="face detector on lfw_subset and the astronaut; redaction latency vs plain enqueue"
    )
    privacy.add_argument("--sizes", default="160,96,48", help="square sizes lfw_subset is upscaled to")
    privacy.add_argument(
        "--min-confidence", type=float, default=0.9, help="MTCNN probability to count a face"
    )
    privacy.add_argument("--repeats", type=int, default=5, help="timed enqueues per photo and policy")
    privacy.add_argument("--models-dir", default=str(paths.models_dir()))
    privacy.add_argument("--json", help="also write the figures as JSON here")
    privacy.set_defaults(func=_runner("privacy"))


def _add_serve(bench) -> None:
    serve_bench = bench.add_parser(
        "serve", help="the service (HTTP, gRPC) vs a minimal Ray Serve floor vs raw ONNX Runtime (one run)"
    )
    serve_bench.add_argument("--models-dir", default=str(paths.models_dir()))
    serve_bench.add_argument("--requests", type=int, default=200)
    serve_bench.add_argument("--clients", type=int, default=8)
    serve_bench.add_argument("--max-batch-size", type=int, default=8)
    serve_bench.add_argument(
        "--placement",
        choices=("deployment", "ingress", "both"),
        default="both",
        help="where the classifier runs: its own deployment, inside the ingress, or both in turn",
    )
    serve_bench.add_argument(
        "--indexing",
        choices=("off", "on", "both"),
        default="both",
        help="search indexing of every analysed image: off, on (the shipped config), or both in turn",
    )
    serve_bench.add_argument("--faces", nargs="+", choices=("http", "grpc"), default=["http", "grpc"])
    serve_bench.add_argument(
        "--intra-op-threads",
        type=int,
        default=None,
        help="ONNX Runtime threads for raw, floor and service alike (default: the config's)",
    )
    serve_bench.add_argument(
        "--redaction",
        action="store_true",
        help="redact faces/text in stored review images as the shipped policy does (default: off, "
        "the targets are about the cheap path; `bench privacy` measures redaction)",
    )
    serve_bench.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: few requests from at most 2 clients, the first placement and indexing setting "
        "only, the service with the classify cascade alone",
    )
    serve_bench.add_argument(
        "--batch-images",
        type=int,
        default=16,
        help="images per POST /v1/analyze/batch: its per-image throughput against the single-image "
        "API's over HTTP at --clients clients (0: not measured; default: %(default)s)",
    )
    serve_bench.add_argument(
        "--router",
        choices=("off", "on", "both"),
        default="off",
        help="the classify cascade's learned router (issue 22): without, with a router fitted for it "
        "at bench time, or both in turn (the router stage's p50 and the cheap path off vs on)",
    )
    serve_bench.add_argument(
        "--work-dir", default=None, help="where the fitted router is cached (default: a temporary folder)"
    )
    serve_bench.add_argument("--json", help="also write the figures as JSON here")
    serve_bench.set_defaults(func=_bench_serve)


def _add_decode(bench) -> None:
    decode_bench = bench.add_parser(
        "decode", help="peak RSS of 8 concurrent 6320x6320 images: unbounded vs decode budget"
    )
    decode_bench.add_argument("--clients", type=int, default=8)
    decode_bench.add_argument("--side", type=int, default=6320, help="image width = height in pixels")
    decode_bench.add_argument("--variants", nargs="+", default=["unbounded", "budgeted", "budgeted-jpeg"])
    decode_bench.add_argument("--json", help="also write the figures as JSON here")
    decode_bench.set_defaults(func=_bench_decode)


def register(subparsers, bench) -> None:
    """Every benchmark's parser, in the order --help lists them."""
    _add_calibration(bench)
    _add_retrieval(bench)
    _add_vlm(bench)
    _add_vlm_digits(bench)
    _add_router(bench)
    _add_cascade(bench)
    _add_audit(bench)
    _add_rollout(bench)
    _add_drift(bench)
    _add_privacy(bench)
    importlib.import_module("evals.benchmarks.state").register(bench)
    importlib.import_module("evals.benchmarks.batch").register(bench)
    importlib.import_module("evals.benchmarks.loop").register(bench)
    recert = bench.add_parser("recert", help="production certificate: violations vs delta under audits")
    importlib.import_module("evals.benchmarks.recert").add_arguments(recert)
    recert.set_defaults(func=_runner("recert"))
    importlib.import_module("evals.benchmarks.soak").register(bench)
    _add_serve(bench)
    _add_decode(bench)
