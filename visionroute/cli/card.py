"""``visionroute card NAME`` and ``visionroute card --list``: model cards from a serve config,
offline (no running service; the same cards GET /v1/models/{name}/card serves)."""

from __future__ import annotations

import json
from pathlib import Path

from router.serve_config import REPO_CONFIG
from visionroute.errors import InputError


def _card(args) -> int:
    from router.serve_config import app_config
    from router.services.model_cards import ModelCards

    if args.list == bool(args.name):
        raise InputError("give a card NAME or --list (not both)", field="name")
    cards = ModelCards(
        app_config(args.config, args.app),
        reports_dir=Path(args.reports) if args.reports else None,
    )
    if args.list:
        rows = cards.list()
        if args.format == "json":
            print(json.dumps([row.to_json() for row in rows], indent=2))
        else:
            for row in rows:
                print(f"{row.name}\t{row.kind}\t{row.describes}")
        return 0
    card = cards.card(args.name)
    print(
        card.to_markdown() if args.format == "md" else card.model_dump_json(by_alias=True, indent=2), end=""
    )
    if args.format == "json":
        print()
    return 0


def register(subparsers, bench) -> None:
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
        "--config", type=Path, default=REPO_CONFIG, help="Ray Serve config (default: %(default)s)"
    )
    card.add_argument("--app", help="the VisionRoute application, when the config has several")
    card.add_argument(
        "--reports", help="where to look for `visionroute eval` reports (default: $VISIONROUTE_HOME/reports)"
    )
    card.set_defaults(func=_card)
