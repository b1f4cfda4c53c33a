"""The versioned policy set: thresholds, costs, budgets, review and audit settings in one object.

It is the Ingress deployment's Ray Serve ``user_config``: ``serve deploy`` with a changed
``user_config`` calls ``Ingress.reconfigure`` on the running replicas (no restart). The new set
is validated first; an invalid one is refused and the old set stays.

Versions: a threshold step carries its ``ThresholdPolicy.version``, and a change of thresholds
must come with a new threshold version (``PolicyRuntime`` refuses a changed policy under an old
name), so that string names exactly one rule. Budget, audit and review steps carry the set's
``version``, and so does every response (``policy_version``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from policies.audit_sampling import AuditConfig
from policies.budgets import BudgetRule
from policies.costs import CostModel
from policies.privacy import PrivacyPolicy
from policies.shift_guard import ShiftGuardConfig
from policies.thresholds import ThresholdPolicy
from visionroute.errors import ConfigError


class ReviewPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_error_cost_units: float = Field(
        1.0, ge=0, description="cost of a wrong answer, for tasks not listed"
    )
    error_cost_units: dict[str, float] = Field(
        default_factory=dict, description="per task: cost of a wrong answer"
    )
    sla_s: float = Field(3600.0, gt=0, description="an item should be labelled within this many seconds")
    image_ttl_s: float = Field(
        30 * 86400.0, gt=0, description="stored images are deleted after this; labels stay"
    )
    double_label_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of queued items labelled by two different reviewers (0: off; "
        "policies/review/double_labels.py)",
    )
    reviewer_error_limit: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="a reviewer whose estimated error rate is above this (its lower bound) is flagged "
        "to admins and their labels are left out of recertification (policies/reviewer_quality.py)",
    )

    @model_validator(mode="after")
    def _non_negative(self) -> ReviewPolicy:
        bad = {task: cost for task, cost in self.error_cost_units.items() if not cost >= 0}
        if bad:
            raise ValueError(f"error_cost_units must be >= 0, got {bad}")
        return self

    def error_cost(self, task: str) -> float:
        return self.error_cost_units.get(task, self.default_error_cost_units)


class PolicySet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field("policies-v1", min_length=1, max_length=128, description="stamped on every decision")
    thresholds: dict[str, ThresholdPolicy] = Field(
        default_factory=dict, description="per task; overrides cascades.<task>.policy"
    )
    costs: CostModel = Field(default_factory=CostModel)
    budgets: list[BudgetRule] = Field(default_factory=list)
    review: ReviewPolicy = Field(default_factory=ReviewPolicy)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    privacy: PrivacyPolicy = Field(
        default_factory=PrivacyPolicy,
        description="what is redacted from an image before it is stored (per tenant; policies/privacy.py)",
    )
    shift_guard: ShiftGuardConfig = Field(
        default_factory=ShiftGuardConfig,
        description="stop auto-accepting inputs unlike the calibration data (off by default)",
    )
    # The guards PolicyRuntime built for this set (task -> policies.shift_guard.ShiftGuard).
    _shift_guards: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _unique_budget_names(self) -> PolicySet:
        names = [rule.name for rule in self.budgets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"budget names must be unique; repeated: {duplicates}")
        return self

    def threshold_policy(self, task: str, base: ThresholdPolicy) -> ThresholdPolicy:
        """The task's thresholds: this set's override, else the cascade's own."""
        return self.thresholds.get(task, base)


def parse_policy_set(
    data: dict[str, Any] | PolicySet | None, *, tasks: Iterable[str] | None = None
) -> PolicySet:
    """Validate a policy set (a serve ``user_config``); the error names each bad key and why."""
    if isinstance(data, PolicySet):
        policy = data
    else:
        try:
            policy = PolicySet.model_validate(data or {})
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                where = ".".join(str(part) for part in error["loc"]) or "policies"
                problems.append(
                    f"unknown key {where!r}"
                    if error["type"] == "extra_forbidden"
                    else f"{where}: {error['msg']}"
                )
            first = ".".join(str(p) for p in exc.errors()[0]["loc"]) or None
            raise ConfigError("invalid policy set: " + "; ".join(problems), field=first) from None
    if tasks is not None:
        known = set(tasks)
        unknown = sorted(set(policy.thresholds) - known)
        if unknown:
            raise ConfigError(
                f"thresholds for unknown tasks {unknown}; configured tasks are {sorted(known)}",
                field="thresholds",
            )
        for i, rule in enumerate(policy.budgets):
            if rule.feature != "*" and rule.feature not in known:
                raise ConfigError(
                    f"budget {rule.name!r} names feature {rule.feature!r}; expected '*' or one of {sorted(known)}",
                    field=f"budgets.{i}.feature",
                )
        guarded = sorted(set(policy.shift_guard.tasks or ()) - known)
        if guarded:
            raise ConfigError(
                f"shift_guard names unknown tasks {guarded}; configured tasks are {sorted(known)}",
                field="shift_guard.tasks",
            )
    return policy
