"""Retention inside the service: stored review images past their TTL are deleted on a schedule.

``RetentionTask`` runs ``ReviewQueue.purge_images`` every ``review.retention_interval_s``
seconds (0: off) with the TTL of the policy set in force at that moment
(``policies.review.image_ttl_s``), so a new TTL applies without a restart. Rows, labels and the
audit log stay. It is an asyncio task on the replica's event loop, started with the service
(router/services/__init__.py); the purge itself runs in a worker thread. Every ingress replica
runs one: purges are safe side by side (SQLite serialises them; PostgreSQL skips rows another
purge holds), and a replica that dies simply stops purging while the others go on.
``visionroute review purge`` (cron) stays available for deployments that want it outside.
"""

from __future__ import annotations

import asyncio
import logging

from policies.review_queue import ReviewQueue
from policies.runtime import PolicyRuntime
from router.services.results import RetentionRun

log = logging.getLogger("visionroute.service.retention")


class RetentionTask:
    def __init__(self, queue: ReviewQueue, policies: PolicyRuntime, interval_s: float) -> None:
        self.queue = queue
        self.policies = policies
        self.interval_s = interval_s
        self.runs = 0
        self.last_result: RetentionRun | None = None
        self._task: asyncio.Task | None = None

    def run_once(self) -> RetentionRun:
        """One purge under the current policy's TTL (blocking: call it in a thread)."""
        ttl_s = self.policies.current.review.image_ttl_s
        purged = self.queue.purge_images(ttl_s)
        result = RetentionRun(items=purged["items"], images_deleted=purged["images_deleted"], ttl_s=ttl_s)
        self.runs += 1
        self.last_result = result
        if result.items:
            log.info("retention: %s", result.to_json())
        return result

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.run_once)
            except asyncio.CancelledError:
                raise
            except Exception:  # a store outage must not end the schedule: the next run retries
                log.exception("retention purge failed; retrying in %.0f s", self.interval_s)

    def start(self) -> bool:
        """Schedule the purges on the running event loop; False (nothing started) when there is
        no running loop (a service built outside one, as tests do) or the interval is 0."""
        if self.interval_s <= 0 or self.is_running:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._task = loop.create_task(self._loop(), name="visionroute-retention")
        log.info(
            "retention: purging review images past policies.review.image_ttl_s every %g s", self.interval_s
        )
        return True

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
