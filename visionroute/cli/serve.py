"""``visionroute serve`` and ``visionroute check-config``.

``check-config`` prints what router/serve_config.py checks (every VisionRoute arg, every
cascade's model, the bind policy) and the versions traces will name; ``serve`` runs the same
checks first, prepares the packaged models the config names and runs ``serve run``
(router/serve_runner.py). Imports stay inside the functions: ``--help`` and ``check-config``
start without Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from router.serve_config import REPO_CONFIG


def _check(args) -> int:
    from router.serve_config import check_serve_config, load_serve_document
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
    from router.serve_config import check_serve_config, load_serve_document
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

    check = subparsers.add_parser(
        "check-config",
        help="validate a Ray Serve config: VisionRoute args, models, bind",
        description="Validate what a deploy would otherwise reject: every VisionRoute arg, every "
        "cascade's model and the bind policy (gRPC, or HTTP beyond loopback, without API keys). "
        "Prints what it checked and the policy and threshold versions traces will name.",
    )
    check.add_argument("config", type=Path, nargs="?", default=REPO_CONFIG)
    check.set_defaults(func=_check)
