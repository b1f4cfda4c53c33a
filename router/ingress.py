"""The Ray Serve ingress deployment: builds the service core from deployment handles and
serves it through both faces (HTTP: router/http/api.py, gRPC: router/grpc/ingress.py).

Nothing here decides anything: the operations live in router/services/.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from router.config import AppConfig
from router.grpc.ingress import GrpcEndpoints
from router.http.api import app
from router.http.deps import attach
from router.services import VisionRouteService
from router.services.sharded_search import ShardedSearch
from router.tiers import BatchedOnnxTier, InProcessTier, RemoteSearch, RemoteTier, RemoteVlmTier
from visionroute.redaction import failure_summary

log = logging.getLogger("visionroute.ingress")

# Ray Serve force-kills a stopping replica after graceful_shutdown_timeout_s (20 s), counted
# from the stop; its drain of ongoing requests takes >= graceful_shutdown_wait_loop_s (2 s).
STOP_WAIT_S = 10.0


def _tier(config: AppConfig, cheap: Any, handle: DeploymentHandle | None) -> Any:
    """A cheap tier (a task's or a rollout candidate's): its deployment's handle, or built inside
    this replica (placement ``ingress``)."""
    if cheap.placement == "deployment":
        return RemoteTier(handle)
    return InProcessTier(
        BatchedOnnxTier(
            cheap.tier.model_dump(), str(config.models_dir), cheap.max_batch_size, cheap.batch_wait_timeout_ms
        )
    )


def cheap_tiers(config: AppConfig, handles: dict[str, DeploymentHandle]) -> dict[str, Any]:
    """Each task's cheap tier."""
    return {task: _tier(config, cascade, handles.get(task)) for task, cascade in config.cascades.items()}


def candidate_tiers(
    config: AppConfig, handles: dict[str, dict[str, DeploymentHandle]]
) -> dict[str, dict[str, Any]]:
    """Each task's rollout candidates."""
    return {
        task: {
            name: _tier(config, candidate, handles.get(task, {}).get(name))
            for name, candidate in cascade.candidates.items()
        }
        for task, cascade in config.cascades.items()
        if cascade.candidates
    }


def search_backend(search: DeploymentHandle | list[DeploymentHandle] | None) -> Any:
    """One SearchTier deployment, or the shards of one index (scattered and merged)."""
    if search is None:
        return None
    if isinstance(search, list):
        return ShardedSearch([RemoteSearch(handle) for handle in search])
    return RemoteSearch(search)


@serve.deployment(max_ongoing_requests=100)
@serve.ingress(app)
class Ingress(GrpcEndpoints):  # + the gRPC methods (router/grpc/ingress.py)
    def __init__(
        self,
        config: AppConfig,
        tiers: dict[str, DeploymentHandle],
        vlm_tiers: dict[str, DeploymentHandle],
        search: DeploymentHandle | list[DeploymentHandle] | None = None,
        candidates: dict[str, dict[str, DeploymentHandle]] | None = None,
    ) -> None:
        # ``config`` arrives resolved by the app builder (router/app.py): never re-validated
        # here, so what every replica runs is exactly what `check-config` printed.
        self.service = VisionRouteService.build(
            config,
            tiers=cheap_tiers(config, tiers),
            vlm_tiers={task: RemoteVlmTier(handle) for task, handle in vlm_tiers.items()},
            search=search_backend(search),
            candidate_tiers=candidate_tiers(config, candidates or {}),
        )
        self.authenticator = attach(self.service, config.security)
        log.info("ingress ready: tasks %s, review queue %s", sorted(config.cascades), config.review.path)

    async def __del__(self) -> None:
        """Ray Serve's shutdown hook: it runs once this replica's requests have drained and
        before Serve removes the deployments this one calls (callers go first), so the work
        after responses (indexing, drift samples, shadow runs) is stopped while the search
        deployment still answers; what cannot finish in STOP_WAIT_S is dropped and logged."""
        service = getattr(self, "service", None)  # None: the constructor did not finish
        if service is None:
            return
        try:
            dropped, abandoned = await service.analyze.stop(STOP_WAIT_S)
            if service.retention is not None:
                await service.retention.stop()
        except Exception as exc:  # shutting down: one line, never a traceback
            log.warning(
                "ingress stopping: after-response work did not stop cleanly: %s", failure_summary(exc)
            )
            return
        log.info(
            "ingress stopped its after-response work (%d images not indexed, %d tasks abandoned)",
            dropped,
            abandoned,
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Ray Serve calls this with the Ingress ``user_config`` (a PolicySet) on every change,
        without restarting the replica. An invalid set is refused and the running set stays:
        it is logged at ERROR, counted in ``visionroute_policy_reconfigurations_total
        {result="rejected"}`` and listed in ``GET /v1/policy``."""
        self.service.operations.reconfigure(user_config)
