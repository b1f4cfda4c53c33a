"""``visionroute card NAME`` and ``visionroute card --list``: model cards from a serve config,
offline (no running service; the same cards GET /v1/models/{name}/card serves)."""

from __future__ import annotations

import json
from pathlib import Path

from visionroute.errors import ConfigError, InputError

BUILD_APP = "router.app:build_app"


def app_config_from_serve_file(path: Path, app_name: str | None = None):
    """The ``AppConfig`` of one VisionRoute application in a Ray Serve config (the only one, or
    ``app_name``), parsed as a deploy parses it (certified thresholds resolved)."""
    from router.cli import load_serve_document
    from router.config import parse_app_config

    applications = [
        app
        for app in load_serve_document(path).get("applications", []) or []
        if app.get("import_path") == BUILD_APP
    ]
    if not applications:
        raise ConfigError(f"{path} has no application that imports {BUILD_APP}", field="config")
    names = [app.get("name", "default") for app in applications]
    if app_name is None:
        if len(applications) > 1:
            raise ConfigError(
                f"{path} has {len(applications)} VisionRoute applications {names}; pick one with --app"
            )
        return parse_app_config(applications[0].get("args"))
    if app_name not in names:
        raise ConfigError(f"no application {app_name!r} in {path}; expected one of {names}", field="app")
    return parse_app_config(applications[names.index(app_name)].get("args"))


def _card(args) -> int:
    from router.services.model_cards import ModelCards

    if args.list == bool(args.name):
        raise InputError("give a card NAME or --list (not both)", field="name")
    cards = ModelCards(
        app_config_from_serve_file(args.config, args.app),
        reports_dir=Path(args.reports) if args.reports else None,
    )
    if args.list:
        rows = cards.list()
        if args.format == "json":
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                print(f"{row['name']}\t{row['kind']}\t{row['describes']}")
        return 0
    card = cards.card(args.name)
    print(
        card.to_markdown() if args.format == "md" else card.model_dump_json(by_alias=True, indent=2), end=""
    )
    if args.format == "json":
        print()
    return 0


def add_card_command(subparsers, default_config: Path) -> None:
    card = subparsers.add_parser(
        "card",
        help="a deployed model's or policy set's card (Markdown or JSON), from the config",
        description="Model cards, generated offline from a serve config: each task's cheap tier "
        "(<task>.<model>), rollout candidate (<task>.candidate.<name>) and VLM tier "
        "(<task>.vlm.<model>), and the policy set (policy-set.<version>). The same cards as "
        "GET /v1/models/{name}/card (docs/rollouts.md).",
    )
    card.add_argument("name", nargs="?", help="the card's name (see --list)")
    card.add_argument("--list", action="store_true", help="list the cards' names")
    card.add_argument("--format", choices=("md", "json"), default="md", help="default: %(default)s")
    card.add_argument(
        "--config", type=Path, default=default_config, help="Ray Serve config (default: %(default)s)"
    )
    card.add_argument("--app", help="the VisionRoute application, when the config has several")
    card.add_argument(
        "--reports", help="where to look for `visionroute eval` reports (default: $VISIONROUTE_HOME/reports)"
    )
    card.set_defaults(func=_card)
