"""The tiers as Ray Serve deployments, and the clients the Ingress calls them through.

The cheap tier runs either as its own deployment (``placement: deployment``: scales apart
from the ingress, one more hop per request) or inside each Ingress replica
(``placement: ingress``: no hop, batching still by ``serve.batch``). Both sit behind the same
two-method client, so the cascade code does not know which.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from cascades.onnx_stage import OnnxStage, OnnxStageConfig
from cascades.pipeline import TierResult
from cascades.vlm import VlmConfig, VlmStage
from router.services.backends import LocalSearch
from visionroute.errors import BackendUnavailable, Conflict, RouterError
from visionroute.records import Analysis
from visionroute.redaction import failure_kind, failure_summary

log = logging.getLogger("visionroute.tiers")


class BatchedOnnxTier:
    """One ONNX model; concurrent ``predict`` calls are gathered into batches by serve.batch."""

    def __init__(
        self, stage_config: dict[str, Any], models_dir: str, max_batch_size: int, batch_wait_timeout_ms: float
    ) -> None:
        self.stage = OnnxStage(OnnxStageConfig(**stage_config), models_dir=Path(models_dir))
        self.cost_units = self.stage.config.cost_units
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_timeout_ms / 1000.0)
        self.stage.model.warm_up(max_batch_size)  # RSS steady from the first request (docs/soak.md)
        # One inference at a time per replica, single-image batches and batch requests alike
        # (serve.batch already runs one batch at a time): the model's intra-op threads take the
        # cores, so concurrent runs only oversubscribe them. 8 concurrent 16-image requests in
        # process: 24-27 -> 21-23 ms CPU per image (docs/operations.md, issue 24).
        self._inference = asyncio.Lock()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def predict(self, images: list[np.ndarray]) -> list[TierResult]:
        # ONNX Runtime releases the GIL; a thread keeps this replica's loop free to gather
        # the next batch while this one runs.
        return await self.predict_many(images)

    async def predict_many(self, images: list[np.ndarray]) -> list[TierResult]:
        """One batch request's images at once (router/services/analyze/tier_calls.py): one
        call, the stage stacks them up to the model's batch size; after the inference in flight
        on this replica, if any."""
        async with self._inference:
            detections, latency_ms = await asyncio.to_thread(self.stage.predict, images)
        info = self.stage.describe()
        return [
            TierResult(
                detections=d,
                model=info["model"],
                model_version=info["model_version"],
                latency_ms=latency_ms,
                cost_units=self.cost_units,
                calibration=info["calibration"],
            )
            for d in detections
        ]

    def describe(self) -> dict[str, Any]:
        return self.stage.describe()


OnnxTier = serve.deployment(max_ongoing_requests=64, name="OnnxTier")(BatchedOnnxTier)


def unwrapped(exc: BaseException) -> BaseException:
    """Ray wraps a replica's exception (RayTaskError(InputError), which is also an InputError
    by inheritance but names itself after Ray); give back our own error, as raised."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, RouterError) else exc


async def _described(what: str, call: Any) -> dict[str, Any]:
    """A tier's ``describe``; a failure is a BackendUnavailable whose reason keeps the kind
    and drops the replica's pid, node address and actor id (the full error is logged)."""
    try:
        return await call
    except Exception as exc:
        cause = unwrapped(exc)
        if isinstance(cause, RouterError):
            raise cause from None
        log.warning("%s describe failed: %r", what, exc)
        raise BackendUnavailable(f"{what} is unavailable: {failure_summary(exc)}", field=what) from None


class RemoteTier:
    """A tier deployment reached through its handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def predict(self, image_rgb: np.ndarray) -> TierResult:
        return await self.handle.predict.remote(image_rgb)

    async def predict_many(self, images: list[np.ndarray]) -> list[TierResult]:
        return await self.handle.predict_many.remote(images)

    async def describe(self) -> dict[str, Any]:
        return await _described("the cheap tier", self.handle.describe.remote())


class RemoteVlmTier:
    """The VlmTier deployment reached through its handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def run(self, analysis: Analysis) -> Analysis:
        return await self.handle.run.remote(analysis)

    async def describe(self) -> dict[str, Any]:
        return await _described("the VLM tier", self.handle.describe.remote())


class RemoteSearch:
    """The SearchTier deployment; our own errors come back as themselves, others as 503."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self.handle.call.remote(method, *args, **kwargs)
        except Exception as exc:  # a RayTaskError(InputError) is a RouterError too: unwrap it
            cause = unwrapped(exc)
            if isinstance(cause, RouterError):
                raise cause from None
            log.error("search %s failed: %r", method, exc)  # Serve's log lines carry the request id
            raise BackendUnavailable(
                f"visual search failed ({type(failure_kind(exc)).__name__}); "
                "the details are logged with this request id",
                field="retrieval",
            ) from None


class InProcessTier:
    """The same tier inside the calling replica (placement: ingress)."""

    def __init__(self, tier: BatchedOnnxTier) -> None:
        self.tier = tier

    async def predict(self, image_rgb: np.ndarray) -> TierResult:
        return await self.tier.predict(image_rgb)

    async def predict_many(self, images: list[np.ndarray]) -> list[TierResult]:
        return await self.tier.predict_many(images)

    async def describe(self) -> dict[str, Any]:
        return {**self.tier.describe(), "placement": "ingress"}


@serve.deployment(max_ongoing_requests=32)
class VlmTier:
    """The escalation tier: one VlmStage (client, slots, breaker) per replica."""

    def __init__(self, vlm_config: dict[str, Any]) -> None:
        self.stage = VlmStage(VlmConfig.model_validate(vlm_config))

    async def run(self, analysis: Analysis) -> Analysis:
        return await self.stage(analysis)

    async def describe(self) -> dict[str, Any]:
        """Config plus whether the VLM server answers now (readiness reports it, informative)."""
        import httpx

        config = self.stage.config
        described = {"endpoint": config.endpoint, "model": config.model, "task": config.task}
        if config.backend != "openai":
            return described
        try:
            async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
                response = await client.get(config.endpoint.rstrip("/") + "/models")
            described["reachable"] = response.status_code == 200
        except httpx.HTTPError as exc:
            described.update(reachable=False, error_detail=failure_summary(exc))
        return described


@serve.deployment(max_ongoing_requests=32)
class SearchTier:
    """Visual search: one SearchService (embedder + this replica's FAISS copy of its shard),
    following the index's shared store; any replica takes writes (retrieval/index.py)."""

    def __init__(
        self,
        retrieval_config: dict[str, Any],
        state_config: dict[str, Any] | None = None,
        shard: int = 0,
        shards: int = 1,
    ) -> None:
        from retrieval.config import RetrievalConfig
        from retrieval.embedders import build_embedder
        from visionroute.state import StateConfig

        config = RetrievalConfig.model_validate(retrieval_config)
        state = StateConfig.model_validate(state_config or {})
        embedder = build_embedder(config.embedder)
        stable = config.index_dir if shards == 1 else config.index_dir / "replicas" / f"shard{shard}"
        try:
            # The first replica of a shard on a node keeps one folder across restarts: its
            # snapshot makes the next start fast.
            self.service = self._open(config, embedder, state, stable, (shard, shards))
        except Conflict:
            # Another replica on this node holds it: a folder of this replica's own, a cache it
            # builds from the shared store.
            own = self._own_folder(config.index_dir, shard)
            self.service = self._open(config, embedder, state, own, (shard, shards))
        self.local = LocalSearch(self.service)

    @staticmethod
    def _open(config: Any, embedder: Any, state: Any, folder: Any, shard: tuple[int, int]) -> Any:
        import socket

        from retrieval.service import SearchService

        return SearchService(
            config,
            embedder=embedder,
            state=state,
            replica_dir=folder,
            replica_id=f"{socket.gethostname()}:{folder}",
            shard=shard,
        )

    @staticmethod
    def _own_folder(index_dir: Any, shard: int) -> Any:
        context = serve.get_replica_context()
        replica = context.replica_id.unique_id if context is not None else uuid.uuid4().hex[:12]
        return index_dir / "replicas" / f"shard{shard}-{replica}"

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One entry point so the API can reach any public SearchService method by name."""
        return await self.local.call(method, *args, **kwargs)
