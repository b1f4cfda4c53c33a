"""The typed Ray Serve app builder that ``serve_config.yaml`` points at.

    import_path: router.app:build_app

One ``.bind()`` expression shows the whole graph: an ``OnnxTier`` per configured task (and a
``VlmTier`` for each task with a VLM, and one ``SearchTier`` when retrieval is enabled), composed
behind the HTTP ``Ingress``.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from router.config import parse_app_config
from router.ingress import Ingress
from router.tiers import OnnxTier, SearchTier, VlmTier


def search_shards(config: Any) -> Any:
    """The ``search`` deployment (one shard), or ``search_0`` .. ``search_{n-1}``; each with
    ``search_replicas`` replicas following the shared store."""
    n = config.search_shards
    shards = [
        SearchTier.options(
            name="search" if n == 1 else f"search_{s}",
            num_replicas=config.search_replicas,
            ray_actor_options={"num_cpus": config.search_num_cpus},
        ).bind(config.retrieval.model_dump(mode="json"), config.state.model_dump(mode="json"), s, n)
        for s in range(n)
    ]
    return shards[0] if n == 1 else shards


def onnx_deployment(name: str, cheap: Any, config: Any) -> Any:
    """The ``OnnxTier`` deployment of one cheap tier (a task's or a rollout candidate's)."""
    return OnnxTier.options(
        name=name, num_replicas=cheap.replicas, ray_actor_options={"num_cpus": cheap.num_cpus}
    ).bind(cheap.tier.model_dump(), str(config.models_dir), cheap.max_batch_size, cheap.batch_wait_timeout_ms)


def build_app(args: dict[str, Any] | None = None) -> Application:
    config = parse_app_config(args)
    tiers = {
        task: onnx_deployment(f"onnx_{task}", cascade, config)
        for task, cascade in config.cascades.items()
        if cascade.placement == "deployment"  # placement "ingress": built inside the Ingress
    }
    vlm_tiers = {
        task: VlmTier.options(
            name=f"vlm_{task}",
            num_replicas=cascade.vlm_replicas,
            ray_actor_options={"num_cpus": cascade.vlm_num_cpus},
        ).bind(cascade.vlm.model_dump(mode="json"))
        for task, cascade in config.cascades.items()
        if cascade.vlm is not None
    }
    candidate_tiers = {  # added beside the incumbent by `serve deploy`, in place
        task: {
            name: onnx_deployment(f"onnx_{task}__{name}", candidate, config)
            for name, candidate in cascade.candidates.items()
            if candidate.placement == "deployment"
        }
        for task, cascade in config.cascades.items()
        if cascade.candidates
    }
    search = search_shards(config) if config.retrieval.enabled else None
    return Ingress.options(
        num_replicas=config.ingress_replicas, ray_actor_options={"num_cpus": config.ingress_num_cpus}
    ).bind(
        config, tiers, vlm_tiers, search, candidate_tiers
    )  # the resolved config itself: replicas never re-validate it
