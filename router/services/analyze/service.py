"""Analyse one image: the declared pipeline of stages (pipeline.py) over one request context.

No FastAPI and no Ray here: the faces hand in bytes and the caller, and get back the
``Analysis`` (the shared record) whose ``response_body`` both faces return.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cascades.decode_budget import DecodeBudget, input_need
from cascades.image_redaction import Redactor
from policies.review_queue import ReviewQueue
from policies.runtime import PolicyRuntime
from router.auth.principal import Principal
from router.config import AppConfig, served_routers
from router.metrics import IngressMetrics
from router.services.analyze.after_response import (
    AfterResponseMetrics,
    AfterResponseWork,
    IndexQueue,
    ReadYourWrites,
)
from router.services.analyze.context import ImageRequest, RequestContext
from router.services.analyze.pipeline import analyze_pipeline
from router.services.backends import CheapTierClient, SearchBackend, VlmTierClient
from visionroute.records import Analysis

log = logging.getLogger("visionroute.service.analyze")

if TYPE_CHECKING:
    from router.services.analyze.tier_calls import Lane
    from router.services.rollouts import RolloutService


class AnalyzeService:
    def __init__(
        self,
        config: AppConfig,
        *,
        tiers: Mapping[str, CheapTierClient],
        vlm_tiers: Mapping[str, VlmTierClient],
        search: SearchBackend | None,
        queue: ReviewQueue,
        policies: PolicyRuntime,
        metrics: IngressMetrics,
        rollouts: RolloutService | None = None,
        drift: Any = None,  # router.services.drift.DriftService
    ) -> None:
        self.config = config
        self.tiers = dict(tiers)
        self.vlm_tiers = dict(vlm_tiers)
        self.search = search
        self.queue = queue
        self.policies = policies
        self.metrics = metrics
        self.rollouts = rollouts
        self.drift = drift
        self.redactor = Redactor(config.models_dir)  # privacy: detectors load on first use
        self.decode_budget = DecodeBudget(config.limits.decode)  # pixels in flight on this replica
        self.input_needs = {
            task: input_need(cascade.tier, config.models_dir, has_vlm=cascade.vlm is not None)
            for task, cascade in config.cascades.items()
        }
        self.routers = served_routers(config)  # the tasks' learned routers (cascades.router_stage)
        after_metrics = _after_response_metrics(metrics)
        # work the answer does not need, bounded: spawned stages, and indexing (batched)
        self.after_response = AfterResponseWork(
            config.limits.after_response_max_tasks,
            after_metrics,
            rollouts.spawn if rollouts is not None else None,
        )
        self.indexer = IndexQueue(search, config.retrieval, after_metrics)
        self.pipeline = analyze_pipeline(self)

    def searched_after_indexing(self, search: SearchBackend | None) -> SearchBackend | None:
        """``search`` for the other operations of this replica: each call first waits for the
        analysed images this replica queued for indexing (read your own writes)."""
        if search is None or not self.indexer.enabled or self.indexer.mode != "eventual":
            return search  # durable: every acknowledged image is written before its response
        return ReadYourWrites(search, self.indexer)

    async def analyze(
        self, request: ImageRequest, caller: Principal | None, lane: Lane | None = None
    ) -> Analysis:
        """The pipeline for one image, under one policy version from start to end; its decoded
        pixels count against this replica's decode budget until the answer is made. ``lane``: an
        image of a batch request, whose cheap-tier call is gathered with the others' (tier_calls.py)."""
        async with self.decode_budget.session() as session:
            return await self.pipeline.run(RequestContext(request, caller, session, lane))

    async def stop(self, timeout_s: float) -> tuple[int, int]:
        """Stop the work after responses before the deployments it calls go away (the Ingress's
        ``__del__``): nothing new is admitted; queued indexing is written, then the spawned work
        (a drift sample may wait for its image's write) finishes, all within ``timeout_s``.
        Returns (images not indexed, after-response tasks abandoned)."""
        deadline = time.monotonic() + timeout_s
        self.after_response.close()
        dropped = await self.indexer.stop(timeout_s)
        abandoned = await self.after_response.stop(max(0.0, deadline - time.monotonic()))
        try:  # the budget ledger's deferred usage totals (BudgetLedger.settle_later)
            await asyncio.to_thread(self.policies.ledger.flush_usage)
        except Exception as exc:
            log.warning("stopping: deferred budget usage totals not written: %s", exc)
        return dropped, abandoned


def _after_response_metrics(metrics: IngressMetrics) -> AfterResponseMetrics:
    """One set per metrics registry (several services may share one in tests)."""
    found = getattr(metrics, "after_response", None)
    if found is None:
        found = AfterResponseMetrics(getattr(metrics, "registry", None))
        try:
            metrics.after_response = found
        except AttributeError:  # a stand-in without attributes: unregistered metrics
            pass
    return found
