"""``visionroute review export|import-label-studio|purge|stats``, ``visionroute privacy
erase|audit``, ``visionroute budgets``: the review side's durable stores (queue, search entries,
budget ledger), opened directly."""

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
    from policies.review.export import Export

    queue = _queue(args)
    try:
        summary = Export(queue.database, queue.blobs).export(
            args.out,
            args.format,
            task=args.task,
            tenant=args.tenant,
            status=None if args.status == "all" else args.status,
            image_url=args.image_url,
        )
    finally:
        queue.close()
    print(json.dumps(summary, indent=2))
    out = Path(summary["out"])
    if args.format in ("calibration", "csv"):
        print(
            f"calibrate with: visionroute calibrate --images {out / 'images'} --labels {out / 'labels.csv'}"
            " --model MODEL"
        )
    elif args.format == "label-studio":
        print(
            "import into Label Studio (docs/review.md, 'Label Studio'), then bring the labels back with:"
            " visionroute review import-label-studio EXPORT.json"
        )
    return 0


def _cmd_import_label_studio(args) -> int:
    """A Label Studio JSON export back in as labels: per task imported, unchanged, skipped or
    refused (with the field and the reason); exit 1 when any task was refused."""
    from policies.review.label_import import LabelImport, summary
    from policies.review.label_studio import parse_export
    from visionroute.errors import InputError

    document = _read_json(args.file, "file")
    reviewers = _read_json(args.reviewers, "reviewers") if args.reviewers else None
    if reviewers is not None and not (
        isinstance(reviewers, dict) and all(isinstance(v, str) and v for v in reviewers.values())
    ):
        raise InputError(
            "the reviewer map is a JSON object from Label Studio user id or email to reviewer name",
            field="reviewers",
        )
    read = parse_export(document, reviewers)  # bad input is refused before the queue opens
    queue = _queue(args)
    try:
        outcomes = LabelImport(queue.database).apply(read, tenant=args.tenant)
        observed = _rollout_evidence(args, queue, [o.item_id for o in outcomes if o.status == "imported"])
    finally:
        queue.close()
    result = {**summary(outcomes), "rollout_labels": observed}
    print(json.dumps(result, indent=2))
    return 1 if result["refused"] else 0


def _rollout_evidence(args, queue, item_ids: list[str]) -> int:
    """Imported labels of a rollout's audit or shadow items are its sequential test's evidence,
    as labels given in the queue are (each item counts once); returns how many were added. A
    promotion it causes is adopted by the service's next read of the rollouts."""
    from policies.rollout_store import RolloutStore
    from router.services.rollouts import rollout_evidence
    from visionroute.errors import NotFound

    evidence = [(item_id, rollout_evidence(queue.get(item_id))) for item_id in item_ids]
    evidence = [(item_id, found) for item_id, found in evidence if found is not None]
    if not evidence:
        return 0
    path, state = _where(args)
    store = RolloutStore(path / "rollouts.sqlite3", state=state)
    try:
        for item_id, (rollout_id, arm, wrong) in evidence:
            try:
                store.observe(rollout_id, arm, is_error=wrong, item_id=item_id)
            except NotFound:  # the rollout is gone: the label stays, as in the queue
                continue
    finally:
        store.close()
    return len(evidence)


def _read_json(path: str, field: str):
    """The file's JSON, checked as a request body is (router/services/common.py ``parsed_json``:
    UTF-8, nesting bounded, no NaN or lone surrogates), or an InputError naming ``field``."""
    from router.services.common import parsed_json
    from visionroute.errors import InputError

    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}", field=field) from None
    return parsed_json(data, field)


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


# Mirrors policies.review.export (FORMATS, LOCAL_FILES_URL): this module imports nothing heavy at
# registration, so `visionroute --help` stays fast; a test checks they agree.
EXPORT_FORMATS = ["calibration", "csv", "jsonl", "label-studio", "coco"]
LOCAL_FILES_URL = "/data/local-files/?d=images/"
CONFIG_HELP = "a serve config: read its review.path and state (PostgreSQL deployments); overrides --path"


def register(subparsers, bench) -> None:
    default_path = str(paths.data_dir() / "review")
    review = subparsers.add_parser(
        "review", help="the human-review queue: export and import labels, purge images, stats"
    )
    commands = review.add_subparsers(dest="review_command", required=True)

    export = commands.add_parser(
        "export",
        help="review items as a labelled set (calibrate, eval), Label Studio tasks, COCO, CSV or JSONL",
    )
    export.add_argument(
        "--path", default=default_path, help="review folder (config review.path; default: %(default)s)"
    )
    export.add_argument("--out", required=True, help="folder to write the files and images/ into")
    export.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="calibration",
        help="calibration: images/, labels.csv, labels.jsonl, traces.jsonl (default); csv: images/ +"
        " labels.csv (classes); jsonl: labels.jsonl + traces.jsonl; label-studio: import tasks with the"
        " cascade's answer as a prediction + the labelling interface, per task; coco: boxes, per task",
    )
    export.add_argument(
        "--status",
        choices=["pending", "labelled", "all"],
        default="pending",
        help="label-studio only: which items become tasks (default: %(default)s; the other formats"
        " export labelled items)",
    )
    export.add_argument(
        "--image-url",
        default=LOCAL_FILES_URL,
        help="label-studio only: data.image is this + the image's file name in OUT/images/ (default:"
        " %(default)s, Label Studio's local files with OUT as its document root)",
    )
    export.add_argument("--config", help=CONFIG_HELP)
    export.add_argument("--task", help="only this task")
    export.add_argument("--tenant", help="only this tenant")
    export.set_defaults(func=_cmd_export)

    imports = commands.add_parser(
        "import-label-studio",
        help="a Label Studio JSON export back in as labels (reviewer and item version checked)",
    )
    imports.add_argument("file", help="Label Studio's JSON export of tasks that `review export` wrote")
    imports.add_argument("--path", default=default_path, help="review folder (config review.path)")
    imports.add_argument("--config", help=CONFIG_HELP)
    imports.add_argument(
        "--reviewers",
        help="JSON object: Label Studio user id or email -> reviewer name; users not in it are refused"
        " (default: the user's email, else label-studio:<id>)",
    )
    imports.add_argument("--tenant", help="only this tenant's items (others are refused as unknown)")
    imports.set_defaults(func=_cmd_import_label_studio)

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
