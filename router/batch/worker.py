"""The Ray Data actor of a batch job: one service core per actor, the analyse pipeline per item.

``BatchAnalyzer`` builds ``VisionRouteService`` from the serve config's ``AppConfig`` exactly as
the ingress does, with in-process tiers instead of deployment handles: the cheap tier gathered
across the batch (gather.py), each task's VLM stage (the service's client, slots and breaker;
this actor's share of the configured concurrency), the rollout candidates. Every item then runs
through ``AnalyzeService.analyze``: decode, arm, cheap tier, decide, VLM, review selection,
privacy and the durable queue write, budgets: the service's stages, not a copy. The batch does
not index images for search (``visionroute index`` does that for a folder).

Each item's request id derives from its id (``batch_request_id``), so a rerun of the same item
finds the review item it queued instead of making a second one (the queue is idempotent on
tenant + request id + kind). One item's failure is its row's error, never the batch's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from router.batch.gather import GatheredOnnxTier
from router.config import AppConfig
from router.services.common import REQUEST_ID_PATTERN
from visionroute.errors import InputError, PayloadTooLarge, RouterError
from visionroute.redaction import failure_summary

REQUEST_ID_PREFIX = "batch:"
RESULT_COLUMN = "result"  # one JSON record per item (output.py writes its columns)


def batch_request_id(item_id: str) -> str:
    """The request id of an item: ``batch:<id>`` when that is a valid request id, else
    ``batch:sha256:<32 hex>`` of the id. The same id always gives the same request id."""
    readable = f"{REQUEST_ID_PREFIX}{item_id}"
    if REQUEST_ID_PATTERN.fullmatch(readable):
        return readable
    digest = hashlib.sha256(item_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{REQUEST_ID_PREFIX}sha256:{digest}"


def vlm_share(total: int, actors: int) -> int:
    """One actor's slots of the VLM server's configured concurrency (at least one)."""
    return max(1, total // max(1, actors))


class BatchAnalyzer:
    """``map_batches`` callable: numpy batches of items in, one JSON ``result`` per item out."""

    def __init__(self, config: AppConfig, actors: int = 1) -> None:
        from cascades.vlm import VlmStage
        from router.services import VisionRouteService
        from router.services.backends import LocalOnnxTier, LocalVlmTier

        self.config = config
        self.loop = asyncio.new_event_loop()
        models_dir = Path(config.models_dir)
        self.tiers = {
            task: GatheredOnnxTier(cascade.tier.model_dump(), models_dir, cascade.max_batch_size)
            for task, cascade in config.cascades.items()
        }
        vlm_tiers = {
            task: LocalVlmTier(
                VlmStage(
                    cascade.vlm.model_copy(
                        update={
                            "max_concurrency": vlm_share(
                                cascade.vlm.max_concurrency * cascade.vlm_replicas, actors
                            )
                        }
                    )
                )
            )
            for task, cascade in config.cascades.items()
            if cascade.vlm is not None
        }
        candidates = {
            task: {
                name: LocalOnnxTier(c.tier.model_dump(), models_dir) for name, c in cascade.candidates.items()
            }
            for task, cascade in config.cascades.items()
            if cascade.candidates
        }
        # built outside a running loop: the retention schedule stays the service's own job
        self.service = VisionRouteService.build(
            config, tiers=self.tiers, vlm_tiers=vlm_tiers, search=None, candidate_tiers=candidates
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        columns = list(batch)
        rows = [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]
        results = self.loop.run_until_complete(self.analyze_rows(rows))
        return {RESULT_COLUMN: np.array([json.dumps(r, default=str) for r in results], dtype=object)}

    async def analyze_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in rows:
            tier = self._tier_of(row)
            if tier is not None:
                tier.expect(1)
        results = await asyncio.gather(*(self._one(row) for row in rows))
        if self.service.rollouts is not None:  # a rollout's shadow runs finish with their batch
            await self.service.rollouts.drain()
        return list(results)

    def _tier_of(self, row: dict[str, Any]) -> GatheredOnnxTier | None:
        if str(row["error"]):
            return None
        return self.tiers.get(str(row["task"]) or self.config.default_task)

    async def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        from router.services import ImageRequest, response_body

        item_id, tenant, task = str(row["id"]), str(row["tenant"]), str(row["task"])
        record: dict[str, Any] = {
            "id": item_id,
            "row": int(row["row"]),
            "source": str(row["source"]),
            "tenant": tenant or "default",
            "task": task or self.config.default_task,
            "request_id": batch_request_id(item_id),
        }
        if str(row["error"]):
            return {**record, **failed("InputError", str(row["error"]), str(row["error_field"]))}
        tier = self._tier_of(row)
        try:
            data = await self._read(str(row["kind"]), str(row["source"]))
            analysis = await self.service.analyze.analyze(
                ImageRequest(data, record["request_id"], task=task or None, tenant=tenant or None), None
            )
            body = response_body(analysis)
            return {
                **record,
                "tenant": analysis.tenant,
                "task": analysis.task,
                "status": "done",
                "decision": body["decision"],
                "answer": body["answer"],
                "text": body["text"],
                "review_item_id": body["review_item_id"],
                "cost_units": body["cost_units"],
                "policy_version": body["policy_version"],
                "image_sha256": body["image"]["sha256"],
                "trace": body["trace"],
                "finished_at": time.time(),
            }
        except RouterError as exc:
            field = "url" if exc.field == "image_url" else exc.field
            return {**record, **failed(type(exc).__name__, exc.reason, field)}
        except Exception as exc:  # a bug or a backend's own failure: this item's, logged in its row
            return {**record, **failed("InternalError", failure_summary(exc), None)}
        finally:
            if tier is not None and not GatheredOnnxTier.reached():
                tier.leave()

    async def _read(self, kind: str, source: str) -> bytes:
        limits = self.config.limits
        if kind == "url":
            from router.url_fetch import fetch_image_url

            return await fetch_image_url(source, limits.url_fetch, limits.max_body_bytes)
        return await asyncio.to_thread(read_file, Path(source), limits.max_body_bytes)


def read_file(path: Path, max_bytes: int) -> bytes:
    """A file's bytes, at most ``max_bytes`` (the service's body limit); InputError naming ``path``."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise PayloadTooLarge(
                f"file is {size} bytes; the limit is {max_bytes} (limits.max_body_bytes)", field="path"
            )
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"file {str(path)!r} does not exist", field="path") from None
    except IsADirectoryError:
        raise InputError(f"{str(path)!r} is a folder, not a file", field="path") from None
    except PermissionError:
        raise InputError(f"file {str(path)!r} cannot be read (permission denied)", field="path") from None


def failed(kind: str, reason: str, field: str | None) -> dict[str, Any]:
    """An item's error columns: it was not analysed, and why."""
    return {
        "status": "error",
        "error_kind": kind,
        "error": reason,
        "error_field": field or None,
        "finished_at": time.time(),
    }
