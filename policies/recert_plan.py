"""How many audit labels a day recertify at (alpha, delta), and the audit fraction to set.

``policies.certify.plan_labels`` plans one threshold from an iid pilot. Production labels are
a weighted sample (reviews at inclusion 1, accepts at the audit fraction), the certificate may
be the three-tier plan, and what an operator sets is a fraction, not a count, so
``plan_audit_fraction`` asks instead: with this traffic, for a window of ``days``, which audit
fraction makes ``policies.production_certify`` certify with probability >= ``probability``?

It simulates windows from the pilot as the population: the pilot's items resampled with
probability proportional to 1 / inclusion probability (the Horvitz-Thompson bootstrap: the
pilot re-weighted to the traffic it stands for), accepted items audited at the candidate
fraction, reviewed items all labelled (thinned to at most ``REVIEW_CAP`` per audit, at a known
inclusion probability, so a window of a million reviews needs no million-row simulation: the
certificate is valid on the thinned sample too), and a ``nonresponse`` share of every sampled
item left unlabelled (counted as errors, as production certification does). The fractions are
tried on a geometric ladder (x1.5) up to what the review budget allows; the certified shares are
made monotone (isotonic) before the first fraction reaching ``probability`` is read off.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from policies.certify import CertifyInputError
from policies.production_certify import (
    ProductionSample,
    TooFewLabels,
    certify_production,
    certify_production_plan,
)
from policies.risk_control import TierCosts

REVIEW_CAP = 3.0  # reviews kept per audit label in a simulated window (thinned at a known rate)
LADDER = 1.5


def _fail(name: str, reason: str) -> CertifyInputError:
    error = CertifyInputError(f"{name}: {reason}", field=name)
    error.reason = reason
    return error


@dataclass(frozen=True)
class AuditPlan:
    """The audit fraction to set, what it costs in labels, and whether the budget allows it."""

    alpha: float
    delta: float
    probability: float
    days: float
    items_per_day: float
    accept_share: float
    audit_fraction: float | None  # the fraction to set; None: not within the budget
    audit_labels_per_day: float | None
    budget_fraction: float  # the largest fraction the review budget pays for (capped at 1)
    within_budget: bool
    fractions: list[float]  # the ladder tried
    certified_share: list[float]  # per fraction (monotone-smoothed)
    reps: int
    plan: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _window(
    rng: np.random.Generator,
    pilot: ProductionSample,
    accepted: np.ndarray,
    *,
    fraction: float,
    accepted_items: float,
    reviewed_items: float,
    nonresponse: float,
) -> ProductionSample:
    """One simulated window's review queue (module docstring)."""
    weight = 1.0 / pilot.inclusion_probability
    rows, pis = [], []
    n_audit = rng.binomial(int(round(accepted_items)), fraction)
    pool = np.flatnonzero(accepted)
    if n_audit and len(pool):
        p = weight[pool] / weight[pool].sum()
        rows.append(rng.choice(pool, n_audit, p=p))
        pis.append(np.full(n_audit, fraction))
    pool = np.flatnonzero(~accepted)
    n_review = int(round(reviewed_items))
    if n_review and len(pool):
        kept = min(n_review, max(1, int(REVIEW_CAP * max(n_audit, 1))))
        p = weight[pool] / weight[pool].sum()
        rows.append(rng.choice(pool, kept, p=p))
        pis.append(np.full(kept, kept / n_review))
    rows_all = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    pi = np.concatenate(pis) if pis else np.zeros(0)
    sample = pilot.subset(rows_all)
    missing = rng.random(len(rows_all)) < nonresponse
    cheap_error = np.where(missing, np.nan, sample.cheap_error)
    strong_error = None if sample.strong_error is None else np.where(missing, np.nan, sample.strong_error)
    return ProductionSample(
        sample.cheap_score,
        cheap_error,
        pi,
        strong_error,
        sample.strong_score,
        float(pi.min()) if len(pi) else None,
    )


def plan_audit_fraction(
    pilot: ProductionSample,
    *,
    alpha: float,
    delta: float,
    items_per_day: float,
    review_budget_per_day: float,
    accepted: np.ndarray | None = None,
    days: float = 7.0,
    probability: float = 0.8,
    nonresponse: float = 0.05,
    plan: Literal["one_threshold", "three_tier"] = "one_threshold",
    costs: TierCosts | None = None,
    reps: int = 40,
    min_fraction: float = 0.005,
    n_points: int = 20,
    seed: int = 0,
    fit_share: float | None = None,
) -> AuditPlan:
    """The smallest audit fraction with which production certification over a window of
    ``days`` succeeds with at least ``probability``, if the pilot is representative; None (and
    ``within_budget`` False) when even the largest fraction the budget allows does not.

    ``pilot``: labelled production items (a ``ProductionSample``; unlabelled rows are dropped,
    their share is what ``nonresponse`` models). ``accepted``: which pilot items the service
    accepts now (default: those with inclusion probability < 1, the audit samples).
    ``review_budget_per_day``: audit labels reviewers can give a day beyond the reviews.
    ``plan``: certify one threshold or the three-tier plan (needs the pilot's VLM errors;
    ``n_points`` quantiles per threshold, fewer than offline: the plan runs it many times).
    ``fit_share``: the three-tier certificate's (``certify_production_plan``), so the plan
    simulates the certificate that will be run.
    """
    for name, value in (("alpha", alpha), ("delta", delta), ("probability", probability)):
        if not 0 < value < 1:
            raise _fail(name, f"must be in (0, 1), got {value!r}")
    if not 0 <= nonresponse < 1:
        raise _fail("nonresponse", f"must be in [0, 1), got {nonresponse!r}")
    for name, value in (("items_per_day", items_per_day), ("days", days)):
        if not value > 0:
            raise _fail(name, f"must be positive, got {value!r}")
    if review_budget_per_day < 0:
        raise _fail("review_budget_per_day", f"must be >= 0, got {review_budget_per_day!r}")
    if reps < 10:
        raise _fail("reps", f"must be at least 10 for a share to mean anything, got {reps}")
    if plan not in ("one_threshold", "three_tier"):
        raise _fail("plan", f"must be 'one_threshold' or 'three_tier', got {plan!r}")
    labelled = ~np.isnan(pilot.cheap_error)
    accepted = pilot.inclusion_probability < 1 if accepted is None else np.asarray(accepted, bool)
    if accepted.shape != (len(pilot),):
        raise _fail("accepted", f"must have shape ({len(pilot)},), got {accepted.shape}")
    population, accepted = pilot.subset(np.flatnonzero(labelled)), accepted[labelled]
    if accepted.sum() < 20:
        raise _fail(
            "pilot",
            f"needs at least 20 labelled accepted items to stand for the traffic, got {int(accepted.sum())}",
        )
    weight = 1.0 / population.inclusion_probability
    accept_share = float(weight[accepted].sum() / weight.sum())
    accepted_items = accept_share * items_per_day * days
    reviewed_items = (1.0 - accept_share) * items_per_day * days
    budget_fraction = min(1.0, review_budget_per_day / max(accept_share * items_per_day, 1e-12))

    def certifies(sample: ProductionSample, rep: int) -> bool:
        try:
            if plan == "three_tier":
                return certify_production_plan(
                    sample,
                    costs=costs or TierCosts(),
                    alpha=alpha,
                    delta=delta,
                    seed=rep,
                    n_points=n_points,
                    fit_share=fit_share,
                ).certificate.is_feasible
            return certify_production(sample, alpha=alpha, delta=delta, seed=rep).is_feasible
        except TooFewLabels:
            return False

    rng = np.random.default_rng(seed)
    fractions, shares = [], []
    fraction = min(min_fraction, budget_fraction) if budget_fraction > 0 else 0.0
    while fraction > 0:
        hits = sum(
            certifies(
                _window(
                    rng,
                    population,
                    accepted,
                    fraction=fraction,
                    accepted_items=accepted_items,
                    reviewed_items=reviewed_items,
                    nonresponse=nonresponse,
                ),
                rep,
            )
            for rep in range(reps)
        )
        fractions.append(fraction)
        shares.append(hits / reps)
        if (len(shares) >= 2 and min(shares[-2:]) >= probability) or fraction >= budget_fraction:
            break
        fraction = min(budget_fraction, fraction * LADDER)

    smooth = _monotone(shares)
    reached = [f for f, s in zip(fractions, smooth) if s >= probability]
    chosen = reached[0] if reached else None
    common = dict(
        alpha=alpha,
        delta=delta,
        probability=probability,
        days=days,
        items_per_day=items_per_day,
        accept_share=accept_share,
        budget_fraction=budget_fraction,
        fractions=fractions,
        certified_share=smooth,
        reps=reps,
        plan=plan,
    )
    if chosen is None:
        best = f"{smooth[-1]:.0%}" if smooth else "0%"
        message = (
            f"NOT WITHIN BUDGET: the review budget ({review_budget_per_day:g} audit labels a day) pays for an "
            f"audit fraction of at most {budget_fraction:.2%}, which recertifies alpha={alpha:g} at "
            f"delta={delta:g} within {days:g} days in {best} of simulated windows (target {probability:.0%}). "
            "Raise the budget, lengthen the window, or raise alpha."
        )
        return AuditPlan(
            **common, audit_fraction=None, audit_labels_per_day=None, within_budget=False, message=message
        )
    per_day = chosen * accept_share * items_per_day
    message = (
        f"Set the audit fraction to {chosen:.2%}: about {math.ceil(per_day)} audit labels a day "
        f"({accept_share:.0%} of {items_per_day:g} items a day are accepted) recertify alpha={alpha:g} at "
        f"delta={delta:g} over {days:g} days with {probability:.0%} probability ({plan.replace('_', ' ')}; "
        f"{nonresponse:.0%} non-response counted as errors); the budget allows up to {budget_fraction:.2%}."
    )
    return AuditPlan(
        **common, audit_fraction=chosen, audit_labels_per_day=per_day, within_budget=True, message=message
    )


def _monotone(shares: list[float]) -> list[float]:
    if not shares:
        return []
    from sklearn.isotonic import IsotonicRegression

    return [
        float(x)
        for x in IsotonicRegression(y_min=0.0, y_max=1.0).fit_transform(np.arange(len(shares)), shares)
    ]


# --------------------------------------------------------------------------- the running plan


def per_certificate_delta(delta: float, *, keeps_incumbent: bool) -> float:
    """The level each certificate of a recertification loop is computed at, so that the plan
    it deploys keeps the promise at ``delta``.

    A loop that may keep its running plan (the incumbent I) instead of a new certificate C
    deploys D in {I, C}, chosen on labels. Whatever the rule, D's accepted error exceeds alpha
    only if I's certificate or C's was wrong:

        P(risk(D) > alpha) <= P(I certified and risk(I) > alpha) + P(C certified and risk(C) > alpha)

    Each term is at most the level its certificate was computed at, so certifying every plan
    the loop may deploy (the first one included) at delta / 2 keeps D's promise at delta; at
    delta each, it held at 2 delta only. A loop that deploys every certificate chooses nothing:
    delta itself. (The alternative, choosing between I and C on labels disjoint from those that
    certify the chosen one, needs labels no earlier certificate saw; with a sliding label window
    every label serves several certificates. docs/recertification.md, "The figure".)"""
    if not 0 < delta < 1:
        raise _fail("delta", f"must be in (0, 1), got {delta!r}")
    return delta / 2 if keeps_incumbent else delta


@dataclass(frozen=True)
class PlanCheck:
    """A deployed plan judged on a labelled sample: its p-value of accepted error <= alpha (the
    production certificate's test, unknown errors counted as errors) and its Horvitz-Thompson
    cost per item (no labels needed for the cost)."""

    p_value: float
    certified: bool
    cost_per_item: float
    accepted: int  # sampled items it accepts automatically
    wrong: int  # of those, wrong (or unknown)
    p_above_alpha: float  # one-sided binomial p-value of "risk > alpha is not shown": small = shown


def above_alpha_p_value(wrong: int, accepted: int, alpha: float) -> float:
    """P(X >= wrong) for X ~ Binomial(accepted, alpha): small when the labels show the accepted
    error above alpha. A monitor of a running plan, not a certificate."""
    from scipy.stats import binom

    return float(binom.sf(wrong - 1, accepted, alpha)) if accepted else 1.0


def check_plan(plan, sample: ProductionSample, *, costs: TierCosts, alpha: float, delta: float) -> PlanCheck:
    """``plan`` (a ``TierPlan``, or anything with its three thresholds) on ``sample``, by the
    service's rule (``TierPlan.decide`` / ``decide_vlm``) and the certificate's worst case: an
    unlabelled item is wrong, an escalated item without a VLM answer passes and is wrong.

    A recertification loop uses it to keep its incumbent: on labels that arrived after the
    incumbent was deployed (chosen without them, so either test is valid at ``delta``) and, for
    the cost, on the same sample as a new certificate (a paired comparison). ``p_above_alpha``
    counts items (exact on a sample at one inclusion probability)."""
    from policies.production_certify import test_p_values

    if len(sample) == 0:
        return PlanCheck(1.0, False, math.nan, 0, 0, 1.0)
    outcomes = sample.worst_case()
    score = outcomes.cheap_score
    cheap_ok = score >= plan.accept_threshold
    escalated = ~cheap_ok & (score >= plan.review_threshold)
    vlm_ok = escalated
    if plan.vlm_accept_threshold is not None and outcomes.strong_score is not None:
        with np.errstate(invalid="ignore"):  # NaN: no VLM answer, never passes
            vlm_ok = escalated & (outcomes.strong_score >= plan.vlm_accept_threshold)
    auto = cheap_ok | vlm_ok
    wrong = (cheap_ok & outcomes.cheap_error) | (vlm_ok & outcomes.strong_error)
    p = float(test_p_values(auto[None, :], wrong[None, :], sample.unit_weight, alpha)[0])
    weight = 1.0 / sample.inclusion_probability
    cost = (
        costs.cheap + (costs.escalate * (escalated @ weight) + costs.review * (~auto @ weight)) / weight.sum()
    )
    n_auto, n_wrong = int(auto.sum()), int(wrong.sum())
    return PlanCheck(p, p <= delta, float(cost), n_auto, n_wrong, above_alpha_p_value(n_wrong, n_auto, alpha))
