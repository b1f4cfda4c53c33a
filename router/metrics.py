"""Prometheus metrics for ``GET /metrics``.

Totals that must agree across ingress replicas (cost units, budget use, review queue, audit
estimates) are read from the shared SQLite files at scrape time, so any replica answers with
the same numbers. Event counters (decisions, refusals, policy changes) are per replica.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from policies.review_queue import ReviewQueue
from policies.runtime import PolicyRuntime
from visionroute.records import Trace


class SharedStateCollector(Collector):
    def __init__(self, runtime: PolicyRuntime, queue: ReviewQueue) -> None:
        self.runtime = runtime
        self.queue = queue

    def collect(self) -> Iterable[Metric]:
        cost = CounterMetricFamily(
            "visionroute_cost_units",
            "cost units spent, by tenant, feature and tier",
            labels=["tenant", "feature", "tier"],
        )
        calls = CounterMetricFamily(
            "visionroute_tier_calls",
            "calls charged, by tenant, feature and tier",
            labels=["tenant", "feature", "tier"],
        )
        for row in self.runtime.ledger.usage():
            cost.add_metric([row["tenant"], row["feature"], row["tier"]], row["units"])
            calls.add_metric([row["tenant"], row["feature"], row["tier"]], row["calls"])
        yield cost
        yield calls
        policy = self.runtime.current
        used = GaugeMetricFamily(
            "visionroute_budget_used_units", "units used in the current window", labels=["budget"]
        )
        cap = GaugeMetricFamily(
            "visionroute_budget_cap_units", "the budget's cap per window", labels=["budget"]
        )
        for status in self.runtime.ledger.status(policy.budgets):
            used.add_metric([status["name"]], status["used_units"])
            cap.add_metric([status["name"]], status["cap_units"])
        yield used
        yield cap
        stats = self.queue.stats()
        yield GaugeMetricFamily(
            "visionroute_review_queue_depth", "pending review items", value=stats["depth"]
        )
        yield GaugeMetricFamily(
            "visionroute_review_queue_overdue", "pending items past their SLA", value=stats["overdue"]
        )
        yield GaugeMetricFamily(
            "visionroute_review_queue_oldest_age_seconds",
            "age of the oldest pending item",
            value=stats["oldest_age_s"],
        )
        names = ("labelled", "errors", "lower_bound", "upper_bound", "alert")
        families = {
            n: GaugeMetricFamily(f"visionroute_audit_{n}", f"audit of auto-accepts: {n}", labels=["task"])
            for n in names
        }
        for task in self.runtime.tasks:
            result = self.runtime.audit_estimate(self.queue, task)
            for name in names:
                families[name].add_metric([task], float(getattr(result, name)))
        yield from families.values()
        info = GaugeMetricFamily("visionroute_policy_info", "the running policy set", labels=["version"])
        info.add_metric([policy.version], 1.0)
        yield info


class IngressMetrics:
    def __init__(self, runtime: PolicyRuntime, queue: ReviewQueue) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(SharedStateCollector(runtime, queue))
        self.decisions = Counter(
            "visionroute_decisions",
            "final decisions",
            ["task", "decision", "policy_version"],
            registry=self.registry,
        )
        self.budget_refusals = Counter(
            "visionroute_budget_refusals",
            "reservations refused",
            ["budget", "degrade"],
            registry=self.registry,
        )
        self.reconfigurations = Counter(
            "visionroute_policy_reconfigurations", "policy changes", ["result"], registry=self.registry
        )
        # Per tier (trace stage): latency, what each stage decided (escalation and review rates
        # are ratios of these), failures, and the VLM's circuit as its last call saw it.
        self.stage_latency = Histogram(
            "visionroute_stage_latency_seconds",
            "latency of each cascade stage",
            ["task", "stage"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.stage_decisions = Counter(
            "visionroute_stage_decisions",
            "decisions taken by each stage",
            ["task", "stage", "decision"],
            registry=self.registry,
        )
        self.stage_errors = Counter(
            "visionroute_stage_errors",
            "failed stages (VLM errors by failure kind)",
            ["task", "stage", "failure"],
            registry=self.registry,
        )
        self.vlm_breaker_open = Gauge(
            "visionroute_vlm_breaker_open",
            "1 when the last VLM call found its circuit open",
            ["task"],
            registry=self.registry,
        )
        self.index_items = Gauge(
            "visionroute_search_index_items", "items in the visual search index", registry=self.registry
        )

    def observe_trace(self, task: str, trace: Trace) -> None:
        for step in trace:
            self.stage_latency.labels(task, step.stage).observe(step.latency_ms / 1000.0)
            if step.decision is not None:
                self.stage_decisions.labels(task, step.stage, step.decision.value).inc()
            if step.error is not None:
                self.stage_errors.labels(task, step.stage, str(step.details.get("failure", "error"))).inc()
            if step.stage == "vlm":
                self.vlm_breaker_open.labels(task).set(
                    1.0 if step.details.get("failure") == "circuit_open" else 0.0
                )

    def render(self) -> bytes:
        return generate_latest(self.registry)
