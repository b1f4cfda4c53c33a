"""Accept thresholds with a finite-sample guarantee on the error rate among accepted items.

The promise: with probability at least 1 - delta over the draw of the calibration set, the
error rate among automatically accepted items, P(wrong | accepted), is at most alpha.

Method: Learn then Test (Angelopoulos, Bates, Candes, Jordan and Lei, "Learn then Test:
Calibrating Predictive Algorithms to Achieve Risk Control", arXiv:2110.01052, 2021). Each
candidate threshold t is a null hypothesis H_t: "selective risk at t > alpha". The candidates
are tested in a fixed order, from the most conservative (highest threshold) down, by
fixed-sequence testing: reject H_t while its p-value is <= delta and stop at the first that is
not. This controls the family-wise error rate at delta, so every rejected threshold, and in
particular the lowest one, which we return, has risk <= alpha with probability >= 1 - delta.

p-values, conditional on the number n_t of accepted calibration items (the errors among them
are then Binomial(n_t, risk_t) exactly, the argument of Geifman and El-Yaniv, "Selective
Classification for Deep Neural Networks", NeurIPS 2017):
- ``binomial``: the exact one-sided binomial tail P(Binomial(n_t, alpha) <= errors_t);
- ``hoeffding_bentkus``: min(exp(-n h(min(r, alpha), alpha)), e * P(Binomial(n, alpha) <= ceil(n r)))
  (Bates, Angelopoulos, Lei, Malik and Jordan, "Distribution-Free, Risk-Controlling
  Prediction Sets", JACM 2021, Prop. 3), valid for any loss in [0, 1] and more conservative.

The candidate grid and its order must not depend on the items the p-values are computed on
(LTT section 4 lets the ordering be learned on a separate split). ``threshold_grid`` builds it
from an independent split (the one the calibrator was fitted on) and starts where enough test
items are expected to be accepted to have a chance of rejecting at all.

With three tiers (cheap model, VLM, human), the candidates are pairs of thresholds (accept the
cheap answer, send to a human), or triples when the VLM's calibrated confidence is known (a third
threshold accepts the VLM's answer; below it the escalated item goes to a human); they are
ordered on the independent split by estimated risk along their risk-cost Pareto front and then
tested the same way (Pareto Testing: Laufer-Goldshtein, Fisch, Barzilay and Jaakkola,
"Efficiently Controlling Multiple Risks with Pareto Testing", ICLR 2023). Of the certified
pairs we choose the one with the lowest expected cost.

When no candidate is certified the target is infeasible: nothing is accepted automatically,
and the certificate says so and reports the coverage achieved (zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from policies.thresholds import decide
from visionroute.errors import ConfigError, InputError

PValue = Literal["binomial", "hoeffding_bentkus"]
P_VALUES: tuple[str, ...] = ("binomial", "hoeffding_bentkus")


# --------------------------------------------------------------------------- p-values and bounds


def binomial_p_value(n_errors: int, n: int, alpha: float) -> float:
    """P(Binomial(n, alpha) <= n_errors): small when n_errors is implausibly low for risk > alpha."""
    from scipy import stats  # fitting-time only; the service imports this module without scipy

    if n == 0:
        return 1.0  # nothing accepted: no evidence either way
    return float(stats.binom.cdf(n_errors, n, alpha))


def hoeffding_bentkus_p_value(risk_hat: float, n: int, alpha: float) -> float:
    """The Hoeffding-Bentkus p-value for H: mean loss > alpha (Bates et al. 2021, Prop. 3)."""
    from scipy import stats

    if n == 0:
        return 1.0
    r = min(risk_hat, alpha)
    # h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)), the binary KL divergence (0 log 0 = 0).
    kl = (r * math.log(r / alpha) if r > 0 else 0.0) + (1 - r) * math.log((1 - r) / (1 - alpha))
    hoeffding = math.exp(-n * kl)
    bentkus = math.e * float(stats.binom.cdf(math.ceil(n * risk_hat), n, alpha))
    return min(hoeffding, bentkus, 1.0)


def clopper_pearson_upper(n_errors: int, n: int, delta: float) -> float:
    """The exact one-sided (1 - delta) upper confidence bound on a binomial rate.

    For the binomial p-value, p <= delta exactly when this bound is <= alpha.
    """
    from scipy import stats

    if n == 0 or n_errors >= n:
        return 1.0
    return float(stats.beta.ppf(1 - delta, n_errors + 1, n - n_errors))


def min_items_to_certify(alpha: float, delta: float) -> int:
    """The fewest accepted items that can certify alpha at all (all of them correct)."""
    return math.ceil(math.log(delta) / math.log(1 - alpha))


def _p_value(kind: str, n_errors: int, n: int, alpha: float) -> float:
    if kind == "binomial":
        return binomial_p_value(n_errors, n, alpha)
    if kind == "hoeffding_bentkus":
        return hoeffding_bentkus_p_value(n_errors / n if n else 0.0, n, alpha)
    raise ConfigError(f"unknown p-value {kind!r}; expected one of {list(P_VALUES)}", field="p_value")


def p_values(kind: str, n_errors: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    """``_p_value`` over arrays of counts at once (one scipy call instead of one per candidate)."""
    from scipy import stats

    n_errors = np.asarray(n_errors, np.int64)
    n = np.asarray(n, np.int64)
    if kind == "binomial":
        p = stats.binom.cdf(n_errors, n, alpha)
    elif kind == "hoeffding_bentkus":
        risk_hat = n_errors / np.maximum(n, 1)
        r = np.minimum(risk_hat, alpha)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(r > 0, r * np.log(r / alpha), 0.0) + (1 - r) * np.log((1 - r) / (1 - alpha))
        bentkus = math.e * stats.binom.cdf(np.ceil(n * risk_hat), n, alpha)
        p = np.minimum(np.minimum(np.exp(-n * kl), bentkus), 1.0)
    else:
        raise ConfigError(f"unknown p-value {kind!r}; expected one of {list(P_VALUES)}", field="p_value")
    return np.where(n > 0, p, 1.0)  # nothing accepted: no evidence either way


def _check_targets(alpha: float, delta: float) -> None:
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}", field="alpha")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}", field="delta")


def _as_scores_and_errors(scores: Any, is_error: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64)
    is_error = np.asarray(is_error, bool)
    if scores.ndim != 1 or scores.shape != is_error.shape:
        raise InputError(
            f"scores and is_error must be 1-d and equally long, got {scores.shape} and {is_error.shape}",
            field="scores",
        )
    if not np.isfinite(scores).all():
        raise InputError("scores contain NaN or infinity", field="scores")
    return scores, is_error


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        # JSON has no infinity; "inf" / "-inf" strings round-trip through float() and pydantic.
        return float(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.integer):
        return int(value)
    return value


# --------------------------------------------------------------------------- the grid


def threshold_grid(
    independent_scores: Any,
    *,
    n_test: int,
    alpha: float,
    delta: float,
    n_points: int = 100,
    start_factor: float = 2.0,
) -> np.ndarray:
    """Decreasing candidate thresholds from scores that the test will NOT see.

    The grid runs through the quantiles of ``independent_scores`` from the coverage at which
    ``n_test`` items would be expected to hold ``start_factor`` times the fewest items that
    can certify alpha, down to full coverage. Starting any higher only wastes the first test:
    fixed-sequence testing stops at the first threshold it cannot certify.
    """
    _check_targets(alpha, delta)
    scores = np.asarray(independent_scores, np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise InputError(
            f"independent_scores must be a non-empty 1-d array, got shape {scores.shape}", field="scores"
        )
    start = min(1.0, start_factor * min_items_to_certify(alpha, delta) / max(n_test, 1))
    coverages = np.linspace(start, 1.0, n_points)
    thresholds = np.quantile(scores, 1.0 - coverages, method="higher")
    return np.unique(thresholds)[::-1]  # unique sorts ascending; test from the highest


# --------------------------------------------------------------------------- one threshold


@dataclass(frozen=True)
class RiskCertificate:
    """What the calibration proved, in the words and numbers a user needs to trust it."""

    alpha: float
    delta: float
    n: int  # calibration items the p-values were computed on
    threshold: float | None  # accept when score >= threshold; None: accept nothing
    coverage: float  # fraction of the n items accepted at the threshold
    n_accepted: int
    n_errors: int
    empirical_risk: float  # errors / accepted among the n items (0 when none accepted)
    risk_upper_bound: float  # exact (1 - delta) upper bound on the risk at this threshold
    p_value: float
    p_value_method: str
    n_candidates: int
    n_certified: int
    method: str = "learn-then-test, fixed-sequence testing"
    score: str = "calibrated top-1 confidence"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_feasible(self) -> bool:
        return self.threshold is not None

    def accepts(self, score: float) -> bool:
        return self.threshold is not None and score >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: an infinite threshold is written as the string "inf" or "-inf"."""
        out = _json_safe(asdict(self))
        out["feasible"] = self.is_feasible
        out["statement"] = self.statement()
        return out

    def statement(self) -> str:
        if not self.is_feasible:
            return (
                f"INFEASIBLE: no threshold could be certified to keep the error among accepted items "
                f"at or below {self.alpha:g} with confidence {1 - self.delta:g} from {self.n} calibration "
                f"items; nothing is accepted automatically (coverage {self.coverage:.1%})."
            )
        which = "every item" if self.threshold == -np.inf else f"{self.score} >= {self.threshold:.6g}"
        return (
            f"With probability at least {1 - self.delta:g} over the calibration draw, at most "
            f"{self.alpha:.2%} of the items accepted automatically ({which}) are wrong; "
            f"{self.coverage:.1%} of {self.n} calibration items were accepted."
        )

    def to_text(self) -> str:
        """The human-readable certificate ``visionroute calibrate`` writes next to the artefact."""
        lines = [
            "VisionRoute risk certificate",
            "============================",
            self.statement(),
            "",
            f"target error among accepted (alpha)   {self.alpha:g}",
            f"failure probability (delta)           {self.delta:g}",
            f"calibration items (n)                 {self.n}",
            f"accept threshold                      {'none (accept nothing)' if self.threshold is None else f'{self.threshold:.6g}'}",
            f"coverage (accepted / n)               {self.coverage:.4f} ({self.n_accepted} items)",
            f"errors among accepted                 {self.n_errors} (empirical risk {self.empirical_risk:.4f})",
            f"upper confidence bound on the risk    {self.risk_upper_bound:.4f} (exact, level {1 - self.delta:g})",
            f"p-value at the threshold              {self.p_value:.3g} ({self.p_value_method})",
            f"candidates certified / tested         {self.n_certified} / {self.n_candidates}",
            f"method                                {self.method}",
            "reference                             Angelopoulos et al., Learn then Test, arXiv:2110.01052",
        ]
        for key, value in self.extra.items():
            lines.append(f"{key:<38}{value}")
        return "\n".join(lines) + "\n"


def learn_then_test(
    scores: Any,
    is_error: Any,
    *,
    alpha: float,
    delta: float,
    thresholds: Sequence[float],
    p_value: PValue = "binomial",
) -> RiskCertificate:
    """Choose the lowest threshold whose selective risk is certified <= alpha at level delta.

    ``scores``/``is_error``: the calibration items (confidence of the answer, whether it was
    wrong). ``thresholds``: strictly decreasing candidates fixed before seeing these items
    (see ``threshold_grid``). Accept means ``score >= threshold``.
    """
    _check_targets(alpha, delta)
    scores, is_error = _as_scores_and_errors(scores, is_error)
    grid = np.asarray(thresholds, np.float64)
    if grid.ndim != 1 or len(grid) == 0 or (np.diff(grid) >= 0).any():
        raise InputError("thresholds must be a non-empty, strictly decreasing sequence", field="thresholds")
    _p_value(p_value, 0, 0, alpha)  # validate the name before looping

    # Counts at every threshold at once: sort scores descending, errors cumulatively.
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    cum_errors = np.concatenate([[0], np.cumsum(is_error[order])])
    n_accepted_at = np.searchsorted(-sorted_scores, -grid, side="right")  # count of scores >= t

    p = p_values(p_value, cum_errors[n_accepted_at], n_accepted_at, alpha)
    failed = np.flatnonzero(p > delta)
    # fixed-sequence testing: the first failure ends the sequence
    n_certified = int(failed[0]) if len(failed) else len(grid)

    n = len(scores)
    if n_certified == 0:
        return RiskCertificate(alpha, delta, n, None, 0.0, 0, 0, 0.0, 0.0, 1.0, p_value, len(grid), 0)
    last = n_certified - 1
    threshold, p = float(grid[last]), float(p[last])
    n_acc = int(n_accepted_at[last])
    n_err = int(cum_errors[n_acc])
    return RiskCertificate(
        alpha=alpha,
        delta=delta,
        n=n,
        threshold=threshold,
        coverage=n_acc / n,
        n_accepted=n_acc,
        n_errors=n_err,
        empirical_risk=n_err / n_acc,
        risk_upper_bound=clopper_pearson_upper(n_err, n_acc, delta),
        p_value=p,
        p_value_method=p_value,
        n_candidates=len(grid),
        n_certified=n_certified,
    )


# --------------------------------------------------------------------------- three tiers


class TierCosts(BaseModel):
    """Cost units per item for each tier (from the policy config)."""

    model_config = ConfigDict(extra="forbid")

    cheap: float = Field(1.0, ge=0, description="the ONNX tier; every item pays it")
    escalate: float = Field(10.0, ge=0, description="one call to the stronger tier (the VLM)")
    review: float = Field(100.0, ge=0, description="one human review")


@dataclass(frozen=True)
class TierOutcomes:
    """Per item: the cheap tier's calibrated confidence and whether each tier's answer is wrong.
    A human reviewer is taken to be right; the review cost is what that costs.

    ``strong_score`` (optional): the VLM's calibrated confidence in its answer; NaN where the VLM
    gave no valid answer (such an item always goes to review). With it the plan also certifies
    the VLM's accept threshold; without it every escalated VLM answer counts as accepted."""

    cheap_score: np.ndarray
    cheap_error: np.ndarray
    strong_error: np.ndarray
    strong_score: np.ndarray | None = None

    def __post_init__(self) -> None:
        score, cheap = _as_scores_and_errors(self.cheap_score, self.cheap_error)
        strong = np.asarray(self.strong_error, bool)
        if strong.shape != score.shape:
            raise InputError(
                f"strong_error must have shape {score.shape}, got {strong.shape}", field="strong_error"
            )
        object.__setattr__(self, "cheap_score", score)
        object.__setattr__(self, "cheap_error", cheap)
        object.__setattr__(self, "strong_error", strong)
        if self.strong_score is not None:
            strong_score = np.asarray(self.strong_score, np.float64)
            if strong_score.shape != score.shape:
                raise InputError(
                    f"strong_score must have shape {score.shape}, got {strong_score.shape}",
                    field="strong_score",
                )
            if np.isinf(strong_score).any():
                raise InputError(
                    "strong_score contains infinity (NaN marks an item without a VLM answer)",
                    field="strong_score",
                )
            object.__setattr__(self, "strong_score", strong_score)

    def __len__(self) -> int:
        return len(self.cheap_score)

    @property
    def has_strong_score(self) -> bool:
        return self.strong_score is not None

    def subset(self, rows: np.ndarray) -> TierOutcomes:
        strong_score = None if self.strong_score is None else self.strong_score[rows]
        return TierOutcomes(
            self.cheap_score[rows], self.cheap_error[rows], self.strong_error[rows], strong_score
        )


@dataclass(frozen=True)
class TierPlan:
    """accept the cheap answer when score >= accept_threshold; escalate to the VLM when
    review_threshold <= score < accept_threshold; send to a human below review_threshold.
    An escalated item's VLM answer is accepted when its calibrated confidence is at least
    ``vlm_accept_threshold`` and goes to a human otherwise; ``vlm_accept_threshold`` None (a
    plan made without the VLM's scores) accepts every VLM answer. Infeasible plans review
    everything.

    ``decide`` is the service's rule (``policies.thresholds.decide``) with a VLM available:
    ``review_threshold`` plays the policy's ``escalate_threshold``. ``decide_vlm`` is the
    service's rule after the VLM (``policies.vlm_decision.decide_after_vlm``)."""

    accept_threshold: float
    review_threshold: float
    expected_cost_units: float  # per item, on the test split
    rates: dict[str, float]  # fraction accepted from cheap / escalated / reviewed
    certificate: RiskCertificate
    vlm_accept_threshold: float | None = None  # inf: never accept the VLM's answer
    # with a review-capacity constraint: {"max_review_share", "feasible", "smallest_feasible_review_share"}
    capacity: dict[str, Any] | None = None
    empty_result: ClassVar[str] = "review"  # a plan is over scores; it never sees an empty answer

    @property
    def escalate_threshold(self) -> float:
        return self.review_threshold

    def decide(self, score: float) -> str:
        """The decision ("accept", "escalate" or "review") for the cheap tier's calibrated score."""
        return decide(score, self, vlm_available=True)[0].value

    def decide_vlm(self, strong_score: float | None) -> str:
        """The decision ("accept" or "review") for an escalated item's VLM answer, from the VLM's
        calibrated confidence (None or NaN: no valid answer). The cheap tier's disagreement is
        not part of the plan: a service that certifies with it sets its margin to 1."""
        from policies.vlm_decision import VlmOutcome, VlmPolicy, decide_after_vlm

        if self.vlm_accept_threshold is None:
            return "accept"  # the plan was made without the VLM's scores: every answer counts
        confidence = None if strong_score is None or math.isnan(strong_score) else float(strong_score)
        policy = VlmPolicy("plan", self.vlm_accept_threshold, 1.0)
        return decide_after_vlm(VlmOutcome("answer", confidence), policy)[0].value

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: accept_threshold "inf" means never accept the cheap answer, review_threshold
        "-inf" never send to a human, vlm_accept_threshold "inf" never accept the VLM's answer
        (None: a plan made without the VLM's scores, which accepts every VLM answer)."""
        document = {
            "accept_threshold": self.accept_threshold,
            "review_threshold": self.review_threshold,
            "vlm_accept_threshold": self.vlm_accept_threshold,
            "expected_cost_units": self.expected_cost_units,
            "rates": dict(self.rates),
            "certificate": self.certificate.to_dict(),
        }
        if self.capacity is not None:
            document["capacity"] = dict(self.capacity)
        return _json_safe(document)


def _plan_stats(
    data: TierOutcomes,
    accept_t: np.ndarray,
    review_t: np.ndarray,
    costs: TierCosts,
    vlm_t: np.ndarray | None = None,
):
    """Vectorised over candidates: (n_auto, n_errors, n_escalated, n_reviewed, cost per item).

    The same comparisons as ``TierPlan.decide`` (``policies.thresholds.decide`` with a VLM) and,
    with ``vlm_t``, ``TierPlan.decide_vlm``, over arrays for speed; tests/policies/
    test_decide_agreement.py and test_three_tier_vlm.py hold them equal. ``n_reviewed`` counts every item a
    human sees: those below the review threshold and escalated items whose VLM answer is not
    accepted (they pay for the VLM and the human)."""
    if vlm_t is not None:
        return _plan_stats_with_vlm(data, accept_t, review_t, costs, vlm_t)
    s = data.cheap_score[None, :]
    cheap_ok = s >= accept_t[:, None]
    escalated = (s >= review_t[:, None]) & ~cheap_ok
    reviewed = ~(cheap_ok | escalated)
    n_err = (cheap_ok & data.cheap_error).sum(1) + (escalated & data.strong_error).sum(1)
    n_auto = (cheap_ok | escalated).sum(1)
    cost = costs.cheap + (costs.escalate * escalated.sum(1) + costs.review * reviewed.sum(1)) / len(data)
    return n_auto, n_err, escalated.sum(1), reviewed.sum(1), cost


def _plan_stats_with_vlm(data: TierOutcomes, accept_t, review_t, costs: TierCosts, vlm_t):
    """``_plan_stats`` for triples without a (candidates x items) array per triple: the cheap
    tier's counts per distinct (accept, review) pair, the VLM's per pair and distinct VLM level
    as one matrix product (escalated items x items whose VLM score passes), then gathered."""
    pairs, pair_of = np.unique(np.stack([accept_t, review_t], axis=1), axis=0, return_inverse=True)
    levels, level_of = np.unique(vlm_t, return_inverse=True)
    pair_of, level_of = pair_of.reshape(-1), level_of.reshape(-1)
    s = data.cheap_score[None, :]
    cheap_ok = s >= pairs[:, :1]
    escalated = (s >= pairs[:, 1:]) & ~cheap_ok
    with np.errstate(invalid="ignore"):  # NaN (no VLM answer) >= t is False: review
        passes = (data.strong_score[None, :] >= levels[:, None]).astype(np.float64).T  # items x levels
    # exact: integer counts far below 2**53
    vlm_ok = np.rint(escalated.astype(np.float64) @ passes).astype(np.int64)
    vlm_err = np.rint((escalated & data.strong_error).astype(np.float64) @ passes).astype(np.int64)
    n_cheap, cheap_err = cheap_ok.sum(1), (cheap_ok & data.cheap_error).sum(1)
    n_auto = n_cheap[pair_of] + vlm_ok[pair_of, level_of]
    n_err = cheap_err[pair_of] + vlm_err[pair_of, level_of]
    n_escalated = escalated.sum(1)[pair_of]
    n_reviewed = len(data) - n_auto
    cost = costs.cheap + (costs.escalate * n_escalated + costs.review * n_reviewed) / len(data)
    return n_auto, n_err, n_escalated, n_reviewed, cost


def _candidate_thresholds(fit: TierOutcomes, n_points: int):
    """(accept, review, vlm_accept) candidates from the fit split's quantiles; vlm_accept is None
    without the VLM's scores. ``-inf`` / ``inf`` levels mean always / never."""
    grid = np.unique(np.quantile(fit.cheap_score, np.linspace(0, 1, n_points), method="higher"))
    levels = np.concatenate([[-np.inf], grid, [np.inf]])  # -inf: never review; inf: never accept cheap
    accept_t, review_t = (a.ravel() for a in np.meshgrid(levels, levels, indexing="ij"))
    keep = review_t <= accept_t
    accept_t, review_t = accept_t[keep], review_t[keep]
    if not fit.has_strong_score:
        return accept_t, review_t, None
    answered = fit.strong_score[~np.isnan(fit.strong_score)]
    vlm_grid = (
        np.unique(np.quantile(answered, np.linspace(0, 1, n_points), method="higher"))
        if len(answered)
        else np.array([])
    )
    vlm_levels = np.concatenate([[-np.inf], vlm_grid, [np.inf]])  # -inf: every answer; inf: none
    pair = np.repeat(np.arange(len(accept_t)), len(vlm_levels))
    return accept_t[pair], review_t[pair], np.tile(vlm_levels, len(accept_t))


def _pareto_order(risk: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Indices on the risk-cost Pareto front, safest (lowest risk) first."""
    order = np.lexsort((risk, cost))  # by cost, ties by risk
    front, best_risk = [], np.inf
    for i in order:
        if risk[i] < best_risk:
            front.append(i)
            best_risk = risk[i]
    return np.array(front[::-1], dtype=np.int64)  # cheapest front point has the highest risk


def choose_tier_thresholds(
    fit: TierOutcomes,
    test: TierOutcomes,
    *,
    costs: TierCosts,
    alpha: float,
    delta: float,
    n_points: int = 40,
    p_value: PValue = "binomial",
    max_review_share: float | None = None,
) -> TierPlan:
    """Escalate and review thresholds (and, when ``fit`` and ``test`` carry the VLM's calibrated
    scores, the VLM's accept threshold) of least expected cost whose auto-accepted error is
    certified <= alpha at level delta (Pareto Testing over LTT; see the module docstring).

    ``fit`` orders the candidates (independent of ``test``, e.g. the calibrator's fit split);
    ``test`` carries the p-values.

    ``max_review_share`` (h, optional): the review capacity. Of the certified candidates only
    those that send at most h of the certification items to a human are eligible (the
    certificate is untouched: every candidate certified by the fixed sequence is valid at once,
    so choosing among them by any rule keeps the guarantee). When none is, the plan is infeasible
    for h: it reviews everything and ``plan.capacity`` gives the smallest h that works (the least
    review share of any certified candidate; 1.0 when none is certified). Review shares are
    measured on the certification items, as the plan's ``rates`` are.
    """
    _check_targets(alpha, delta)
    if max_review_share is not None and not 0.0 <= max_review_share <= 1.0:
        raise InputError(
            f"max_review_share must be in [0, 1], got {max_review_share}", field="max_review_share"
        )
    if fit.has_strong_score != test.has_strong_score:
        raise InputError(
            "fit and test must both carry strong_score (the VLM's calibrated confidence) or neither",
            field="strong_score",
        )
    accept_t, review_t, vlm_t = _candidate_thresholds(fit, n_points)

    n_auto, n_err, _, _, fit_cost = _plan_stats(fit, accept_t, review_t, costs, vlm_t)
    # Candidates that would accept too few test items can never be certified; drop them so
    # they do not end the sequence (decided from fit only, so the order stays independent).
    expected_test_auto = n_auto / len(fit) * len(test)
    usable = expected_test_auto >= min_items_to_certify(alpha, delta)
    fit_risk = np.where(n_auto > 0, n_err / np.maximum(n_auto, 1), 0.0)
    candidates = np.flatnonzero(usable)[_pareto_order(fit_risk[usable], fit_cost[usable])]

    t_vlm = None if vlm_t is None else vlm_t[candidates]
    t_auto, t_err, t_esc, t_rev, t_cost = _plan_stats(
        test, accept_t[candidates], review_t[candidates], costs, t_vlm
    )
    p = p_values(p_value, t_err, t_auto, alpha)
    failed = np.flatnonzero(p > delta)
    n_certified = int(failed[0]) if len(failed) else len(candidates)  # fixed sequence: stop at a failure
    certified = [(k, float(p[k])) for k in range(n_certified)]

    n = len(test)
    capacity = None
    if max_review_share is not None:
        review_share = t_rev / n
        smallest = min([float(review_share[k]) for k, _ in certified] + [1.0])
        certified = [(k, p_k) for k, p_k in certified if review_share[k] <= max_review_share]
        capacity = {
            "max_review_share": float(max_review_share),
            "feasible": bool(certified) or max_review_share >= 1.0,
            "smallest_feasible_review_share": smallest,
        }
    method = "pareto testing over learn-then-test, fixed-sequence"
    if not certified:
        cert = RiskCertificate(
            alpha, delta, n, None, 0.0, 0, 0, 0.0, 0.0, 1.0, p_value, len(candidates), 0, method=method
        )
        never_vlm = np.inf if vlm_t is not None else None
        return TierPlan(
            np.inf,
            np.inf,
            costs.cheap + costs.review,
            {"accept": 0.0, "escalate": 0.0, "review": 1.0},
            cert,
            never_vlm,
            capacity,
        )
    k, p_k = min(certified, key=lambda kp: (t_cost[kp[0]], kp[0]))
    index = candidates[k]
    vlm_accept = None if vlm_t is None else float(vlm_t[index])
    extra = {"accept_threshold": float(accept_t[index]), "review_threshold": float(review_t[index])}
    score = "cheap tier's calibrated confidence (accepted by the cheap tier or the VLM)"
    if vlm_accept is not None:
        extra["vlm_accept_threshold"] = vlm_accept
        score = (
            "cheap tier's calibrated confidence (accepted by the cheap tier, or by the VLM when its "
            "calibrated confidence >= vlm_accept_threshold)"
        )
    cert = RiskCertificate(
        alpha=alpha,
        delta=delta,
        n=n,
        threshold=float(review_t[index]),  # below it nothing is accepted automatically
        coverage=int(t_auto[k]) / n,
        n_accepted=int(t_auto[k]),
        n_errors=int(t_err[k]),
        empirical_risk=int(t_err[k]) / int(t_auto[k]),
        risk_upper_bound=clopper_pearson_upper(int(t_err[k]), int(t_auto[k]), delta),
        p_value=p_k,
        p_value_method=p_value,
        n_candidates=len(candidates),
        n_certified=len(certified),
        method=method,
        score=score,
        extra=extra,
    )
    n_cheap = int((test.cheap_score >= accept_t[index]).sum())
    rates = {
        "accept": n_cheap / n,  # the cheap tier's answer accepted
        "escalate": float(t_esc[k] / n),
        "review": float(t_rev[k] / n),  # every item a human sees
    }
    if vlm_accept is not None:
        # accept + vlm_accept + review = 1; escalate = vlm_accept + the escalated items reviewed
        rates["vlm_accept"] = float((t_auto[k] - n_cheap) / n)
    return TierPlan(
        float(accept_t[index]), float(review_t[index]), float(t_cost[k]), rates, cert, vlm_accept, capacity
    )
