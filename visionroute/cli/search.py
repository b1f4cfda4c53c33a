"""``visionroute index <folder>`` and ``visionroute retrieval compact|stats|search``.

While the service runs it owns the index (one writer per ``index_dir``), so ``index``,
``retrieval search`` and ``retrieval stats`` go through its HTTP API when it answers at
``--url`` (default ``$VISIONROUTE_URL`` or http://127.0.0.1:8000; ``--api-key`` or
``$VISIONROUTE_API_KEY`` when the service has keys), through visionroute/client/. ``--local`` (or ``--index-dir`` /
``--config``) opens the index files directly instead, which needs the service stopped;
``compact`` always does.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path

from visionroute.client import DEFAULT_URL, ServiceClient, add_service_arguments, service_answers
from visionroute.errors import ConfigError, RouterError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def load_config(args):
    """The retrieval section from ``--config`` (a serve config or a bare section) plus flags."""
    import yaml

    from retrieval.config import RetrievalConfig

    section: dict = {}
    if args.config:
        document = yaml.safe_load(Path(args.config).read_text()) or {}
        if "applications" in document:
            section = (document["applications"][0].get("args") or {}).get("retrieval") or {}
        else:
            section = document.get("retrieval", document)
    if args.index_dir:
        section["index_dir"] = args.index_dir
    if args.models_dir:
        embedder = section.setdefault("embedder", {"kind": "conse"})
        if embedder.get("kind", "conse") == "conse":
            embedder["classifier_path"] = str(Path(args.models_dir) / "efficientnet_lite0.onnx")
    try:
        return RetrievalConfig.model_validate(section)
    except ValueError as exc:
        raise ConfigError(f"invalid retrieval config: {exc}", field="retrieval") from None


def remote(args) -> ServiceClient | None:
    """The running service's client, unless the index files are asked for (or none runs)."""
    if getattr(args, "local", False) or getattr(args, "index_dir", None) or getattr(args, "config", None):
        return None
    if not service_answers(args.url):
        return None
    return ServiceClient(args.url, args.api_key)


def check_not_open_elsewhere(index_dir: Path, url: str) -> None:
    """Fail at once, saying what to do, when a running service holds the index's writer lock."""
    lock_path = Path(index_dir) / "writer.lock"
    if not lock_path.exists():
        return
    with open(lock_path, "a+") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock_file, fcntl.LOCK_UN)
        except BlockingIOError:
            raise ConfigError(
                f"index {str(index_dir)!r} is open for writing in another process (the running "
                f"service owns it). Go through the service instead: drop --local/--index-dir/--config "
                f"and give --url (now {url}) and --api-key (or VISIONROUTE_API_KEY) if it has keys; "
                "or stop the service first",
                field="index_dir",
            ) from None


def _service(args):
    from retrieval.service import SearchService

    config = load_config(args)
    check_not_open_elsewhere(config.index_dir, getattr(args, "url", DEFAULT_URL))
    return SearchService(config)


def _index_folder(args) -> int:
    from tqdm import tqdm

    folder = Path(args.folder)
    if not folder.is_dir():
        raise ConfigError(f"{str(folder)!r} is not a folder", field="folder")
    pattern = "**/*" if args.recursive else "*"
    files = sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        print(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
        return 1
    client = remote(args)
    if client is not None:
        return _index_folder_remote(client, files, folder, args)
    counts = {"indexed": 0, "replaced": 0, "failed": 0}
    with _service(args) as service:
        progress = tqdm(total=len(files), desc="indexing", unit="image")
        for start in range(0, len(files), args.batch_size):
            batch = [
                _prepare_file(service, path, folder, args) for path in files[start : start + args.batch_size]
            ]
            try:
                service.index_images(
                    [b[1] for b in batch], [b[2] for b in batch], item_ids=[b[3] for b in batch]
                )
                done = batch
            except RouterError:
                # One bad file must not stop the folder: index this batch one by one.
                done = []
                for entry in batch:
                    try:
                        service.index_image(entry[1], entry[2], item_id=entry[3])
                        done.append(entry)
                    except RouterError as exc:
                        counts["failed"] += 1
                        tqdm.write(f"skipped {entry[0]}: {exc.reason}")
            counts["indexed"] += len(done)
            counts["replaced"] += sum(entry[3] is not None for entry in done)
            progress.update(len(batch))
        progress.close()
        print(json.dumps({**counts, **service.stats()}))
    return 0 if counts["failed"] == 0 else 1


def _index_folder_remote(client: ServiceClient, files: list[Path], folder: Path, args) -> int:
    """Index through the running service (POST /v1/search/items), replacing by content hash."""
    from tqdm import tqdm

    counts = {"indexed": 0, "replaced": 0, "failed": 0}
    print(f"indexing through the service at {client.url}")
    for path in tqdm(files, desc="indexing", unit="image"):
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        metadata = {
            "tenant": args.tenant,
            "tags": args.tag,
            "source": args.source or str(folder.resolve()),
            "image_sha256": sha,
            "extra": {"path": str(path.relative_to(folder))},
        }
        try:
            # a filtered search is exact once the filter matches at least k items
            same = client.search("image", k=1, filters={"tenant": args.tenant, "image_sha256": sha}).hits
            if same:
                client.delete_search_item(same[0].id)
            client.index_item(data, metadata)
        except RouterError as exc:
            counts["failed"] += 1
            tqdm.write(f"skipped {path}: {exc.reason}")
            continue
        counts["indexed"] += 1
        counts["replaced"] += bool(same)
    print(json.dumps({**counts, **client.search_stats().to_json()}))
    return 0 if counts["failed"] == 0 else 1


def _prepare_file(service, path: Path, folder: Path, args) -> tuple:
    """(path, bytes, metadata, id to replace or None)."""
    from retrieval.schemas import SearchFilters

    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    # Re-indexing a folder replaces items by content hash instead of doubling them.
    same = service.index.find(SearchFilters(tenant=args.tenant, image_sha256=sha))
    metadata = {
        "tenant": args.tenant,
        "tags": args.tag,
        "source": args.source or str(folder.resolve()),
        "image_sha256": sha,
        "extra": {"path": str(path.relative_to(folder))},
    }
    return path, data, metadata, (same[0] if same else None)


def _compact(args) -> int:
    with _service(args) as service:
        print(json.dumps(service.compact()))
    return 0


def _stats(args) -> int:
    client = remote(args)
    if client is not None:
        print(json.dumps(client.search_stats().to_json()))
        return 0
    with _service(args) as service:
        print(json.dumps(service.stats()))
    return 0


def _search(args) -> int:
    try:
        filters = json.loads(args.filters) if args.filters else None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--filters is not valid JSON: {exc}", field="filters") from None
    client = remote(args)
    if client is not None:
        response = client.search(args.query, k=args.k, filters=filters or None)
    else:
        with _service(args) as service:
            response = service.search_text(args.query, k=args.k, filters=filters)
    print(response.model_dump_json(indent=1))
    return 0


def _config_flags(parser, *, service: bool = True) -> None:
    if service:
        add_service_arguments(parser, key_help="API key", url_help="; used when it answers")
        parser.add_argument(
            "--local",
            action="store_true",
            help="open the index files directly, not through the service (the service must be stopped)",
        )
    parser.add_argument(
        "--config",
        help="serve_config.yaml (uses applications[0].args.retrieval) or a retrieval section YAML; implies --local",
    )
    parser.add_argument("--index-dir", help="override retrieval.index_dir; implies --local")
    parser.add_argument("--models-dir", help="where `visionroute models prepare` put efficientnet_lite0.onnx")


def register(subparsers, bench) -> None:
    index = subparsers.add_parser("index", help="embed and index every image in a folder (progress bar)")
    index.add_argument("folder")
    index.add_argument("--tenant", default="default")
    index.add_argument("--tag", action="append", default=[], help="tag for every image (repeatable)")
    index.add_argument("--source", help="metadata source (default: the folder's path)")
    index.add_argument("--batch-size", type=int, default=16)
    index.add_argument("--no-recursive", dest="recursive", action="store_false")
    _config_flags(index)
    index.set_defaults(func=_index_folder)

    retrieval = subparsers.add_parser("retrieval", help="maintain and query the search index")
    actions = retrieval.add_subparsers(dest="action", required=True)
    compact = actions.add_parser(
        "compact",
        help="rebuild the index from the store: drop deleted vectors, re-choose the kind (service stopped)",
    )
    _config_flags(compact, service=False)
    compact.set_defaults(func=_compact)
    stats = actions.add_parser("stats", help="index kind, item count, tombstones, size")
    _config_flags(stats)
    stats.set_defaults(func=_stats)
    search = actions.add_parser("search", help="text search from the command line")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5)
    search.add_argument("--filters", help='JSON, e.g. \'{"tenant": "acme", "tags_any": ["dock"]}\'')
    _config_flags(search)
    search.set_defaults(func=_search)
