"""Certify from production labels: the accepted error stays <= alpha under the audit sampling.

Production labels are not an iid sample. The review queue holds every item the cascade sent to a
human (inclusion probability 1), a sample of the accepts at the audit fraction (which drift
raises, and which a running rollout adds to: ``policies.audit_sampling.inclusion_probability``),
and some of those sampled items were never labelled (expired). Certifying on them as if they
were iid (``policies.certify``) over-weights whatever was sampled more often: when that is the
easier traffic, the naive certificate is too optimistic (``evals/benchmarks/recert.py`` shows it
failing far more often than delta). docs/recertification.md has the argument at length.

**The test.** For a candidate rule with acceptance A and loss L (1: the accepted answer is
wrong), risk <= alpha is E[A (L - alpha)] <= 0 over the traffic. Each stream item i enters the
sample with a known probability pi_i, independently of its label (a hash of its request id), so
Z_i = S_i / pi_i * A_i (L_i - alpha) (S_i: sampled) has mean E[A (L - alpha)] whatever pi_i is
(Horvitz-Thompson). For a bet c in [0, 1] and pi_min <= every pi_i,

    K_c = prod over sampled items of (1 - c * pi_min / (1 - alpha) * Z_i)
        = prod over sampled accepted items of (1 - c u_i) if wrong, (1 + c u_i alpha / (1 - alpha)) if right

with u_i = pi_min / pi_i (the weight scaled by the largest weight), is a product of non-negative
factors with conditional mean <= 1 when the risk exceeds alpha (unsampled items contribute 1),
so E[K_c] <= 1 under the null and so is any fixed mixture K of them; p = min(1, 1 / K) is a valid
p-value (Markov). It is a betting test (Waudby-Smith and Ramdas, "Estimating means of bounded
random variables by betting", JRSS-B 2024) on the Horvitz-Thompson terms, exact in finite
samples, for pi that changes over time (a fraction set from past data is predictable), and it
needs no count of the unsampled traffic. With every pi equal and no errors it needs at least
the exact binomial test's log(1/delta) / -log(1 - alpha) items, plus what the mixture costs.
The mixture: half on predictable bets (``predictable_bets``: each item's bet, in the order the
items were queued, is the growth-optimal bet estimated from the earlier ones, so heavy-tailed
weights get the small bets they need), half spread over fixed c = 1/64, 1/32, ..., 1.
Rows must be in the order the items were queued (``sample_from_items`` sorts them).

**A uniform sample.** When every test item was sampled at one inclusion probability (u = 1
throughout: one audit fraction, reviews joining at their audit coin, as ``bench loop`` queues
them), the sampled accepted items are independent draws of the accepted traffic and the number
wrong among them is a sum of independent Bernoulli terms of mean risk; the exact binomial test
(``policies.certify``'s) is then valid (Hoeffding 1956: the binomial tail bounds such a sum's) and
far more powerful than the mixture at a few hundred items (300 accepted, 15 wrong: binomial
p ~ 0.002, the mixture ~ 0.3). The choice is made on the inclusion probabilities alone, never on
the labels; a mixed sample keeps the betting test.

**Non-response.** A sampled item without a label (an expired or still pending audit) counts
as an error: the bound then holds whatever made it go unlabelled. Reviewers skip the hard
images, which are the likely errors, so weighting the labelled ones up as if the missing were
missing at random would be optimistic exactly where it matters. The price: a non-response share
near alpha makes certification impossible, and the refusal says so.

**Thresholds.** As in ``policies.risk_control.choose_tier_thresholds`` (Learn then Test with
Pareto Testing): a fit share (an independent coin per item, about 10%, 20 to 200 items) places
the candidates and orders them along their weighted risk-cost front; the test share's p-values
are tested in that fixed order at level delta, and the cheapest certified candidate wins.
``certify_production_plan`` gives the three-tier plan. One threshold (``certify_production``) is
the plan with no escalation, tested downwards from the threshold where the fit share predicts
the most evidence (the classic Learn then Test order, from a start chosen on the fit share).

**Too few labels** is a refusal (``TooFewLabels``, a ``ValueError`` naming the field), never a
weaker certificate: it says how many more audit labels could certify at best.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from policies.certify import CertifyInputError
from policies.risk_control import (
    RiskCertificate,
    TierCosts,
    TierPlan,
    _candidate_thresholds,
    _pareto_order,
)

FIT_FRACTION, MIN_FIT, MAX_FIT = 0.1, 20, 200  # as policies.certify
BET_GRID = np.geomspace(1 / 64, 1.0, 7)  # the fixed half of the mixture: 1/64, 1/32, ..., 1
PREDICTABLE_SHARE = 0.5  # the mixture's weight on the predictable bets
MAX_BET = 0.95  # a predictable bet never stakes everything on one item
TEST_BLOCK = 16  # candidates tested at once (the sequence usually ends within a few blocks)
# A VLM score the sample lacks: above every finite VLM threshold, below "inf" (never accept).
UNKNOWN_PASSES = 1e300
NONRESPONSE_RULE = "worst case: a sampled item without a label counts as an error"
METHOD = "learn-then-test over Horvitz-Thompson betting p-values, fixed sequence along the fit's Pareto front"
P_VALUE_METHOD = "ht_betting"
UNIFORM_P_VALUE_METHOD = "binomial"  # every test item sampled at one inclusion probability


class TooFewLabels(CertifyInputError):
    """The labels cannot certify alpha at delta even if every one were right."""

    def __init__(self, message: str, *, field: str, needed_more: int) -> None:
        super().__init__(message, field=field)
        self.reason = message
        self.needed_more = needed_more


def _fail(name: str, reason: str) -> CertifyInputError:
    error = CertifyInputError(f"{name}: {reason}", field=name)
    error.reason = reason
    return error


def _check_targets(alpha: float, delta: float) -> None:
    for name, value in (("alpha", alpha), ("delta", delta)):
        if not isinstance(value, (int, float, np.floating)) or not 0 < float(value) < 1:
            raise _fail(name, f"must be a number in (0, 1), got {value!r}")


# --------------------------------------------------------------------------- the sample


def _outcome(values: Any, name: str, n: int) -> np.ndarray:
    """1.0 wrong, 0.0 right, NaN unknown (no label, or that tier did not answer)."""
    try:
        array = np.asarray(values, np.float64)
    except (TypeError, ValueError) as exc:
        raise _fail(name, f"must be 0/1 or NaN (no label), ({exc})") from None
    if array.shape != (n,):
        raise _fail(name, f"must have shape ({n},), got {array.shape}")
    known = array[~np.isnan(array)]
    if not np.isin(known, (0.0, 1.0)).all():
        raise _fail(name, "must be 0/1 (1: wrong) or NaN (no label)")
    return array


@dataclass(frozen=True)
class ProductionSample:
    """Every item the review queue sampled in one window, labelled or not, one row each.

    ``cheap_score``: the cheap tier's calibrated score. ``cheap_error``: whether the cheap tier's
    answer was wrong by the reviewer's label (NaN: no label). ``inclusion_probability``: the
    chance the item was queued (``ReviewItem.inclusion_probability``: 1 for a review, the union
    of the audit fractions for an audit). ``strong_error`` / ``strong_score`` (optional, for the
    three-tier plan): the VLM answer's error and calibrated confidence, NaN where the VLM was not
    asked (or gave no valid answer). ``min_inclusion_probability``: the smallest inclusion
    probability any item of the window could have had (the lowest audit fraction in force);
    default: the smallest in the sample, which is that whenever every fraction in force sampled
    at least one item.
    """

    cheap_score: np.ndarray
    cheap_error: np.ndarray
    inclusion_probability: np.ndarray
    strong_error: np.ndarray | None = None
    strong_score: np.ndarray | None = None
    min_inclusion_probability: float | None = None

    def __post_init__(self) -> None:
        try:
            score = np.asarray(self.cheap_score, np.float64)
        except (TypeError, ValueError) as exc:
            raise _fail("cheap_score", f"must be numbers ({exc})") from None
        if score.ndim != 1:
            raise _fail("cheap_score", f"must be 1-d, got shape {score.shape}")
        if not np.isfinite(score).all():
            raise _fail("cheap_score", "contains NaN or infinity")
        n = len(score)
        pi = np.asarray(self.inclusion_probability, np.float64)
        if pi.shape != (n,):
            raise _fail("inclusion_probability", f"must have shape ({n},), got {pi.shape}")
        if not ((pi > 0) & (pi <= 1)).all():
            raise _fail(
                "inclusion_probability", "every value must be in (0, 1] (an item with 0 is never sampled)"
            )
        floor = (
            float(pi.min())
            if self.min_inclusion_probability is None and n
            else self.min_inclusion_probability
        )
        if floor is not None and (not 0 < floor <= 1 or (n and floor > pi.min() + 1e-12)):
            raise _fail(
                "min_inclusion_probability",
                f"must be in (0, 1] and at most the smallest inclusion probability {pi.min() if n else None}, got {floor}",
            )
        object.__setattr__(self, "cheap_score", score)
        object.__setattr__(self, "cheap_error", _outcome(self.cheap_error, "cheap_error", n))
        object.__setattr__(self, "inclusion_probability", pi)
        object.__setattr__(self, "min_inclusion_probability", floor)
        if self.strong_error is not None:
            object.__setattr__(self, "strong_error", _outcome(self.strong_error, "strong_error", n))
        if self.strong_score is not None:
            strong_score = np.asarray(self.strong_score, np.float64)
            if strong_score.shape != (n,) or np.isinf(strong_score).any():
                raise _fail("strong_score", f"must have shape ({n},) with no infinity (NaN: no VLM answer)")
            object.__setattr__(self, "strong_score", strong_score)

    def __len__(self) -> int:
        return len(self.cheap_score)

    @property
    def unit_weight(self) -> np.ndarray:
        """u = pi_min / pi: each item's Horvitz-Thompson weight scaled by the largest (in (0, 1])."""
        return self.min_inclusion_probability / self.inclusion_probability

    @property
    def n_unlabelled(self) -> int:
        """Items with no label at all (neither tier's answer judged)."""
        missing = np.isnan(self.cheap_error)
        if self.strong_error is not None:
            missing &= np.isnan(self.strong_error)
        return int(missing.sum())

    def subset(self, rows: np.ndarray) -> ProductionSample:
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return ProductionSample(
            self.cheap_score[rows],
            self.cheap_error[rows],
            self.inclusion_probability[rows],
            pick(self.strong_error),
            pick(self.strong_score),
            self.min_inclusion_probability,
        )

    def worst_case(self) -> _Outcomes:
        """The outcomes with every unknown error counted as an error (the non-response rule). A
        VLM answer that is unknown (``strong_error`` NaN: not asked, or not labelled) counts as
        accepted and wrong wherever a candidate escalates the item: its score is unknown too."""
        strong = np.full(len(self), np.nan) if self.strong_error is None else self.strong_error
        strong_score = self.strong_score
        if strong_score is not None:
            strong_score = np.where(np.isnan(strong), UNKNOWN_PASSES, strong_score)
        return _Outcomes(
            self.cheap_score,
            np.nan_to_num(self.cheap_error, nan=1.0).astype(bool),
            np.nan_to_num(strong, nan=1.0).astype(bool),
            strong_score,
        )


@dataclass(frozen=True)
class _Outcomes:
    """What the candidates are judged on (``TierOutcomes``' fields, already checked): unknown
    errors are errors, and a strong score of ``UNKNOWN_PASSES`` is a VLM answer the sample lacks, taken to
    pass every VLM threshold (and to be wrong) in the worst case."""

    cheap_score: np.ndarray
    cheap_error: np.ndarray
    strong_error: np.ndarray
    strong_score: np.ndarray | None = None

    @property
    def has_strong_score(self) -> bool:
        return self.strong_score is not None


# --------------------------------------------------------------------------- the p-values


def _decisions(data: _Outcomes, accept_t, review_t, vlm_t):
    """(candidates x items) masks: accepted automatically, accepted and wrong, reviewed,
    escalated: ``TierPlan.decide`` / ``decide_vlm`` over arrays."""
    s = data.cheap_score[None, :]
    cheap_ok = s >= accept_t[:, None]
    escalated = (s >= review_t[:, None]) & ~cheap_ok
    if vlm_t is None:
        vlm_ok = escalated
    else:
        with np.errstate(invalid="ignore"):  # NaN (no VLM answer) never passes
            vlm_ok = escalated & (data.strong_score[None, :] >= vlm_t[:, None])
    auto = cheap_ok | vlm_ok
    wrong = (cheap_ok & data.cheap_error[None, :]) | (vlm_ok & data.strong_error[None, :])
    return auto, wrong, ~auto, escalated


def _growth(c: np.ndarray, u: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """log factors of a wrong and a right accepted item: log(1 - c u), log(1 + c u a / (1 - a))."""
    wrong = np.log(np.maximum(1.0 - c * u, 1e-300))  # c = u = 1: one error ends that bet
    right = np.log1p(c * u * alpha / (1.0 - alpha))
    return wrong, right


def predictable_bets(auto: np.ndarray, wrong: np.ndarray, u: np.ndarray, alpha: float) -> np.ndarray:
    """(candidates x items) the bet on each item from the candidate's accepted items before it
    (in row order, the order they were queued): the growth-optimal bet to first order,
    -mean(X) / mean(X^2) of X = u (L - alpha) / (1 - alpha), with one pseudo-error at the
    largest weight (X^2 = 1) in the denominator, so early and rare heavy items bet little;
    within [0, ``MAX_BET``]. Each bet uses only earlier items: the product stays a test
    supermartingale (Waudby-Smith and Ramdas's predictable plug-in)."""
    x = np.where(auto, u[None, :] * (wrong - alpha) / (1 - alpha), 0.0)
    before = lambda a: np.cumsum(a, axis=1) - a  # noqa: E731  (sums over the earlier items)
    mean = before(x) / (before(auto.astype(np.float64)) + 1.0)
    square = (before(x * x) + 1.0) / (before(auto.astype(np.float64)) + 1.0)
    return np.clip(-mean / square, 0.0, MAX_BET)


def log_evidence(auto: np.ndarray, wrong: np.ndarray, u: np.ndarray, alpha: float) -> np.ndarray:
    """log K per candidate: half the predictable-bet product, half the fixed bets' mixture
    (module docstring), over the items in row order. ``auto``/``wrong``: (candidates x items)
    masks; ``u``: pi_min / pi."""
    from scipy.special import logsumexp

    right = auto & ~wrong
    grid_wrong, grid_right = _growth(BET_GRID[None, :], u[:, None], alpha)  # items x bets
    log_grid = wrong.astype(np.float64) @ grid_wrong + right.astype(np.float64) @ grid_right
    spread = logsumexp(log_grid, axis=1) - math.log(len(BET_GRID))
    bets = predictable_bets(auto, wrong, u, alpha)
    own_wrong, own_right = _growth(bets, u[None, :], alpha)
    log_own = (wrong * own_wrong).sum(1) + (right * own_right).sum(1)
    return np.logaddexp(math.log(PREDICTABLE_SHARE) + log_own, math.log(1 - PREDICTABLE_SHARE) + spread)


def uniform_sample(u: np.ndarray) -> bool:
    """Was every item sampled at the same inclusion probability (u = pi_min / pi = 1)? Then the
    sampled accepted items are independent draws of the traffic's accepted items, each wrong
    with the traffic's risk, and the exact binomial test applies (module docstring)."""
    return bool(len(u)) and bool(np.all(np.isclose(u, 1.0, rtol=0.0, atol=1e-12)))


def test_p_values(auto: np.ndarray, wrong: np.ndarray, u: np.ndarray, alpha: float) -> np.ndarray:
    """p-value per candidate of risk <= alpha: the exact binomial test on a uniform sample (as
    ``policies.certify``; it needs the same fewest items as the betting test with no error, and
    far fewer with a few), else the Horvitz-Thompson betting test. The choice depends on the
    inclusion probabilities only (the design, set before any label), never on the labels."""
    if uniform_sample(u):
        from policies.risk_control import p_values

        return p_values(UNIFORM_P_VALUE_METHOD, wrong.sum(1), auto.sum(1), alpha)
    return np.minimum(1.0, np.exp(-log_evidence(auto, wrong, u, alpha)))


def _weighted_fit_stats(fit: _Outcomes, fit_u: np.ndarray, candidates, costs: TierCosts, alpha: float):
    """Per candidate on the fit share, Horvitz-Thompson weighted: a smoothed risk (a Beta(1, 1)
    posterior mean in effective items, so few items never look safe), the cost per item and the
    masks of the fit items it accepts and gets wrong, and the best-case evidence (every accepted
    item right) per fit item. One matrix product per mask: thousands of candidates."""
    auto, wrong, _, escalated = _decisions(fit, *candidates)
    w = 1.0 / fit_u  # proportional to 1 / pi
    gain = np.log1p(fit_u * alpha / (1 - alpha))  # a right accepted item's evidence at c = 1
    # float32: thousands of candidates x the fit share; the sums only order and filter them
    w32 = w.astype(np.float32)
    sums = auto.astype(np.float32) @ np.stack([w32, w32**2, gain.astype(np.float32)], axis=1)
    mass, mass2, best_case = (sums[:, i].astype(np.float64) for i in range(3))
    n_eff = np.where(mass > 0, mass**2 / np.maximum(mass2, 1e-30), 0.0)
    raw = np.where(mass > 0, (wrong.astype(np.float32) @ w32) / np.maximum(mass, 1e-30), 0.0)
    risk = (raw * n_eff + 1.0) / (n_eff + 2.0)
    total = w.sum()
    reviewed = total - mass  # every item not accepted automatically is reviewed
    escalated_mass = escalated.astype(np.float32) @ w32
    cost = costs.cheap + (costs.escalate * escalated_mass + costs.review * reviewed) / total
    return risk, cost, auto, wrong, best_case


def fit_items(n: int, fit_share: float | None = None) -> float:
    """Expected fit-share items of ``n``: 10% (20 to 200) by default, as ``policies.certify``;
    ``fit_share`` in (0, 1): that share of the items, at least ``MIN_FIT``, no cap."""
    if fit_share is None:
        return min(MAX_FIT, max(MIN_FIT, FIT_FRACTION * n))
    return min(float(n), max(MIN_FIT, fit_share * n))


def split(
    sample: ProductionSample, seed: int, fit_share: float | None = None
) -> tuple[ProductionSample, ProductionSample]:
    """Fit and test shares by an independent coin per item (probability q: ``fit_items``, 10%
    of the items, 20 to 200 expected, by default), so that, given the fit share, the test share
    is again a Bernoulli sample of the traffic, with inclusion probabilities pi (1 - q) /
    (1 - pi q): a review (pi = 1) not in the fit share is in the test share for sure."""
    n = len(sample)
    q = fit_items(n, fit_share) / n
    rng = np.random.default_rng(seed)
    in_fit = rng.random(n) < q
    while in_fit.sum() < 2:  # a grid needs two items (the coins again, independent of the labels)
        in_fit = rng.random(n) < q
    fit, test = sample.subset(np.flatnonzero(in_fit)), sample.subset(np.flatnonzero(~in_fit))
    conditional = lambda pi: pi * (1 - q) / (1 - pi * q)  # noqa: E731
    test = dataclasses.replace(
        test,
        inclusion_probability=conditional(test.inclusion_probability),
        min_inclusion_probability=conditional(sample.min_inclusion_probability),
    )
    return fit, test


def _refuse_if_too_few(
    sample: ProductionSample, alpha: float, delta: float, field: str, fit_share: float | None = None
) -> None:
    """Could the test share certify if every sampled item were accepted and right? Every bet
    is at most c = 1, so K <= prod(1 + u alpha / (1 - alpha)) over the test share: below
    1 / delta no outcome certifies, and the refusal says how many more labels lift it there."""
    bar = math.log(1.0 / delta)
    n = len(sample)
    n_fit = int(round(fit_items(n, fit_share))) if n else MIN_FIT
    u = sample.unit_weight if n else np.ones(0)
    gain = lambda x: np.log1p(x * alpha / (1 - alpha))  # noqa: E731
    have = float(np.sort(gain(u))[::-1][: max(n - n_fit, 0)].sum())  # the best test share possible
    if n > n_fit + 1 and have >= bar:
        return
    audits = u[sample.inclusion_probability < 1] if n else u
    u_new = float(np.median(audits)) if len(audits) else 1.0
    pi_new = sample.min_inclusion_probability / u_new if n else None
    more = max(0, math.ceil((bar - have) / float(gain(u_new))))
    more += max(0, n_fit + 2 - n)
    where = f" at inclusion probability {pi_new:.3g}" if pi_new else ""
    raise TooFewLabels(
        f"{n} sampled items cannot certify alpha={alpha:g} at delta={delta:g}: at least {more} more "
        f"audit labels{where} are needed, even if every one of them is right ({n_fit} items place the "
        f"candidates; each right label{where} adds {float(gain(u_new)):.4f} of the {bar:.2f} log-evidence "
        "needed). This is a refusal, not a weaker certificate.",
        field=field,
        needed_more=more,
    )


# --------------------------------------------------------------------------- certify


def _certify_candidates(
    sample: ProductionSample,
    candidates_of,
    *,
    costs: TierCosts,
    alpha: float,
    delta: float,
    seed: int,
    max_review_share: float | None,
    descending: bool = False,
    fit_share: float | None = None,
):
    """The shared engine: split, order on fit, test in fixed sequence. Returns what the front
    ends need to build their results. ``descending`` (one threshold): test downwards from the
    threshold where the fit share predicts the most evidence (more accepted items add evidence
    until the error among them nears alpha), instead of along the Pareto front."""
    fit, test = split(sample, seed, fit_share)
    fit_out, test_out = fit.worst_case(), test.worst_case()
    candidates = candidates_of(fit_out)
    risk, cost, fit_auto, fit_wrong, best_case = _weighted_fit_stats(
        fit_out, fit.unit_weight, candidates, costs, alpha
    )
    # drop the candidates whose test share could not certify even if every item were right, as
    # the fit share predicts it (power only: decided on fit, so the order stays independent of
    # the test share's labels); the smoothed risk puts thinly observed ones off the front anyway
    usable = best_case * len(test) / len(fit) >= math.log(1.0 / (PREDICTABLE_SHARE * delta))
    if descending:  # the error falls with the threshold: the classic LTT order, from a start
        order = np.flatnonzero(usable)
        order = order[np.argsort(-candidates[0][order], kind="stable")]
        predicted = (
            log_evidence(fit_auto[order], fit_wrong[order], fit.unit_weight, alpha) * len(test) / len(fit)
        )
        order = order[int(np.argmax(predicted)) :] if len(order) else order  # where a pass is likeliest
    else:
        order = np.flatnonzero(usable)[_pareto_order(risk[usable], cost[usable])]
    n_candidates = len(order)
    # the fixed sequence ends at its first failure: test in blocks, stop after the failing one
    tested, p = 0, np.zeros(0)
    while tested < len(order) and not (p > delta).any():
        block = order[tested : tested + TEST_BLOCK]
        auto, wrong, _, _ = _decisions(test_out, *(None if c is None else c[block] for c in candidates))
        p = np.r_[p, test_p_values(auto, wrong, test.unit_weight, alpha)]
        tested += len(block)
    failed = np.flatnonzero(p > delta)
    n_certified = int(failed[0]) if len(failed) else len(order)
    order = order[:tested]
    chosen = tuple(None if c is None else c[order] for c in candidates)
    auto, wrong, reviewed, escalated = _decisions(test_out, *chosen)
    w = 1.0 / test.unit_weight
    total = w.sum()
    review_share = (reviewed @ w) / total
    test_cost = costs.cheap + (costs.escalate * (escalated @ w) + costs.review * (reviewed @ w)) / total
    certified = list(range(n_certified))
    smallest = min([float(review_share[k]) for k in certified] + [1.0])
    if max_review_share is not None:
        certified = [k for k in certified if review_share[k] <= max_review_share]
    best = min(certified, key=lambda k: (test_cost[k], k)) if certified else None
    return dict(
        fit=fit,
        test=test,
        test_out=test_out,
        order=order,
        chosen=chosen,
        auto=auto,
        wrong=wrong,
        escalated=escalated,
        reviewed=reviewed,
        p=p,
        n_certified=n_certified,
        best=best,
        test_cost=test_cost,
        smallest_review_share=smallest,
        n_candidates=n_candidates,
        weights=w,
    )


def risk_upper_bound(auto: np.ndarray, wrong: np.ndarray, u: np.ndarray, delta: float) -> float:
    """The smallest alpha' the same test (the same bets) certifies at delta for one candidate
    (bisection: the evidence grows with alpha'); 1.0 when none below 1 does."""
    lo, hi = 1e-6, 1.0 - 1e-9

    def passes(a: float) -> bool:
        return float(test_p_values(auto[None, :], wrong[None, :], u, a)[0]) <= delta

    if not passes(hi):
        return 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return hi


def _certificate(run: dict, *, alpha, delta, score: str, extra: dict[str, Any], sample: ProductionSample):
    test, best = run["test"], run["best"]
    n = len(test)
    common = dict(
        alpha=alpha,
        delta=delta,
        n=n,
        p_value_method=UNIFORM_P_VALUE_METHOD if uniform_sample(test.unit_weight) else P_VALUE_METHOD,
        n_candidates=run["n_candidates"],
        method=METHOD,
        score=score,
    )
    base_extra = {
        "nonresponse": NONRESPONSE_RULE,
        "unlabelled_items": sample.n_unlabelled,
        "sampled_items": len(sample),
        "min_inclusion_probability": sample.min_inclusion_probability,
    }
    if best is None:
        return RiskCertificate(
            threshold=None,
            coverage=0.0,
            n_accepted=0,
            n_errors=0,
            empirical_risk=0.0,
            risk_upper_bound=1.0,
            p_value=1.0,
            n_certified=run["n_certified"],
            extra=base_extra,
            **common,
        )
    auto, wrong, w = run["auto"][best], run["wrong"][best], run["weights"]
    mass = float(auto @ w)
    return RiskCertificate(
        threshold=float(run["chosen"][1][best]),  # review threshold: below it nothing is accepted
        coverage=mass / float(w.sum()),  # weighted: the share of the traffic accepted
        n_accepted=int(auto.sum()),
        n_errors=int(wrong.sum()),
        empirical_risk=float(wrong @ w) / mass if mass else 0.0,  # Hajek estimate, unlabelled as errors
        risk_upper_bound=risk_upper_bound(auto, wrong, test.unit_weight, delta),
        p_value=float(run["p"][best]),
        n_certified=run["n_certified"],
        extra={**base_extra, **extra},
        **common,
    )


def certify_production(
    sample: ProductionSample,
    *,
    alpha: float,
    delta: float,
    seed: int = 0,
    n_points: int = 100,
) -> RiskCertificate:
    """One accept threshold (accept when the cheap score >= it, review below) whose error among
    accepted traffic is certified <= alpha with probability >= 1 - delta, from production labels
    weighted by their inclusion probabilities. Raises ``TooFewLabels`` when the sample cannot
    certify even if every label were right; an infeasible certificate (threshold None: accept
    nothing) when the labels show no threshold is safe enough."""
    _check_targets(alpha, delta)
    _refuse_if_too_few(sample, alpha, delta, "cheap_error")

    def candidates_of(fit: _Outcomes):
        grid = np.unique(np.quantile(fit.cheap_score, np.linspace(0, 1, n_points), method="higher"))
        levels = np.concatenate([grid, [-np.inf]])
        return levels, levels.copy(), None

    run = _certify_candidates(
        sample,
        candidates_of,
        costs=TierCosts(),
        alpha=alpha,
        delta=delta,
        seed=seed,
        max_review_share=None,
        descending=True,
    )
    # one threshold: the cheapest certified is the lowest threshold (the most accepted)
    if run["best"] is not None:
        certified = range(run["n_certified"])
        run["best"] = min(certified, key=lambda k: (run["chosen"][0][k], k))
    return _certificate(
        run,
        alpha=alpha,
        delta=delta,
        score="cheap tier's calibrated confidence",
        extra={"seed": seed},
        sample=sample,
    )


def certify_production_plan(
    sample: ProductionSample,
    *,
    costs: TierCosts,
    alpha: float,
    delta: float,
    seed: int = 0,
    n_points: int = 40,
    max_review_share: float | None = None,
    score_name: str | None = None,
    fit_share: float | None = None,
) -> TierPlan:
    """The three-tier plan (``policies.risk_control.TierPlan``: accept, escalate and, with the
    VLM's scores, VLM-accept thresholds) of least expected cost whose automatically accepted
    error is certified <= alpha at delta from production labels. The candidates are
    ``choose_tier_thresholds``' (fit-share quantiles), ordered on the fit share's weighted
    risk-cost front; a VLM answer the sample lacks (the VLM was not asked, or the item went
    unlabelled) counts as accepted and wrong wherever a candidate escalates the item. ``max_review_share``: the review capacity, as in
    ``choose_tier_thresholds``. ``score_name``: what ``cheap_score`` is, for the certificate's
    statement (default: the cheap tier's calibrated confidence). ``fit_share``: the share of the
    sample that places and orders the candidates (``fit_items``; default 10%, at most 200 items).
    Raises ``TooFewLabels`` like ``certify_production``."""
    _check_targets(alpha, delta)
    if fit_share is not None and not 0.0 < fit_share < 1.0:
        raise _fail("fit_share", f"must be in (0, 1), got {fit_share}")
    if max_review_share is not None and not 0.0 <= max_review_share <= 1.0:
        raise _fail("max_review_share", f"must be in [0, 1], got {max_review_share}")
    if sample.strong_error is None:
        raise _fail("strong_error", "the three-tier plan needs the VLM answers' errors (NaN where not asked)")
    _refuse_if_too_few(sample, alpha, delta, "cheap_error", fit_share)
    run = _certify_candidates(
        sample,
        lambda fit: _candidate_thresholds(fit, n_points),
        costs=costs,
        alpha=alpha,
        delta=delta,
        seed=seed,
        max_review_share=max_review_share,
        fit_share=fit_share,
    )
    best, chosen = run["best"], run["chosen"]
    capacity = None
    if max_review_share is not None:
        capacity = {
            "max_review_share": float(max_review_share),
            "feasible": best is not None or max_review_share >= 1.0,
            "smallest_feasible_review_share": run["smallest_review_share"],
        }
    extra: dict[str, Any] = {"seed": seed}
    if best is not None:
        extra |= {"accept_threshold": float(chosen[0][best]), "review_threshold": float(chosen[1][best])}
        if chosen[2] is not None:
            extra["vlm_accept_threshold"] = float(chosen[2][best])
    score = (score_name or "cheap tier's calibrated confidence") + " (accepted by the cheap tier or the VLM)"
    cert = _certificate(run, alpha=alpha, delta=delta, score=score, extra=extra, sample=sample)
    if best is None:
        never_vlm = np.inf if sample.strong_score is not None else None
        rates = {"accept": 0.0, "escalate": 0.0, "review": 1.0}
        return TierPlan(np.inf, np.inf, costs.cheap + costs.review, rates, cert, never_vlm, capacity)
    w = run["weights"]
    total = float(w.sum())
    test_out = run["test_out"]
    cheap_share = float((test_out.cheap_score >= chosen[0][best]) @ w) / total
    rates = {
        "accept": cheap_share,
        "escalate": float(run["escalated"][best] @ w) / total,
        "review": float(run["reviewed"][best] @ w) / total,
    }
    vlm_accept = None if chosen[2] is None else float(chosen[2][best])
    if vlm_accept is not None:
        rates["vlm_accept"] = float(run["auto"][best] @ w) / total - cheap_share
    return TierPlan(
        float(chosen[0][best]),
        float(chosen[1][best]),
        float(run["test_cost"][best]),
        rates,
        cert,
        vlm_accept,
        capacity,
    )


def naive_sample(sample: ProductionSample) -> tuple[np.ndarray, np.ndarray]:
    """The labelled items as the naive procedure sees them (unweighted, unlabelled dropped): the
    baseline the simulation shows failing."""
    labelled = ~np.isnan(sample.cheap_error)
    return sample.cheap_score[labelled], sample.cheap_error[labelled].astype(bool)


__all__ = [
    "METHOD",
    "NONRESPONSE_RULE",
    "ProductionSample",
    "TooFewLabels",
    "certify_production",
    "certify_production_plan",
    "log_evidence",
    "naive_sample",
    "sample_from_items",
]


# --------------------------------------------------------------------------- from the queue


@dataclass(frozen=True)
class QueueSample:
    """A ``ProductionSample`` read from review items, and what was left out and why."""

    sample: ProductionSample
    left_out: dict[str, int]
    items: tuple[Any, ...] = ()  # the kept items, one per row, in row order


def sample_from_items(items: Any, *, task: str | None = None, distrusted_reviewers: Any = ()) -> QueueSample:
    """The production sample a window of review items gives (``ReviewItem``s of one task).

    Left out: shadow items (a candidate's unserved answers: another population), items queued
    before provenance was stored (inclusion probability unknown), items without a cheap-tier
    score in their trace. The cheap score is the ``policy:thresholds`` step's; an unlabelled
    item (pending or expired) has NaN errors. When a VLM step answered, the label judges the
    VLM's answer (``strong_error``, the step's score as ``strong_score``) and the cheap answer's
    correctness is unknown (NaN: counted as wrong wherever a candidate accepts it). Rows come
    out in the order the items were queued (``created_at``).

    ``distrusted_reviewers`` (the flagged ones: ``policies.reviewer_quality.flagged_reviewers``):
    a label they gave (``labelled_by``) counts as no label, i.e. non-response, an error wherever a
    candidate accepts: a noisy label can only make the certificate more conservative.
    """
    from policies.audit_sampling import is_error

    rows: list[tuple[float, float, float, float, float]] = []
    kept: list[Any] = []
    left_out = {"shadow": 0, "unknown_inclusion_probability": 0, "no_score": 0, "other_task": 0}
    # in the order they were queued: the predictable bets may only look back in time
    for item in sorted(items, key=lambda i: getattr(i, "created_at", 0.0)):
        if task is not None and item.task != task:
            left_out["other_task"] += 1
            continue
        if item.kind == "shadow":
            left_out["shadow"] += 1
            continue
        if item.inclusion_probability is None:
            left_out["unknown_inclusion_probability"] += 1
            continue
        steps = item.trace.get("steps", []) if isinstance(item.trace, dict) else []
        cheap = next((s.get("score") for s in steps if s.get("stage") == "policy:thresholds"), None)
        if cheap is None:
            left_out["no_score"] += 1
            continue
        vlm = [s for s in steps if str(s.get("stage", "")).startswith("vlm")]
        trusted = item.status == "labelled" and getattr(item, "labelled_by", None) not in distrusted_reviewers
        wrong = float(is_error(item.label, item.proposed)) if trusted else math.nan
        if vlm:
            vlm_score = next((s.get("score") for s in reversed(vlm) if s.get("score") is not None), None)
            strong_score = math.nan if vlm_score is None else float(vlm_score)
            rows.append((float(cheap), math.nan, float(item.inclusion_probability), wrong, strong_score))
        else:
            rows.append((float(cheap), wrong, float(item.inclusion_probability), math.nan, math.nan))
        kept.append(item)
    table = np.array(rows, np.float64).reshape(-1, 5)
    sample = ProductionSample(table[:, 0], table[:, 1], table[:, 2], table[:, 3], table[:, 4])
    return QueueSample(sample, left_out, tuple(kept))
