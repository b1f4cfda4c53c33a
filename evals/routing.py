"""What a routing does on held-out items, at the certificate's prices (issue 22): a certified
three-tier plan applied to items it was not certified on, the single tiers, random routing tuned
to alpha, and the two oracles that know every answer.

Each gives an ``Outcome``: cost per 1000 items (every item pays the cheap tier, except VLM-only;
each VLM call pays the VLM; each human review pays the review), the error among the answers
accepted without a human (NaN when none), whether that error exceeds alpha (a violation), and
the tier shares (who answered: cheap / vlm / human; they sum to 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Outcome:
    cost_per_1000: float
    accepted_error: float  # NaN when nothing is accepted
    violation: bool
    shares: dict[str, float]  # cheap / vlm / human: who answered

    @property
    def accepted_accuracy(self) -> float:
        return 1.0 - self.accepted_error


def _shares(cheap: float, vlm: float, human: float) -> dict[str, float]:
    return {"cheap": float(cheap), "vlm": float(vlm), "human": float(human)}


def apply_plan(
    plan, score, strong_score, cheap_error, strong_error, *, alpha: float, cheap_price: float, prices
) -> Outcome:
    """The plan's decisions on items it was not certified on, as ``TierPlan.decide`` makes them
    (an escalated item whose VLM score is below the VLM threshold, or NaN, goes to a human)."""
    cheap_ok = score >= plan.accept_threshold
    escalated = (score >= plan.review_threshold) & ~cheap_ok
    vlm_t = -np.inf if plan.vlm_accept_threshold is None else plan.vlm_accept_threshold
    with np.errstate(invalid="ignore"):
        vlm_ok = escalated & (strong_score >= vlm_t)
    reviewed = ~(cheap_ok | vlm_ok)
    n = len(score)
    n_auto = int((cheap_ok | vlm_ok).sum())
    n_err = int((cheap_ok & cheap_error).sum() + (vlm_ok & strong_error).sum())
    error = n_err / n_auto if n_auto else math.nan
    cost = cheap_price + (prices.escalate * escalated.sum() + prices.review * reviewed.sum()) / n
    return Outcome(
        1000 * float(cost),
        error,
        bool(n_auto and error > alpha),
        _shares(cheap_ok.mean(), vlm_ok.mean(), reviewed.mean()),
    )


def cheap_only(cheap_error, *, alpha: float, prices) -> Outcome:
    """Every cheap answer accepted."""
    error = float(np.mean(cheap_error))
    return Outcome(1000 * prices.cheap, error, error > alpha, _shares(1, 0, 0))


def vlm_only(strong_error, strong_answered, *, alpha: float, prices) -> Outcome:
    """Every item to the VLM (no cheap tier); an item without a valid VLM answer goes to a human."""
    answered = np.asarray(strong_answered, bool)
    n_auto = int(answered.sum())
    error = float((np.asarray(strong_error, bool) & answered).sum() / n_auto) if n_auto else math.nan
    cost = prices.escalate + prices.review * float((~answered).mean())
    return Outcome(
        1000 * cost, error, bool(n_auto and error > alpha), _shares(0, answered.mean(), (~answered).mean())
    )


def random_at_alpha(cheap_error, strong_error, *, alpha: float, prices) -> Outcome:
    """Random routing (no score): each item to the VLM with the least probability s whose
    expected accepted error, (1 - s) e_cheap + s e_vlm, is <= alpha, computed with the items'
    true error rates (an uncertified reference, like the alpha-oracle; expected values, so no
    sampling noise). Random reviews cannot help: they leave the accepted error unchanged. When
    even the VLM's error exceeds alpha, s = 1 and the row violates."""
    e_cheap, e_vlm = float(np.mean(cheap_error)), float(np.mean(strong_error))
    if e_cheap <= alpha:
        s = 0.0
    elif e_vlm < alpha:
        s = (e_cheap - alpha) / (e_cheap - e_vlm)
    else:
        s = 1.0
    error = (1 - s) * e_cheap + s * e_vlm
    return Outcome(
        1000 * (prices.cheap + prices.escalate * s), error, error > alpha + 1e-12, _shares(1 - s, s, 0)
    )


def alpha_oracle(cheap_error, strong_error, *, alpha: float, prices) -> Outcome:
    """Knows every answer, needs no certificate: the cheapest routing whose accepted error is
    <= alpha (accept wrong cheap answers where the VLM is wrong too, then where it is right,
    while the budget alpha * accepted lasts)."""
    cheap_error, strong_error = np.asarray(cheap_error, bool), np.asarray(strong_error, bool)
    right = ~cheap_error
    vlm_only_right = cheap_error & ~strong_error
    both = cheap_error & strong_error
    n, n0 = len(right), int(right.sum() + vlm_only_right.sum())
    # wrong answers accepted where a human was due, then where the VLM was due
    b = min(int(both.sum()), math.floor(alpha * n0 / (1 - alpha) + 1e-9))
    w = min(int(vlm_only_right.sum()), max(0, math.floor(alpha * (n0 + b) + 1e-9) - b))
    n_vlm, n_human = int(vlm_only_right.sum()) - w, int(both.sum()) - b
    cost = prices.cheap + (prices.escalate * n_vlm + prices.review * n_human) / n
    n_auto = n - n_human
    error = (b + w) / n_auto if n_auto else math.nan
    return Outcome(1000 * cost, error, False, _shares((right.sum() + b + w) / n, n_vlm / n, n_human / n))


def zero_error_oracle(cheap_error, strong_error, *, prices) -> Outcome:
    """``bench cascade``'s oracle router: the cheap answer when right, else the VLM's when right,
    else a human (without a VLM call)."""
    cheap_error, strong_error = np.asarray(cheap_error, bool), np.asarray(strong_error, bool)
    vlm = cheap_error & ~strong_error
    human = cheap_error & strong_error
    n = len(vlm)
    cost = prices.cheap + (prices.escalate * vlm.sum() + prices.review * human.sum()) / n
    return Outcome(1000 * float(cost), 0.0, False, _shares((~cheap_error).mean(), vlm.mean(), human.mean()))
