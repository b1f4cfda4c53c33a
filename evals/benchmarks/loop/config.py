"""``bench loop``'s settings: the policies and phases it reports, ``LoopConfig`` and the
severity schedule it implies."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from visionroute.errors import ConfigError

POLICIES = ("static", "static+guard", "loop")
PHASES = ("clean", "ramp", "relearning", "settled")
ALARM_SHARE = 0.05  # a window where the guard flags more than this is a drift alarm
# The loop checks that alarm on the running count of a window's items every this many items
# (LoopConfig.alarm_check_every): per item, the first flagged item would be 1 of 1 > 5%.
ALARM_CHECK_EVERY = 100
REFERENCE_SIZE = 400  # input statistics kept per side (fit, held-out) for a refreshed reference


@dataclass(frozen=True)
class LoopConfig:
    items: int = 50_000
    window: int = 2_500
    shift_start: float = 0.4  # share of the stream before the severity starts to rise
    ramp: float = 0.1  # share of the stream over which it rises to max_severity
    max_severity: int = 5
    alpha: float = 0.1
    delta: float = 0.1
    reviewer_error: float = 0.01
    nonresponse: float = 0.02
    audit_fraction: float | None = None  # None: from the label plan
    audit_budget: float = 0.3  # the largest audit fraction reviewers can pay for
    alarm_factor: float = 3.0
    label_windows: int = 4
    keep_cheaper_incumbent: bool = True  # a new certificate replaces a still-certified, cheaper plan? no
    # the label plan again on the first certificate of new inputs (with audit_fraction None: a
    # configured fraction stays)
    replan_after_shift: bool = True
    false_alarm_rate: float = 0.01
    guard_window: int = 50
    guard_stride: int = 10  # the guard's window test is recomputed every this many items
    # the loop's drift alarm on the running count of a window's items, checked every this many:
    # from the check that fires, the rest of the window's flagged items go to review (the window
    # size: checked at the window's end only, as before)
    alarm_check_every: int = ALARM_CHECK_EVERY
    n_points: int = 30  # threshold quantiles per tier in recertification
    # the share of a label window that places and orders the candidates (None: the service's
    # default, 10% and at most 200 items)
    fit_share: float | None = 0.3
    seed: int = 0
    costs: dict[str, float] = field(default_factory=lambda: {"cheap": 1.0, "escalate": 10.0, "review": 100.0})

    @property
    def certificate_delta(self) -> float:
        """The level of every certificate the loop may deploy: delta / 2 when it may keep its
        running plan instead of a new one (the union bound over the two: the deployed plan's
        promise holds at delta), delta when it deploys every certificate
        (``policies.recert_plan.per_certificate_delta``)."""
        from policies.recert_plan import per_certificate_delta

        return per_certificate_delta(self.delta, keeps_incumbent=self.keep_cheaper_incumbent)

    def check(self, levels: int) -> None:
        def bad(name: str, reason: str) -> ConfigError:
            return ConfigError(f"{name}: {reason}", field=name)

        if self.window < 100 or self.items < 4 * self.window:
            raise bad(
                "window",
                f"needs >= 100 items and >= 4 windows in the stream, got {self.window} of {self.items}",
            )
        if not (0 < self.shift_start and self.shift_start + self.ramp < 1 and self.ramp >= 0):
            raise bad("shift_start", "shift_start > 0, ramp >= 0 and shift_start + ramp < 1 are needed")
        if not 1 <= self.max_severity < levels:
            raise bad(
                "max_severity", f"must be in 1..{levels - 1} (the replay's levels), got {self.max_severity}"
            )
        for name in ("alpha", "delta"):
            if not 0 < getattr(self, name) < 1:
                raise bad(name, f"must be in (0, 1), got {getattr(self, name)}")
        if not 1 <= self.alarm_check_every <= self.window:
            raise bad(
                "alarm_check_every",
                f"must be in 1..window={self.window} items, got {self.alarm_check_every}",
            )
        if self.fit_share is not None and not 0 < self.fit_share < 1:
            raise bad("fit_share", f"must be in (0, 1), got {self.fit_share}")
        for name in ("reviewer_error", "nonresponse"):
            if not 0 <= getattr(self, name) < 0.5:
                raise bad(name, f"must be in [0, 0.5), got {getattr(self, name)}")
        if self.audit_fraction is not None and not 0 < self.audit_fraction <= self.audit_budget:
            raise bad(
                "audit_fraction",
                f"must be in (0, audit_budget={self.audit_budget}], got {self.audit_fraction}",
            )
        if not 0 < self.audit_budget <= 1 or self.alarm_factor < 1 or self.label_windows < 1:
            raise bad(
                "audit_budget", "audit_budget in (0, 1], alarm_factor >= 1, label_windows >= 1 are needed"
            )


def severity_schedule(config: LoopConfig) -> np.ndarray:
    """The severity in force at each stream position: 0, a linear ramp, max_severity."""
    position = np.arange(config.items) / config.items
    progress = np.clip((position - config.shift_start) / max(config.ramp, 1e-12), 0.0, 1.0)
    level = np.ceil(progress * config.max_severity).astype(np.int64)
    return np.where(position < config.shift_start, 0, np.maximum(level, 1))


def phase_of(window: int, config: LoopConfig) -> str:
    start, end = window * config.window, (window + 1) * config.window
    shift = config.shift_start * config.items
    settled = (config.shift_start + config.ramp) * config.items
    if end <= shift:
        return "clean"
    if start < settled:
        return "ramp"
    if start < settled + config.label_windows * config.window:
        return "relearning"
    return "settled"
