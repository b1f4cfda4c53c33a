"""A Ray Serve config file (``serve_config.yaml``) read and checked before anything starts.

``check_serve_config`` catches what would otherwise fail only at deploy time, with the setting
named: every key of the VisionRoute args (pydantic, ``extra="forbid"``), every cascade's model
(a prepared name, one ``visionroute models prepare`` builds, an existing file or a hub name) and
the bind policy (HTTP beyond loopback, or gRPC, without API keys needs
``security.allow_insecure_bind``). ``visionroute check-config`` prints it; ``visionroute serve``,
``visionroute example digits`` and the benchmarks that start the service run it first.
Imports stay inside the functions: checking a config starts without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionroute.errors import ConfigError

IMPORT_PATH = "router.app:build_app"  # what a VisionRoute application names in a serve config
REPO_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"  # the shipped config


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

    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist", field="config")
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}", field="config") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path} is not a Ray Serve config (a mapping)", field="config")
    return document


def app_config(path: Path, app_name: str | None = None) -> Any:
    """The ``AppConfig`` of one VisionRoute application in a Ray Serve config (the only one, or
    ``app_name``), parsed as a deploy parses it (certified thresholds resolved)."""
    from router.config import parse_app_config

    applications = [
        app
        for app in load_serve_document(Path(path)).get("applications", []) or []
        if app.get("import_path") == IMPORT_PATH
    ]
    if not applications:
        raise ConfigError(f"{path} has no application that imports {IMPORT_PATH}", field="config")
    names = [app.get("name", "default") for app in applications]
    if app_name is None:
        if len(applications) > 1:
            raise ConfigError(
                f"{path} has {len(applications)} VisionRoute applications {names}; pick one with --app",
                field="config",
            )
        return parse_app_config(applications[0].get("args"))
    if app_name not in names:
        raise ConfigError(f"no application {app_name!r} in {path}; expected one of {names}", field="app")
    return parse_app_config(applications[names.index(app_name)].get("args"))


def _model_status(setting: str, model: str, models_dir: Path, packaged: set[str]) -> tuple[str, bool]:
    """(what the model is, whether `serve` must prepare it); ConfigError naming ``setting``."""
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
    from router.auth.keys import check_bind
    from router.config import parse_app_config, resolved_versions

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
        if application.get("import_path") == IMPORT_PATH
    ]
