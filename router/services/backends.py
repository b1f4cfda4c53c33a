"""What the service core calls: the cheap tier, the VLM tier and the search index.

Each is a small async protocol. The Ray faces (router/tiers.py) implement them over
deployment handles; the ``Local*`` classes here implement them in-process, so the core runs
and is tested without Ray.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cascades.pipeline import TierResult
from visionroute.records import Analysis


class CheapTierClient(Protocol):
    async def predict(self, image_rgb: np.ndarray) -> TierResult: ...

    async def describe(self) -> dict[str, Any]: ...


class VlmTierClient(Protocol):
    async def run(self, analysis: Analysis) -> Analysis: ...

    async def describe(self) -> dict[str, Any]: ...


class SearchBackend(Protocol):
    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A public ``retrieval.service.SearchService`` method by name; project errors raised as such."""
        ...


class LocalOnnxTier:
    """The cheap tier in the calling process, one image per call (no batching)."""

    def __init__(self, stage_config: dict[str, Any], models_dir: Path) -> None:
        from cascades.onnx_stage import OnnxStage, OnnxStageConfig

        self.stage = OnnxStage(OnnxStageConfig(**stage_config), models_dir=Path(models_dir))

    async def predict(self, image_rgb: np.ndarray) -> TierResult:
        return (await self.predict_many([image_rgb]))[0]

    async def predict_many(self, images: list[np.ndarray]) -> list[TierResult]:
        """Several images in one call (a batch request's: router/services/analyze/tier_calls.py)."""
        detections, latency_ms = await asyncio.to_thread(self.stage.predict, images)
        info = self.stage.describe()
        return [
            TierResult(
                detections=found,
                model=info["model"],
                model_version=info["model_version"],
                latency_ms=latency_ms,
                cost_units=self.stage.config.cost_units,
                calibration=info["calibration"],
            )
            for found in detections
        ]

    async def describe(self) -> dict[str, Any]:
        return {**self.stage.describe(), "placement": "local"}


class LocalVlmTier:
    """The VLM stage (client, slots, breaker) in the calling process."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage

    async def run(self, analysis: Analysis) -> Analysis:
        return await self.stage(analysis)

    async def describe(self) -> dict[str, Any]:
        config = self.stage.config
        return {"endpoint": config.endpoint, "model": config.model, "task": config.task}


class LocalSearch:
    """A SearchService in the calling process; its blocking calls run in a worker thread."""

    def __init__(self, service: Any) -> None:
        self.service = service

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method.startswith("_") or not callable(getattr(self.service, method, None)):
            raise AttributeError(f"SearchService has no method {method!r}")
        result = await asyncio.to_thread(getattr(self.service, method), *args, **kwargs)
        return result.model_dump() if hasattr(result, "model_dump") else result
