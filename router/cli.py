"""``visionroute serve``, ``visionroute check-config``, ``visionroute bench serve|decode``.

``check-config`` catches what would otherwise fail only at deploy time, with the setting named:
every key of the VisionRoute args (pydantic, ``extra="forbid"``), every cascade's model (a
prepared name, one ``visionroute models prepare`` builds, an existing file or a hub name) and
the bind policy (HTTP beyond loopback, or gRPC, without API keys needs
``security.allow_insecure_bind``). ``visionroute serve`` runs the same checks first.
Imports stay inside the functions: ``--help`` and ``check-config`` start without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionroute import paths

REPO_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"


@dataclass
class AppCheck:
    """One VisionRoute application of a serve config, validated."""

    name: str
    config: Any  # router.config.AppConfig
    versions: dict[str, Any]
    models: dict[str, str] = field(default_factory=dict)  # setting -> what was found
    to_prepare: list[str] = field(default_factory=list)  # packaged models `serve` will prepare


def load_serve_document(path: Path) -> dict:
    import yaml

    from visionroute.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist", field="config")
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}", field="config") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path} is not a Ray Serve config (a mapping)", field="config")
    return document


def _model_status(setting: str, model: str, models_dir: Path, packaged: set[str]) -> tuple[str, bool]:
    """(what the model is, whether `serve` must prepare it); ConfigError naming ``setting``."""
    from visionroute.errors import ConfigError

    if model.startswith("hf://"):
        if len(model.removeprefix("hf://").split("/")) < 3:
            raise ConfigError(f"{setting}: hub model must look like hf://owner/repo/file.onnx, got {model!r}")
        return "hub model, downloaded at deploy", False
    path = Path(model).expanduser()
    if path.suffix == ".onnx" or path.is_absolute() or "/" in model:
        if not path.is_file():
            raise ConfigError(f"{setting}: ONNX model file {model!r} does not exist", field=setting)
        return f"file {path}", False
    if (models_dir / f"{model}.onnx").is_file():
        return f"prepared in {models_dir}", False
    if model in packaged:
        return f"packaged, not prepared yet in {models_dir} (`visionroute serve` prepares it)", True
    raise ConfigError(
        f"{setting}: unknown model {model!r}: it is not prepared in {models_dir} and not one of the "
        f"packaged models {sorted(packaged)}; give a prepared name, a path to an .onnx file or "
        "hf://owner/repo/file.onnx",
        field=setting,
    )


def check_application(name: str, args: Any, endpoints: Any) -> AppCheck:
    from cascades.models import PACKAGED_MODELS
    from router.config import parse_app_config, resolved_versions
    from router.security import check_bind
    from visionroute.errors import ConfigError

    config = parse_app_config(args)
    checked = AppCheck(name, config, resolved_versions(config))
    packaged = set(PACKAGED_MODELS)
    models_dir = Path(config.models_dir)
    settings = {
        f"cascades.{task}.tier.model": cascade.tier.model for task, cascade in config.cascades.items()
    }
    for task, cascade in config.cascades.items():  # rollout candidates are deployed too
        for name, candidate in cascade.candidates.items():
            settings[f"cascades.{task}.candidates.{name}.tier.model"] = candidate.tier.model
    embedder = config.retrieval.embedder
    if config.retrieval.enabled and embedder.kind == "conse" and embedder.classifier_path:
        classifier = Path(embedder.classifier_path)
        settings["retrieval.embedder.classifier_path"] = (
            classifier.stem if classifier.parent == models_dir else str(classifier)
        )
    for setting, model in settings.items():
        status, prepare = _model_status(setting, str(model), models_dir, packaged)
        checked.models[setting] = f"{model}: {status}"
        if prepare and model not in checked.to_prepare:
            checked.to_prepare.append(str(model))
    try:
        check_bind(config.security, endpoints.http_host, endpoints.grpc_port is not None)
    except ConfigError as exc:
        where = []
        if endpoints.grpc_port is not None:
            where.append(f"grpc_options (port {endpoints.grpc_port})")
        where.append(f"http_options.host {endpoints.http_host!r}")
        raise ConfigError(
            f"application {name!r} would not start ({', '.join(where)}): {exc.reason}", field=exc.field
        ) from None
    return checked


def check_serve_config(path: Path) -> list[AppCheck]:
    """Validate every VisionRoute application of a Ray Serve config (ConfigError naming the
    setting if bad): its args, its models and the bind policy against the config's proxies."""
    from router.serve_runner import endpoints_of

    document = load_serve_document(path)
    endpoints = endpoints_of(document)
    return [
        check_application(application.get("name", "default"), application.get("args"), endpoints)
        for application in document.get("applications", []) or []
        if application.get("import_path") == "router.app:build_app"
    ]


def _check(args) -> int:
    from router.serve_runner import endpoints_of

    apps = check_serve_config(args.config)
    endpoints = endpoints_of(load_serve_document(args.config))
    grpc = f"gRPC on port {endpoints.grpc_port}" if endpoints.grpc_port else "gRPC off"
    print(f"listens: HTTP {endpoints.http_host}:{endpoints.http_port}, {grpc}")
    if not apps:
        print("no application imports router.app:build_app: nothing VisionRoute-specific to check")
    for app in apps:
        security = app.config.security
        keys = f"{len(security.api_keys)} API keys" if security.api_keys else "no API keys (auth off)"
        insecure = ", allow_insecure_bind" if security.allow_insecure_bind else ""
        print(f"application {app.name}: policy set {app.versions['policy_set']}; {keys}{insecure}")
        for task, version in app.versions["thresholds"].items():
            print(f"  {task}: thresholds {version}")
        for setting, found in app.models.items():
            print(f"  {setting}: {found}")
        print(f"  state: {state_summary(app.config.state)}")
    print(f"{args.config}: valid")
    return 0


def state_summary(state: Any) -> str:
    """Where the stores live; for PostgreSQL whether the DSN variable is set here (check-config
    may run on a machine that does not hold the secret; ``serve`` requires it)."""
    import os

    if state.backend == "sqlite":
        return "SQLite files under review.path and retrieval.index_dir (one node)"
    found = "set" if os.environ.get(state.dsn_env, "").strip() else "NOT SET here: the service will not start"
    return f"PostgreSQL from ${state.dsn_env} ({found}), pools of {state.pool_min}-{state.pool_max} per store"


def _serve(args) -> int:
    from cascades.models import prepare_models
    from router.serve_runner import endpoints_of, run_serve

    apps = check_serve_config(args.config)  # a typo, a bad model or bind fails here, before Ray starts
    for app in apps:
        if app.config.state.backend == "postgres":
            app.config.state.dsn()  # unset: a ConfigError naming state.dsn_env, before Ray starts
        if app.to_prepare:
            prepare_models(Path(app.config.models_dir), app.to_prepare)
    return run_serve(
        args.config, endpoints_of(load_serve_document(args.config)), ready_timeout_s=args.ready_timeout_s
    )


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
    )
    return 0


def _bench_decode(args) -> int:
    from evals.benchmarks.decode import run

    return run(args)


def register(subparsers, bench) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="prepare the default models and start the service on Ray Serve",
        description="Check the config (as check-config), prepare the packaged models it names, then "
        "`serve run` it with Ray's own servers on 127.0.0.1 and Ray's token auth on; prints "
        "'VisionRoute ready on http://HOST:PORT (gRPC :PORT)' once /readyz answers. SIGTERM or "
        "Ctrl-C shuts Serve down and exits 0. With RAY_ADDRESS set it joins that cluster instead.",
    )
    serve.add_argument(
        "--config", type=Path, default=REPO_CONFIG, help="Ray Serve config (default: %(default)s)"
    )
    serve.add_argument(
        "--ready-timeout-s", type=float, default=600.0, help="give up when /readyz has not answered by then"
    )
    serve.set_defaults(func=_serve)

    example = subparsers.add_parser("example", help="build, certify and serve a worked example")
    examples = example.add_subparsers(dest="example", required=True, metavar="EXAMPLE")
    digits_example = examples.add_parser(
        "digits",
        help="the three-tier digits cascade (cheap ONNX -> trained VLM on vLLM -> review), certified",
        description="Prepare digits_cheap, train or reuse the digits LLaVA and start its vLLM server, "
        "calibrate both tiers, certify the cheap and VLM accept thresholds and the review threshold, "
        "write serve_config.digits.yaml's copy with the artefacts and serve it (docs/vlm.md).",
    )
    from cascades.vlm.example_digits import add_arguments as add_example_digits_arguments

    add_example_digits_arguments(digits_example)

    check = subparsers.add_parser(
        "check-config",
        help="validate a Ray Serve config: VisionRoute args, models, bind",
        description="Validate what a deploy would otherwise reject: every VisionRoute arg, every "
        "cascade's model and the bind policy (gRPC, or HTTP beyond loopback, without API keys). "
        "Prints what it checked and the policy and threshold versions traces will name.",
    )
    check.add_argument("config", type=Path, nargs="?", default=REPO_CONFIG)
    check.set_defaults(func=_check)

    from router.card_cli import add_card_command

    add_card_command(subparsers, REPO_CONFIG)  # visionroute card NAME | --list

    from router.drift_cli import register as register_drift

    register_drift(subparsers)  # visionroute drift report

    from router.rollout_cli import register as register_rollout

    register_rollout(subparsers)  # visionroute rollout start|status|promote|rollback|finish

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
        help="smoke run: few requests, the first placement and indexing setting only",
    )
    serve_bench.add_argument("--json", help="also write the figures as JSON here")
    serve_bench.set_defaults(func=_bench_serve)

    decode_bench = bench.add_parser(
        "decode", help="peak RSS of 8 concurrent 6320x6320 images: unbounded vs decode budget"
    )
    decode_bench.add_argument("--clients", type=int, default=8)
    decode_bench.add_argument("--side", type=int, default=6320, help="image width = height in pixels")
    decode_bench.add_argument("--variants", nargs="+", default=["unbounded", "budgeted", "budgeted-jpeg"])
    decode_bench.add_argument("--json", help="also write the figures as JSON here")
    decode_bench.set_defaults(func=_bench_decode)
