"""``run_batch``: one batch job, from its input to its output folder, on Ray Data.

    items = read_items(folder or manifest)              # inputs.py
    todo  = items not finished in the output folder     # output.py (a rerun skips them)
    ray.data.from_items(todo)
        .map_batches(BatchAnalyzer, batch_format="numpy", concurrency=actors)   # worker.py
        -> ResultWriter: results.jsonl + parquet/part-*.parquet, as batches finish

It runs on the Ray cluster at ``address`` (the service's: ``auto`` or ``host:port``), or on a
Ray of its own (``local``, the default). The driver keeps only the item list and a progress bar.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.batch.inputs import BatchItem, read_items
from router.batch.output import ResultWriter, finished_ids, reconcile
from router.batch.worker import RESULT_COLUMN, BatchAnalyzer
from router.config import AppConfig
from visionroute.errors import ConfigError

log = logging.getLogger("visionroute.batch")


@dataclass
class BatchSummary:
    """What one run did: items in the input, skipped (finished before), analysed, failed."""

    out: Path
    total: int = 0
    skipped: int = 0
    done: int = 0
    errors: int = 0
    decisions: Counter = field(default_factory=Counter)
    error_fields: Counter = field(default_factory=Counter)  # field (or kind) -> rows
    first_errors: dict[str, str] = field(default_factory=dict)  # field (or kind) -> its first reason
    review_items: int = 0
    seconds: float = 0.0  # from submitting the dataset to the last record written
    first_result_s: float | None = None  # when the first record arrived (actor start-up included)

    @property
    def images_per_s(self) -> float:
        return (self.done + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def count(self, record: dict[str, Any]) -> None:
        if record.get("status") == "done":
            self.done += 1
            self.decisions[record.get("decision") or "none"] += 1
            self.review_items += record.get("review_item_id") is not None
        else:
            self.errors += 1
            where = record.get("error_field") or record.get("error_kind") or "unknown"
            self.error_fields[where] += 1
            self.first_errors.setdefault(where, f"{record.get('error_kind')}: {record.get('error')}")

    def lines(self) -> list[str]:
        decisions = ", ".join(f"{k} {v}" for k, v in sorted(self.decisions.items())) or "none"
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.error_fields.items()))
        return [
            f"items: {self.total} in the input, {self.skipped} finished before (skipped), "
            f"{self.done} analysed, {self.errors} errors" + (f" ({errors})" if errors else ""),
            *(f"  first {where} error: {reason}" for where, reason in sorted(self.first_errors.items())),
            f"decisions: {decisions}; review items: {self.review_items}",
            f"time: {self.seconds:.1f} s, {self.images_per_s:.1f} items/s",
            f"output: {self.out}/results.jsonl and {self.out}/parquet/",
        ]


def run_batch(
    config: AppConfig,
    source: Path,
    out: Path,
    *,
    address: str | None = "local",
    actors: int = 1,
    num_cpus: float = 1.0,
    batch_size: int = 32,
    retry_errors: bool = False,
    progress: bool = True,
    rows_per_part: int = 1000,
    ray_init: dict[str, Any] | None = None,
) -> BatchSummary:
    """Analyse every item of ``source`` not finished in ``out``; write each one's record there."""
    items = read_items(source)  # a missing or malformed manifest fails here, before Ray starts
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recovered = reconcile(out)
    if recovered:
        log.info("batch: %d records of a stopped run written to Parquet", recovered)
    finished = finished_ids(out, retry_errors=retry_errors)
    todo = [item for item in items if item.id not in finished]
    summary = BatchSummary(out=out, total=len(items), skipped=len(items) - len(todo))
    if not todo:
        return summary
    started_ray = _connect(address, ray_init or {})
    try:
        _run(config, todo, out, summary, actors, num_cpus, batch_size, progress, rows_per_part)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return summary


def _connect(address: str | None, ray_init: dict[str, Any]) -> bool:
    """Join ``address`` (or start a local Ray); True when this job started it (and stops it)."""
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, **ray_init)
    except (ConnectionError, SystemExit) as exc:  # Ray exits when no GCS answers there
        raise ConfigError(
            f"no Ray cluster answered at {address!r} ({type(exc).__name__}: {exc}); give 'local', "
            "'auto' (the cluster started on this machine) or the head's HOST:PORT",
            field="address",
        ) from None
    return True


def _run(
    config: AppConfig,
    todo: list[BatchItem],
    out: Path,
    summary: BatchSummary,
    actors: int,
    num_cpus: float,
    batch_size: int,
    progress: bool,
    rows_per_part: int,
) -> None:
    import ray.data
    from tqdm import tqdm

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one bar: items written (below)
    batch_size = max(1, batch_size)
    dataset = ray.data.from_items(
        [item.as_record() for item in todo], override_num_blocks=max(1, math.ceil(len(todo) / batch_size))
    )
    results = dataset.map_batches(
        BatchAnalyzer,
        fn_constructor_kwargs={"config": config, "actors": actors},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, actors)),
        num_cpus=num_cpus,
    )
    started = time.perf_counter()
    with (
        ResultWriter(out, rows_per_part=rows_per_part) as writer,
        tqdm(total=len(todo), unit="image", desc="batch", disable=not progress) as bar,
    ):
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            records = [json.loads(text) for text in batch[RESULT_COLUMN]]
            writer.write(records)
            if summary.first_result_s is None:
                summary.first_result_s = time.perf_counter() - started
            for record in records:
                summary.count(record)
            bar.update(len(records))
    summary.seconds = time.perf_counter() - started
