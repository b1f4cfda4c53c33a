"""``visionroute serve`` (prepare models, then Ray Serve) and ``visionroute bench serve``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from visionroute import paths

REPO_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"


def check_serve_config(path: Path) -> list[dict]:
    """Validate every VisionRoute application's args in a Ray Serve config (ConfigError if bad);
    returns each application's resolved versions (router.config.resolved_versions)."""
    import yaml

    from router.config import parse_app_config, resolved_versions
    from visionroute.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist", field="config")
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}", field="config") from None
    resolved = []
    for application in document.get("applications", []):
        if application.get("import_path") == "router.app:build_app":
            config = parse_app_config(application.get("args"))
            resolved.append({"application": application.get("name", "default"), **resolved_versions(config)})
    return resolved


def _check(args) -> int:
    for app in check_serve_config(args.config):
        print(f"application {app['application']}: policy set {app['policy_set']}")
        for task, version in app["thresholds"].items():
            print(f"  {task}: thresholds {version}")
    print(f"{args.config}: valid")
    return 0


def _serve(args) -> int:
    from cascades.models import prepare_models

    check_serve_config(args.config)  # a typo fails here, with the key's name, before Ray starts
    prepare_models(Path(args.models_dir))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    serve_cli = Path(sys.executable).with_name("serve")
    command = [str(serve_cli), "run", str(args.config)]
    print("starting:", " ".join(command), flush=True)
    # exec: SIGTERM/SIGINT reach `serve run` directly, which shuts Ray Serve down cleanly.
    os.execve(command[0], command, env)
    return 0  # not reached


def _bench_serve(args) -> int:
    from evals.benchmarks.serve import run_bench

    placements = ("deployment", "ingress") if args.placement == "both" else (args.placement,)
    run_bench(
        Path(args.models_dir),
        requests=args.requests,
        clients=args.clients,
        max_batch_size=args.max_batch_size,
        placements=placements,
    )
    return 0


def register(subparsers, bench) -> None:
    serve = subparsers.add_parser(
        "serve", help="prepare the default models and start the service on Ray Serve"
    )
    serve.add_argument(
        "--config", type=Path, default=REPO_CONFIG, help="Ray Serve config (default: %(default)s)"
    )
    serve.add_argument("--models-dir", default=str(paths.models_dir()))
    serve.set_defaults(func=_serve)

    check = subparsers.add_parser("check-config", help="validate a Ray Serve config's VisionRoute args")
    check.add_argument("config", type=Path, nargs="?", default=REPO_CONFIG)
    check.set_defaults(func=_check)

    serve_bench = bench.add_parser("serve", help="HTTP through Ray Serve vs raw ONNX Runtime (same images)")
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
    serve_bench.set_defaults(func=_bench_serve)
