"""A batch job's results: ``results.jsonl`` and ``parquet/part-*.parquet`` in the output folder.

Every item gets one record: its id, row, source, tenant, task and request id, and either
``status: done`` with the decision, answer, review item, cost, policy version and trace (the
service's own response), or ``status: error`` with the error's kind, reason and field. JSONL
keeps ``answer`` and ``trace`` as JSON objects; Parquet holds them as JSON strings (one schema
for every part, whatever the answers look like).

Both files grow across runs. A record reaches ``results.jsonl`` first (flushed and fsynced per
batch); Parquet parts are whole files written aside and renamed, every ``rows_per_part`` records.
A run that stopped between the two leaves records only in the JSONL: the next run writes them
to a part before it starts (``reconcile``), so both formats always end with the same items.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

JSONL_NAME = "results.jsonl"
PARQUET_DIR = "parquet"
JSON_COLUMNS = ("answer", "trace")  # objects in JSONL, JSON text in Parquet
STRING_COLUMNS = (
    "id",
    "source",
    "tenant",
    "task",
    "request_id",
    "status",
    "decision",
    "text",
    "review_item_id",
    "policy_version",
    "image_sha256",
    "error_kind",
    "error",
    "error_field",
)


def parquet_schema():
    import pyarrow as pa

    return pa.schema(
        [("row", pa.int64())]
        + [(name, pa.string()) for name in STRING_COLUMNS]
        + [(name, pa.string()) for name in JSON_COLUMNS]
        + [("cost_units", pa.float64()), ("finished_at", pa.float64())]
    )


def _parquet_row(record: dict[str, Any]) -> dict[str, Any]:
    row = {name: record.get(name) for name in ("row", *STRING_COLUMNS, "cost_units", "finished_at")}
    for name in JSON_COLUMNS:
        row[name] = json.dumps(record[name]) if record.get(name) is not None else None
    return row


class ResultWriter:
    """Appends records to both formats of one output folder."""

    def __init__(self, out: Path, *, rows_per_part: int = 1000, jsonl: bool = True) -> None:
        self.out = Path(out)
        self.parts = self.out / PARQUET_DIR
        self.parts.mkdir(parents=True, exist_ok=True)
        self.rows_per_part = max(1, rows_per_part)
        self.run_id = uuid.uuid4().hex[:12]
        self._pending: list[dict[str, Any]] = []
        self._part = 0
        self._jsonl = (self.out / JSONL_NAME).open("a", encoding="utf-8") if jsonl else None

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        records = list(records)
        if not records:
            return
        if self._jsonl is not None:
            self._jsonl.write("".join(json.dumps(r, default=str) + "\n" for r in records))
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
        self._pending.extend(records)
        if len(self._pending) >= self.rows_per_part:
            self.flush_part()

    def flush_part(self) -> None:
        if not self._pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([_parquet_row(r) for r in self._pending], schema=parquet_schema())
        final = self.parts / f"part-{self.run_id}-{self._part:05d}.parquet"
        temporary = final.with_suffix(".parquet.tmp")
        pq.write_table(table, temporary)
        os.replace(temporary, final)  # a part is whole or absent
        self._part += 1
        self._pending = []

    def close(self) -> None:
        self.flush_part()
        if self._jsonl is not None:
            self._jsonl.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def jsonl_records(out: Path) -> list[dict[str, Any]]:
    """Every whole record of ``results.jsonl`` (a line cut short by a crash is left out)."""
    path = Path(out) / JSONL_NAME
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "id" in record:
                records.append(record)
    return records


def parquet_statuses(out: Path) -> dict[str, set[str]]:
    """id -> the statuses its Parquet records have."""
    import pyarrow.parquet as pq

    statuses: dict[str, set[str]] = {}
    for part in sorted((Path(out) / PARQUET_DIR).glob("part-*.parquet")):
        table = pq.read_table(part, columns=["id", "status"])
        for item_id, status in zip(table.column("id").to_pylist(), table.column("status").to_pylist()):
            statuses.setdefault(item_id, set()).add(status)
    return statuses


def reconcile(out: Path) -> int:
    """Write to Parquet the JSONL records a stopped run left only there; how many."""
    in_parquet = parquet_statuses(out)
    missing = [r for r in jsonl_records(out) if r.get("status") not in in_parquet.get(r["id"], set())]
    if missing:
        with ResultWriter(out, rows_per_part=len(missing), jsonl=False) as writer:  # in the JSONL already
            writer.write(missing)
    return len(missing)


def finished_ids(out: Path, *, retry_errors: bool = False) -> set[str]:
    """The ids a rerun skips: every id with a record, or (``retry_errors``) with a done one."""
    statuses = parquet_statuses(out)
    for record in jsonl_records(out):
        statuses.setdefault(record["id"], set()).add(record.get("status"))
    return {item_id for item_id, seen in statuses.items() if not retry_errors or "done" in seen}


def read_results(out: Path) -> list[dict[str, Any]]:
    """The Parquet records (JSON columns parsed back), in the order they were written."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for part in sorted((Path(out) / PARQUET_DIR).glob("part-*.parquet"), key=lambda p: p.stat().st_mtime_ns):
        for row in pq.read_table(part).to_pylist():
            for name in JSON_COLUMNS:
                row[name] = json.loads(row[name]) if row[name] is not None else None
            rows.append(row)
    return rows
