"""``visionroute review export|purge|stats``, ``visionroute privacy erase|audit``, ``visionroute budgets``:
the review side's durable stores (queue, search entries, budget ledger), opened directly."""

from __future__ import annotations

import json
from pathlib import Path

from visionroute import paths


def _where(args):
    """(review folder, StateConfig or None): from ``--config`` (a serve config: its review.path
    and state, so a PostgreSQL deployment is reached the way the service reaches it) or ``--path``."""
    if getattr(args, "config", None):
        from router.serve_config import app_config

        config = app_config(Path(args.config))
        return config.review.path, config.state
    return Path(args.path).expanduser(), None


def _queue(args):
    from policies.review_queue import ReviewQueue

    path, state = _where(args)
    return ReviewQueue(path, state=state)


def _ledger(args, *, must_exist: bool = False):
    from policies.budgets import BudgetLedger

    path, state = _where(args)
    if must_exist and state is None and not (path / "budgets.sqlite3").exists():
        return None
    return BudgetLedger(path / "budgets.sqlite3", state=state)


def _cmd_export(args) -> int:
    summary = _queue(args).export_calibration(args.out, task=args.task, tenant=args.tenant)
    print(json.dumps(summary, indent=2))
    out = Path(summary["out"])
    print(
        f"calibrate with: visionroute calibrate --images {out / 'images'} --labels {out / 'labels.csv'} --model MODEL"
    )
    return 0


def _cmd_purge(args) -> int:
    result = _queue(args).purge_images(args.ttl_s)
    ledger = _ledger(args, must_exist=True)
    if ledger is not None:
        result["budget_reservations_pruned"] = ledger.prune(args.ledger_keep_s)
    print(json.dumps(result))
    return 0


def _cmd_stats(args) -> int:
    from policies.audit_sampling import AuditConfig, estimate

    queue = _queue(args)
    config = AuditConfig()
    tasks = sorted({item.task for item in queue.iter_all()})
    audits = {
        task: estimate(task, *queue.audit_outcomes(task, config.window_items), config).to_dict()
        for task in tasks
    }
    print(json.dumps({**queue.stats(), "audit": audits}, indent=2))
    return 0


def _cmd_budgets(args) -> int:
    import yaml

    from policies.policy_set import parse_policy_set

    ledger = _ledger(args)
    rules = []
    if args.config:
        config = yaml.safe_load(Path(args.config).read_text())
        app = config["applications"][0]
        policy = next(
            (
                d["user_config"]
                for d in app.get("deployments", [])
                if d.get("name") == "Ingress" and "user_config" in d
            ),
            app.get("args", {}).get("policies"),
        )
        rules = parse_policy_set(policy).budgets
    print(json.dumps({"budgets": ledger.status(rules), "usage": ledger.usage()}, indent=2))
    return 0


def _cmd_erase(args) -> int:
    """Erase one item or one subject from every store (router/services/erasure.py), audited."""
    import getpass

    from router.services.erasure import Eraser, Subject

    subject = Subject.parse(args.subject) if args.subject else None  # bad input before any store opens
    queue, ledger, search_store = _queue(args), _ledger(args, must_exist=True), _search_store(args)
    eraser = Eraser(
        queue, search_store=search_store, ledger=ledger, actor=args.actor or f"cli:{getpass.getuser()}"
    )
    try:
        if subject is not None:
            result = eraser.erase_subject(subject, reason=args.reason)
        else:
            result = eraser.erase_item(args.item, reason=args.reason)
    finally:
        for store in (queue, ledger, search_store):
            if store is not None:
                store.close()
    print(json.dumps(result.to_json(), indent=2))
    return 0


def _cmd_privacy_audit(args) -> int:
    """The audit events of an item or an erasure, also once the item itself is erased."""
    queue = _queue(args)
    try:
        print(json.dumps(queue.audit_log(args.id), indent=2))
    finally:
        queue.close()
    return 0


def _search_store(args):
    """The search index's store (its metadata and vectors), or None where there is none."""
    from retrieval.store import MetadataStore

    if getattr(args, "config", None):
        from router.serve_config import app_config

        config = app_config(Path(args.config))
        if not config.retrieval.enabled:
            return None
        return MetadataStore(config.retrieval.index_dir / "items.sqlite", state=config.state, name="search")
    path = Path(args.index_dir).expanduser() / "items.sqlite"
    return MetadataStore(path) if path.is_file() else None


CONFIG_HELP = "a serve config: read its review.path and state (PostgreSQL deployments); overrides --path"


def register(subparsers, bench) -> None:
    default_path = str(paths.data_dir() / "review")
    review = subparsers.add_parser(
        "review", help="the human-review queue: export labels, purge images, stats"
    )
    commands = review.add_subparsers(dest="review_command", required=True)

    export = commands.add_parser(
        "export", help="reviewed items as a labelled set for `visionroute calibrate`"
    )
    export.add_argument(
        "--path", default=default_path, help="review folder (config review.path; default: %(default)s)"
    )
    export.add_argument(
        "--out", required=True, help="folder to write images/, labels.csv, labels.jsonl, traces.jsonl"
    )
    export.add_argument("--config", help=CONFIG_HELP)
    export.add_argument("--task", help="only this task")
    export.add_argument("--tenant", help="only this tenant")
    export.set_defaults(func=_cmd_export)

    purge = commands.add_parser(
        "purge", help="delete stored images older than the TTL; labels and audit stay"
    )
    purge.add_argument("--path", default=default_path)
    purge.add_argument("--config", help=CONFIG_HELP)
    purge.add_argument(
        "--ttl-s", type=float, default=30 * 86400.0, help="policy review.image_ttl_s (default: %(default)s)"
    )
    purge.add_argument(
        "--ledger-keep-s",
        type=float,
        default=7 * 86400.0,
        help="keep budget reservations of windows ended this recently",
    )
    purge.set_defaults(func=_cmd_purge)

    stats = commands.add_parser("stats", help="queue depth, SLA and audit estimates")
    stats.add_argument("--path", default=default_path)
    stats.add_argument("--config", help=CONFIG_HELP)
    stats.set_defaults(func=_cmd_stats)

    privacy = subparsers.add_parser("privacy", help="erase an item's or a subject's images and records")
    privacy_commands = privacy.add_subparsers(dest="privacy_command", required=True)
    erase = privacy_commands.add_parser(
        "erase",
        help="remove one review item, or one subject, from the review queue, search index and budget "
        "ledger (audited)",
    )
    target = erase.add_mutually_exclusive_group(required=True)
    target.add_argument("--item", help="a review item id")
    target.add_argument(
        "--subject",
        help="TENANT/sha256:<hex> (everything made from that image file) or TENANT/KEY (requests whose "
        "X-Request-Id is KEY or starts with KEY:); see docs/review.md, Privacy",
    )
    erase.add_argument("--path", default=default_path, help="review folder (config review.path)")
    erase.add_argument(
        "--index-dir",
        default=str(paths.data_dir() / "retrieval"),
        help="search index folder (config retrieval.index_dir; default: %(default)s)",
    )
    erase.add_argument("--config", help=CONFIG_HELP + " and retrieval.index_dir")
    erase.add_argument("--actor", help="who asks, for the audit log (default: cli:<user>)")
    erase.add_argument("--reason", default="erasure request", help="recorded in the audit log")
    erase.set_defaults(func=_cmd_erase)
    audit = privacy_commands.add_parser(
        "audit", help="the audit events of an item or an erasure (erasure:<id>), erased items included"
    )
    audit.add_argument("id", help="a review item id or an erasure id")
    audit.add_argument("--path", default=default_path, help="review folder (config review.path)")
    audit.add_argument("--config", help=CONFIG_HELP)
    audit.set_defaults(func=_cmd_privacy_audit)

    budgets = subparsers.add_parser("budgets", help="budget use in the current windows and cost totals")
    budgets.add_argument("--path", default=default_path, help="review folder holding budgets.sqlite3")
    budgets.add_argument(
        "--config",
        help="serve config YAML whose policy budgets to report (and whose review.path and state to read)",
    )
    budgets.set_defaults(func=_cmd_budgets)
