"""The live policy of one ingress replica: the current ``PolicySet``, the budget ledger, audits.

The ingress takes one snapshot (``current``) per request, so a request is decided under one
version from start to end even when ``reconfigure`` swaps the set in the middle of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from policies.audit_sampling import AuditEstimate, AuditMonitor, estimate, is_sampled
from policies.budgets import BudgetExhausted, BudgetLedger, Reservation
from policies.policy_set import PolicySet, parse_policy_set
from policies.shift_guard import ShiftGuard, reference_from_artefact
from policies.thresholds import ThresholdPolicy
from visionroute.errors import ConfigError
from visionroute.records import Analysis, Decision, Step

log = logging.getLogger("visionroute.policies")


@dataclass(frozen=True)
class Refusal:
    """A budget said no; ``mode`` is what the request gets instead."""

    mode: str  # accept_degraded | review | reject
    error: BudgetExhausted

    def step(self, policy_version: str, decision: Decision, reason: str) -> Step:
        return Step(
            stage="policy:budget",
            decision=decision,
            reason=reason,
            policy_version=policy_version,
            details={
                "budget": self.error.rule.name,
                "degrade": self.mode,
                "degraded": True,
                "retry_after_s": round(self.error.retry_after_s, 3),
                "detail": self.error.reason,
            },
        )


class PolicyRuntime:
    def __init__(
        self,
        policy: PolicySet,
        ledger: BudgetLedger,
        tasks: Iterable[str],
        base_thresholds: dict[str, ThresholdPolicy],
        calibrations: Mapping[str, str | None] | None = None,
    ) -> None:
        self.tasks = tuple(tasks)
        self.base_thresholds = dict(base_thresholds)
        # task -> its tier's calibration artefact, where the shift guard's input reference lives
        self.calibrations = {task: path for task, path in (calibrations or {}).items() if path}
        self.ledger = ledger
        self.audits = AuditMonitor()
        self._lock = threading.Lock()
        self.current = self._checked(policy, previous=None)
        self.history: list[dict[str, Any]] = [
            {"version": self.current.version, "at": time.time(), "result": "initial"}
        ]

    # -- versioning -------------------------------------------------------------------------

    def _checked(self, candidate: dict[str, Any] | PolicySet | None, previous: PolicySet | None) -> PolicySet:
        policy = parse_policy_set(candidate, tasks=self.tasks).model_copy()
        policy._shift_guards = self._shift_guards(policy)
        if previous is not None:
            for task in self.tasks:
                old = previous.threshold_policy(task, self.base_thresholds[task])
                new = policy.threshold_policy(task, self.base_thresholds[task])
                if old.version == new.version and old != new:
                    raise ConfigError(
                        f"thresholds of task {task!r} changed but kept version {new.version!r}; a version must name one "
                        "policy, so give the changed thresholds a new version",
                        field=f"thresholds.{task}.version",
                    )
        return policy

    def checked(self, candidate: dict[str, Any]) -> PolicySet:
        """A policy set validated as ``reconfigure`` would, without applying it (a rollout's candidate)."""
        with self._lock:
            return self._checked(candidate, previous=self.current)

    def reconfigure(self, candidate: dict[str, Any] | None) -> PolicySet:
        """Validate and swap in a new set; on any error the running set stays and the error is raised."""
        with self._lock:
            try:
                policy = self._checked(candidate, previous=self.current)
            except ConfigError as exc:
                self.history.append(
                    {
                        "version": (candidate or {}).get("version"),
                        "at": time.time(),
                        "result": "rejected",
                        "error": exc.reason,
                    }
                )
                log.error("policy change refused, keeping %s: %s", self.current.version, exc.reason)
                raise
            previous, self.current = self.current, policy
            self.history.append(
                {
                    "version": policy.version,
                    "at": time.time(),
                    "result": "applied",
                    "previous": previous.version,
                }
            )
            log.info("policy %s applied (was %s)", policy.version, previous.version)
            return policy

    def thresholds(self, policy: PolicySet, task: str) -> ThresholdPolicy:
        return policy.threshold_policy(task, self.base_thresholds[task])

    # -- the shift guard --------------------------------------------------------------------

    def _shift_guards(self, policy: PolicySet) -> dict[str, ShiftGuard]:
        """One guard per guarded task, from its calibration artefact's input reference; a guarded
        task without one is a ConfigError, so a set that cannot guard is refused, not half-applied."""
        config = policy.shift_guard
        guards = {}
        for task in self.tasks:
            if not config.guards(task):
                continue
            path = self.calibrations.get(task)
            if not path:
                raise ConfigError(
                    f"shift_guard guards task {task!r}, but cascades.{task}.tier.calibration names no "
                    "calibration artefact to hold its input reference; list only calibrated tasks in "
                    "shift_guard.tasks",
                    field="shift_guard.tasks",
                )
            reference = reference_from_artefact(path, field=f"cascades.{task}.tier.calibration")
            guards[task] = ShiftGuard.from_config(config, reference, version=policy.version, source=str(path))
        return guards

    @staticmethod
    def shift_guard(policy: PolicySet, task: str) -> ShiftGuard | None:
        """The guard of ``task`` under ``policy`` (the request's snapshot), or None when off."""
        return policy._shift_guards.get(task)

    # -- budgets ----------------------------------------------------------------------------

    def reserve(
        self, policy: PolicySet, analysis: Analysis, tier: str, units: float
    ) -> Reservation | Refusal:
        """Reserve ``tier``'s call of this request; a resend under the same request id gets the
        first send's reservation back, charged nothing again (policies/budgets.py)."""
        try:
            reservation = self.ledger.reserve(
                policy.budgets,
                tenant=analysis.tenant,
                feature=analysis.task,
                tier=tier,
                units=units,
                request_id=analysis.trace.request_id,
            )
        except BudgetExhausted as exc:
            log.warning(
                "budget %s exhausted for tenant %s feature %s (%s call): degrade=%s",
                exc.rule.name,
                analysis.tenant,
                analysis.task,
                tier,
                exc.rule.degrade,
            )
            return Refusal(exc.rule.degrade, exc)
        if reservation.replayed:
            log.debug("%s call of a resent request is already %s: not charged again", tier, reservation.state)
        return reservation

    # -- audits -----------------------------------------------------------------------------

    @staticmethod
    def audit_sampled(policy: PolicySet, analysis: Analysis) -> bool:
        return analysis.decision is Decision.ACCEPT and is_sampled(
            analysis.trace.request_id, policy.audit.fraction
        )

    def audit_estimate(self, queue, task: str) -> AuditEstimate:
        config = self.current.audit
        errors, labelled = queue.audit_outcomes(task, config.window_items)
        return self.audits.update(estimate(task, errors, labelled, config))
