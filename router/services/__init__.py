"""The service core: every operation of VisionRoute as plain classes, no FastAPI, no Ray.

    service = VisionRouteService.build(config, tiers=..., vlm_tiers=..., search=...)
    analysis = await service.analyze.analyze(ImageRequest(image_bytes, request_id), caller)

The faces only translate: router/http/api.py (HTTP routes) and router/grpc/ingress.py (the
gRPC servicer) turn a request into a call here and the result or ``RouterError`` back into
their protocol, through the one error table in router/errors.py. router/ingress.py is the
Ray Serve deployment that builds this service from deployment handles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from policies.budgets import BudgetLedger
from policies.review_queue import ReviewQueue
from policies.rollout_store import RolloutStore
from policies.runtime import PolicyRuntime
from router.config import AppConfig
from router.drift.service import DriftService
from router.metrics import IngressMetrics
from router.services.analyze import AnalyzeService, ImageRequest, response_body
from router.services.backends import CheapTierClient, SearchBackend, VlmTierClient
from router.services.batch import BatchService
from router.services.model_cards import ModelCards
from router.services.operations import Operations
from router.services.recalibration import RecalibrationService
from router.services.retention import RetentionTask
from router.services.review import ReviewService
from router.services.rollouts import RolloutService
from router.services.search import SearchOperations

__all__ = ["ImageRequest", "VisionRouteService", "response_body"]


@dataclass(frozen=True)
class VisionRouteService:
    config: AppConfig
    analyze: AnalyzeService
    review: ReviewService
    search: SearchOperations
    operations: Operations
    rollouts: RolloutService | None = None  # candidates beside the incumbents (docs/rollouts.md)
    drift: DriftService | None = None  # drift monitors of this replica (GET /v1/drift)
    models: ModelCards | None = None  # model cards (GET /v1/models)
    retention: RetentionTask | None = None  # image retention on a schedule (started with the service)
    batch: BatchService | None = None  # several images per request (POST /v1/analyze/batch)

    @classmethod
    def build(
        cls,
        config: AppConfig,
        *,
        tiers: Mapping[str, CheapTierClient],
        vlm_tiers: Mapping[str, VlmTierClient] | None = None,
        search: SearchBackend | None = None,
        candidate_tiers: Mapping[str, Mapping[str, CheapTierClient]] | None = None,
    ) -> VisionRouteService:
        """Open the durable state (review queue, budget ledger) and wire the operations."""
        vlm_tiers = vlm_tiers or {}
        queue = ReviewQueue(config.review.path, default_lease_s=config.review.lease_s, state=config.state)
        policies = PolicyRuntime(
            config.policies,
            BudgetLedger(config.review.path / "budgets.sqlite3", state=config.state),
            tasks=config.cascades,
            base_thresholds={task: cascade.policy for task, cascade in config.cascades.items()},
            calibrations={task: cascade.tier.calibration for task, cascade in config.cascades.items()},
        )
        metrics = IngressMetrics(policies, queue)
        drift = DriftService.from_app_config(config)
        metrics.registry.register(drift)  # visionroute_drift_score / _p_value / _alarm on /metrics
        rollouts = RolloutService(
            config,
            RolloutStore(config.review.path / "rollouts.sqlite3", state=config.state),
            policies,
            candidate_tiers or {},
        )
        rollouts.on_promotion = drift.reset  # a promoted candidate's scores become the new reference
        metrics.registry.register(rollouts)  # visionroute_rollout_* on /metrics
        retention = RetentionTask(queue, policies, config.review.retention_interval_s)
        retention.start()  # on the replica's event loop (Ray runs the constructor there); else a no-op
        analyze = AnalyzeService(
            config,
            tiers=tiers,
            vlm_tiers=vlm_tiers,
            search=search,
            queue=queue,
            policies=policies,
            metrics=metrics,
            rollouts=rollouts,
            drift=drift,
        )
        read_search = analyze.searched_after_indexing(search)  # sees this replica's queued indexing
        service = cls(
            config=config,
            analyze=analyze,
            review=ReviewService(
                config, queue=queue, policies=policies, search=read_search, rollouts=rollouts, drift=drift
            ),
            search=SearchOperations(read_search),
            operations=Operations(
                auth_enabled=config.security.enabled,
                tiers=tiers,
                vlm_tiers=vlm_tiers,
                search=search,
                queue=queue,
                policies=policies,
                metrics=metrics,
            ),
            rollouts=rollouts,
            drift=drift,
            models=ModelCards(config, lambda: policies.current),
            retention=retention,
            batch=BatchService(analyze, config.limits),
        )
        if config.rollouts.recalibrate.every_s is not None:  # recertify on a schedule (off by default)
            RecalibrationService.of(service).start_schedule(config.rollouts.recalibrate, config.cascades)
        return service
