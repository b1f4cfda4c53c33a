"""Policy changes, the policy view, Prometheus metrics and readiness."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from policies.review_queue import ReviewQueue
from policies.runtime import PolicyRuntime
from router.auth.principal import Principal
from router.metrics import IngressMetrics
from router.services.backends import CheapTierClient, SearchBackend, VlmTierClient
from router.services.results import PolicyView, Readiness
from visionroute.errors import ConfigError
from visionroute.redaction import failure_summary

log = logging.getLogger("visionroute.service.operations")


class Operations:
    def __init__(
        self,
        *,
        tiers: Mapping[str, CheapTierClient],
        vlm_tiers: Mapping[str, VlmTierClient],
        search: SearchBackend | None,
        queue: ReviewQueue,
        policies: PolicyRuntime,
        metrics: IngressMetrics,
        auth_enabled: bool = False,
    ) -> None:
        self.auth_enabled = auth_enabled
        self.tiers = dict(tiers)
        self.vlm_tiers = dict(vlm_tiers)
        self.search = search
        self.queue = queue
        self.policies = policies
        self.metrics = metrics

    def reconfigure(self, user_config: dict[str, Any] | None) -> bool:
        """Apply a new policy set; an invalid one is refused, logged and counted, never raised
        (Ray Serve 2.60 marks a deployment whose reconfigure raises as DEPLOY_FAILED)."""
        try:
            self.policies.reconfigure(user_config)
        except ConfigError:
            self.metrics.reconfigurations.labels("rejected").inc()
            return False
        self.metrics.reconfigurations.labels("applied").inc()
        return True

    async def policy(self) -> PolicyView:
        policy = self.policies.current
        budgets = await asyncio.to_thread(self.policies.ledger.status, policy.budgets)
        return PolicyView(
            version=policy.version,
            policy=policy.model_dump(mode="json"),
            budgets=budgets,
            history=self.policies.history[-20:],
            replica_pid=os.getpid(),
        )

    async def metrics_text(self) -> bytes:
        if self.search is not None:
            try:
                stats = await asyncio.wait_for(self.search.call("stats"), timeout=5.0)
                self.metrics.index_items.set(float(stats["items"]))
            except Exception as exc:  # a scrape must not fail because search is down
                log.warning("search stats unavailable for /metrics: %s", exc)
        return await asyncio.to_thread(self.metrics.render)

    async def readiness(self, caller: Principal | None = None) -> Readiness:
        """Ready when every cheap tier answers, the index is loaded, the queue is writable.
        VLM reachability is reported but does not fail readiness (a down VLM degrades to review).

        /readyz is public, so with keys on only an admin sees each check's details (models,
        index size and path, VLM endpoint); anyone else sees whether each check is ok."""

        async def check(call) -> dict[str, Any]:
            try:
                return await asyncio.wait_for(call, timeout=5.0)
            except Exception as exc:
                return {"error": failure_summary(exc)}

        checks: dict[str, Any] = {}
        for task, tier in self.tiers.items():
            checks[f"tier:{task}"] = await check(tier.describe())
        for task, vlm_tier in self.vlm_tiers.items():
            checks[f"vlm:{task}"] = await check(vlm_tier.describe())
        if self.search is not None:
            checks["search_index"] = await check(self.search.call("stats"))
        checks["review_queue"] = {"writable": await asyncio.to_thread(self.queue.is_writable)}
        # The ledger's database: on PostgreSQL a server every replica shares, down for all at once.
        checks["budget_ledger"] = {"reachable": await asyncio.to_thread(self.policies.ledger.database.ping)}
        required = [v for k, v in checks.items() if k.startswith("tier:") or k == "search_index"]
        ready = (
            all("error" not in v for v in required)
            and checks["review_queue"]["writable"]
            and checks["budget_ledger"]["reachable"]
        )
        if self.auth_enabled and (caller is None or caller.role != "admin"):
            checks = {name: summary(check) for name, check in checks.items()}
        return Readiness(ready=ready, checks=checks)


def summary(check: dict[str, Any]) -> dict[str, Any]:
    """What anyone may know of a readiness check: ok or not (and the queue's and VLM's flags)."""
    out: dict[str, Any] = {"ok": "error" not in check}
    for flag in ("writable", "reachable"):
        if flag in check:
            out[flag] = bool(check[flag])
    return out
