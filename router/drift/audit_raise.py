"""Under shift, audit more: a task's audit fraction while its drift monitors alarm.

When any drift monitor of a task alarms on this replica (``DriftService.alarms``), the share of
its auto-accepts sent to audit rises from ``audit.fraction`` to ``audit.shift_fraction``, never
above the audit budget ``audit.max_fraction`` (``AuditConfig.fraction_under_shift``); it falls
back when the last alarm clears. Recertification then gets labels of the shifted traffic sooner,
while the shift guard (policies/shift_guard.py) keeps the promise meanwhile.

Why the certificate stays valid: the fraction in force when an accept is sampled depends only
on earlier requests (the drift tests run after the request, on the drift worker), never on the
item's own label, and the item stores it as its inclusion probability (with a running rollout's
fraction, the union: ``policies.audit_sampling.inclusion_probability``). That is the predictable,
known inclusion probability the Horvitz-Thompson test of policies/production_certify.py needs.
The draw is the same hash of the request id at a larger fraction, so every accept the base
fraction samples is still sampled during a raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from policies.audit_sampling import AuditConfig


@dataclass(frozen=True)
class AuditFraction:
    """The audit fraction in force for one task, and why."""

    task: str
    fraction: float  # in force now
    base: float  # audit.fraction
    raised: bool
    alarms: tuple[str, ...]  # the task's monitors in alarm
    max_fraction: float  # the audit budget

    @property
    def reason(self) -> str | None:
        """The audit item's reason while raised (None: the usual wording)."""
        if not self.raised:
            return None
        return (
            f"audit sample ({self.fraction:.1%} of auto-accepts, raised from {self.base:.1%}:"
            f" drift alarm on {', '.join(self.alarms)})"
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "alarms": list(self.alarms)}


def audit_fraction(config: AuditConfig, task: str, alarms: Sequence[str]) -> AuditFraction:
    fraction = config.fraction_under_shift(bool(alarms))
    return AuditFraction(
        task=task,
        fraction=fraction,
        base=config.fraction,
        raised=fraction > config.fraction,
        alarms=tuple(alarms),
        max_fraction=config.max_fraction,
    )


def audit_fraction_now(config: AuditConfig, drift: Any, task: str) -> AuditFraction:
    """The fraction for a request of ``task`` now (``drift``: this replica's DriftService, or None)."""
    if drift is None:
        return audit_fraction(config, task, ())
    return drift.audit_fraction(task, config)
