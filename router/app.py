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


def build_app(args: dict[str, Any] | None = None) -> Application:
    config = parse_app_config(args)
    tiers = {
        task: OnnxTier.options(
            name=f"onnx_{task}",
            num_replicas=cascade.replicas,
            ray_actor_options={"num_cpus": cascade.num_cpus},
        ).bind(
            cascade.tier.model_dump(),
            str(config.models_dir),
            cascade.max_batch_size,
            cascade.batch_wait_timeout_ms,
        )
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
    search = (
        SearchTier.options(
            name="search", num_replicas=1, ray_actor_options={"num_cpus": config.search_num_cpus}
        ).bind(config.retrieval.model_dump(mode="json"))
        if config.retrieval.enabled
        else None
    )
    return Ingress.options(
        num_replicas=config.ingress_replicas, ray_actor_options={"num_cpus": config.ingress_num_cpus}
    ).bind(config, tiers, vlm_tiers, search)  # the resolved config itself: replicas never re-validate it
