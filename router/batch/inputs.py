"""What a batch job analyses: every image file under a folder, or the rows of a manifest.

A manifest is CSV (with a header), JSONL (one object a line) or Parquet, with a ``path`` or a
``url`` per row and optionally ``id``, ``tenant`` and ``task``. A relative path is relative to
the manifest's folder; an item's id defaults to its path (relative to the folder it was found
in) or its URL. A manifest that is missing or unreadable, or has a column outside those, is a
``ConfigError`` naming it; a bad row (no source, a bad tenant, a repeated id, a JSONL line that is
not an object) becomes that item's error in the output and the job goes on.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from router.services.common import TENANT_PATTERN
from visionroute.errors import ConfigError
from visionroute.redaction import shown

MANIFEST_COLUMNS = ("id", "path", "url", "tenant", "task")
MANIFEST_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
EXTRA = "\0extra"  # csv.DictReader's key for a row's values beyond the header
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class BatchItem:
    """One image to analyse. ``kind`` says how ``source`` is read (``path``: a file, ``url``:
    fetched under the service's URL rules); a row that cannot be analysed carries ``error``
    (its reason) and ``error_field`` instead, and is written to the output as such."""

    id: str
    row: int  # 1-based: the manifest's data row, or the file's position in the folder listing
    source: str = ""
    kind: str = ""  # path | url | "" (a bad row)
    tenant: str = ""  # "": the default tenant
    task: str = ""  # "": the config's default task
    error: str = ""
    error_field: str = ""

    @property
    def is_bad(self) -> bool:
        return bool(self.error)

    def as_record(self) -> dict[str, Any]:
        """The plain columns Ray Data carries to the actors (strings and one int)."""
        return {
            "id": self.id,
            "row": self.row,
            "source": self.source,
            "kind": self.kind,
            "tenant": self.tenant,
            "task": self.task,
            "error": self.error,
            "error_field": self.error_field,
        }


def read_items(source: Path) -> list[BatchItem]:
    """The items of a folder (its image files, recursively, in path order) or of a manifest."""
    source = Path(source).expanduser()
    if source.is_dir():
        return folder_items(source)
    if not source.exists():
        raise ConfigError(
            f"input {str(source)!r} does not exist (expected a folder or a manifest)", field="input"
        )
    kind = MANIFEST_SUFFIXES.get(source.suffix.lower())
    if kind is None:
        raise ConfigError(
            f"input {source.name!r} is neither a folder nor a manifest; a manifest ends in one of "
            f"{sorted(MANIFEST_SUFFIXES)}",
            field="input",
        )
    return checked_rows(_manifest_rows(source, kind), base=source.parent)


def folder_items(folder: Path) -> list[BatchItem]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [
        BatchItem(id=path.relative_to(folder).as_posix(), row=n, source=str(path.resolve()), kind="path")
        for n, path in enumerate(files, start=1)
    ]


def _manifest_rows(path: Path, kind: str) -> Iterator[dict[str, Any] | str]:
    """Each data row as a dict, or as the reason it could not be read (that row's error)."""
    try:
        if kind == "parquet":
            yield from _parquet_rows(path)
        elif kind == "csv":
            yield from _csv_rows(path)
        else:
            yield from _jsonl_rows(path)
    except ConfigError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise ConfigError(
            f"manifest {path.name!r} cannot be read as {kind}: {type(exc).__name__}: {exc}", field="manifest"
        ) from None


def _check_columns(columns: Iterable[str], path: Path) -> None:
    columns = list(columns)
    unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
    if unknown:
        raise ConfigError(
            f"manifest {path.name!r} has unknown column(s) {unknown}; expected some of {list(MANIFEST_COLUMNS)}",
            field="manifest",
        )
    if "path" not in columns and "url" not in columns:
        raise ConfigError(
            f"manifest {path.name!r} has no 'path' or 'url' column (columns: {columns})", field="manifest"
        )


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    _check_columns(table.column_names, path)
    yield from table.to_pylist()


def _csv_rows(path: Path) -> Iterator[dict[str, Any] | str]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, restkey=EXTRA)
        if reader.fieldnames is None:
            raise ConfigError(
                f"manifest {path.name!r} is empty (a CSV manifest needs a header)", field="manifest"
            )
        _check_columns(reader.fieldnames, path)
        for row in reader:
            if EXTRA in row:
                yield f"the row has {len(row[EXTRA])} value(s) more than the header's columns"
            elif None in row.values():
                yield "the row has fewer values than the header's columns"
            else:
                yield row


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any] | str]:
    with path.open(encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    seen_columns: set[str] = set()
    rows: list[dict[str, Any] | str] = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append(f"the line is not JSON: {exc.msg} at column {exc.colno}")
            continue
        if not isinstance(row, dict):
            rows.append(f"the line is a JSON {type(row).__name__}, not an object")
            continue
        seen_columns.update(row)
        rows.append(row)
    if seen_columns:
        _check_columns(sorted(seen_columns), path)
    yield from rows


def _text(row: dict[str, Any], name: str) -> str:
    """A string column's value ("" when absent); an integer id is taken as its digits."""
    value = row.get(name)
    if value is None:
        return ""
    if name == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__} {shown(value)}")
    return value.strip()


def checked_rows(rows: Iterable[dict[str, Any] | str], base: Path) -> list[BatchItem]:
    """Manifest rows -> items; a bad row keeps its place with its error."""
    items: list[BatchItem] = []
    first_row_of: dict[str, int] = {}
    for n, row in enumerate(rows, start=1):
        item = _item(n, row, base)
        if not item.is_bad:
            if item.id in first_row_of:
                item = replace(
                    item,
                    error=f"id {shown(item.id)} is repeated (first on row {first_row_of[item.id]})",
                    error_field="id",
                )
            else:
                first_row_of[item.id] = n
        items.append(item)
    return items


def _item(n: int, row: dict[str, Any] | str, base: Path) -> BatchItem:
    fallback_id = f"row-{n}"
    if isinstance(row, str):
        return BatchItem(id=fallback_id, row=n, error=row, error_field="manifest")
    try:
        path, url, tenant, task = (_text(row, name) for name in ("path", "url", "tenant", "task"))
        item_id = _text(row, "id")
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        return BatchItem(id=fallback_id, row=n, error=str(exc), error_field=name)
    item_id = item_id or path or url or fallback_id
    bad = BatchItem(id=item_id, row=n, tenant=tenant, task=task)
    if tenant and not TENANT_PATTERN.fullmatch(tenant):
        return replace(
            bad,
            error=f"tenant must be 1-128 characters from [A-Za-z0-9_.-], got {shown(tenant)}",
            error_field="tenant",
        )
    if path and url:
        return replace(bad, error="the row has both a path and a url; give one", error_field="path")
    if not path and not url:
        return replace(bad, error="the row has neither a path nor a url", error_field="path")
    if url:
        return replace(bad, source=url, kind="url")
    resolved = Path(path).expanduser()
    resolved = resolved if resolved.is_absolute() else base / resolved
    return replace(bad, source=str(resolved), kind="path")
