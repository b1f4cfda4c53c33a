"""Audit sampling: send a fraction of auto-accepted items to review, estimate the accepted-error rate.

Which accepts are audited is a hash of the request id (``is_sampled``), so every replica makes
the same choice and a retried request is sampled the same way; over many requests it is a
uniform random sample of the accepts, which makes the audited error rate an unbiased estimate
of the error rate among everything accepted.

The estimate comes with exact (Clopper-Pearson) one-sided bounds at ``confidence``. The alert
fires, once at least ``min_labelled`` audits are in, when

- ``lower_bound_above_alpha`` (default): the lower bound is above alpha: the data show, at
  that confidence, that more than alpha of the accepted answers are wrong; or
- ``upper_bound_above_alpha``: the upper bound is above alpha: the data can no longer vouch
  that the rate is at most alpha (earlier, noisier).

``visionroute bench audit`` (evals/benchmarks/audit.py) measures the bounds' coverage.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("visionroute.audit")


class AuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="share of auto-accepts sent to review (off unless set)"
    )
    alpha: float = Field(
        0.05, gt=0.0, lt=1.0, description="the accepted-error rate that must not be exceeded"
    )
    confidence: float = Field(0.9, gt=0.0, lt=1.0, description="level of each one-sided bound (1 - delta)")
    min_labelled: int = Field(30, ge=1, description="audits needed before an alert can fire")
    window_items: int = Field(
        1000, ge=1, description="the estimate uses the latest this many labelled audits"
    )
    alert_when: Literal["lower_bound_above_alpha", "upper_bound_above_alpha"] = "lower_bound_above_alpha"
    shift_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="the audit fraction while a drift monitor alarms for the task, so recertification "
        "gets labels sooner (0: no raise; capped at max_fraction; router/drift/audit_raise.py)",
    )
    max_fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="the audit budget: the share of auto-accepts sent to review never exceeds this, "
        "raised or not",
    )

    @model_validator(mode="after")
    def _within_budget(self) -> AuditConfig:
        if self.fraction > self.max_fraction:
            raise ValueError(
                f"fraction {self.fraction} is above the audit budget max_fraction {self.max_fraction}"
            )
        return self

    def fraction_under_shift(self, alarmed: bool) -> float:
        """The audit fraction in force: ``shift_fraction`` while the task's drift monitors alarm
        (never below ``fraction``, never above the budget ``max_fraction``), else ``fraction``."""
        if not alarmed:
            return self.fraction
        return min(max(self.fraction, self.shift_fraction), self.max_fraction)


def is_sampled(request_id: str, fraction: float) -> bool:
    """Deterministic Bernoulli(fraction) draw keyed by the request id. Monotone in the fraction:
    an accept sampled at the base fraction is sampled at any raised one too."""
    if fraction <= 0.0:
        return False
    draw = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2.0**64
    return draw < fraction


AUDIT_SOURCES = ("policy", "rollout", "none")  # "none": not an audit sample (the cascade asked a human)


def inclusion_probability(*fractions: float) -> float:
    """The probability that an accept is audited when each source samples it independently at
    its own fraction: 1 - prod(1 - f). The policy's draw is keyed by the request id and a
    rollout's by ``<rollout id>:<request id>``, two independent hash draws, and an accept that
    either picks becomes one audit item, so the item's chance of being in the audit sample is the
    union's, whichever source picked it (``policies.production_certify`` weights by its inverse)."""
    chance = 0.0
    for fraction in fractions:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"an audit fraction must be in [0, 1], got {fraction!r}")
        chance += fraction - chance * fraction  # 1 - (1 - chance)(1 - f), exact for one source
    return chance


def rollout_audit_fraction(choice: Any) -> float:
    """The fraction at which a rollout arm's accepts are audit-sampled (``rollouts.
    is_arm_audit_sampled``): the rollout's ``audit_fraction`` while it runs, else 0."""
    if choice is None or choice.rollout.status != "running":
        return 0.0
    return float(choice.rollout.audit_fraction)


def clopper_pearson(errors: int, n: int, confidence: float) -> tuple[float, float]:
    """Exact one-sided lower and upper bounds (each at ``confidence``) for a binomial rate."""
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import beta  # ~1 s to import: only when a bound is computed, not at CLI start

    lower = 0.0 if errors == 0 else float(beta.ppf(1.0 - confidence, errors, n - errors + 1))
    upper = 1.0 if errors == n else float(beta.ppf(confidence, errors + 1, n - errors))
    return lower, upper


@dataclass(frozen=True)
class AuditEstimate:
    task: str
    labelled: int
    errors: int
    rate: float | None
    lower_bound: float
    upper_bound: float
    alpha: float
    confidence: float
    alert: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(task: str, errors: int, labelled: int, config: AuditConfig) -> AuditEstimate:
    lower, upper = clopper_pearson(errors, labelled, config.confidence)
    rate = errors / labelled if labelled else None
    bound = lower if config.alert_when == "lower_bound_above_alpha" else upper
    side = "lower" if config.alert_when == "lower_bound_above_alpha" else "upper"
    if labelled < config.min_labelled:
        alert, reason = False, f"{labelled} of the {config.min_labelled} audits needed are labelled"
    elif bound > config.alpha:
        alert = True
        reason = (
            f"{errors}/{labelled} audited accepts were wrong; the {config.confidence:.0%} {side} bound "
            f"{bound:.4f} is above alpha {config.alpha}"
        )
    else:
        alert = False
        reason = f"{errors}/{labelled} audited accepts were wrong; the {side} bound {bound:.4f} is within alpha {config.alpha}"
    return AuditEstimate(
        task, labelled, errors, rate, lower, upper, config.alpha, config.confidence, alert, reason
    )


def is_error(label: dict[str, Any] | None, proposed: list[dict[str, Any]]) -> bool:
    """Was the accepted answer wrong, by the reviewer's label? 'reject' counts as wrong (it should
    not have been answered); 'correct' unless it only restates the proposed top label."""
    if not label:
        return False
    verdict = label.get("verdict")
    if verdict == "confirm":
        return False
    if verdict == "correct" and label.get("boxes") is None and proposed:
        return label.get("label") != proposed[0].get("label")
    return True


class AuditMonitor:
    """Logs when a task's alert starts or stops (the metric is read from ``latest``)."""

    def __init__(self) -> None:
        self.latest: dict[str, AuditEstimate] = {}

    def update(self, result: AuditEstimate) -> AuditEstimate:
        previous = self.latest.get(result.task)
        self.latest[result.task] = result
        if result.alert and not (previous and previous.alert):
            log.warning("AUDIT ALERT task=%s: %s", result.task, result.reason)
        elif previous and previous.alert and not result.alert:
            log.info("audit alert cleared task=%s: %s", result.task, result.reason)
        return result
