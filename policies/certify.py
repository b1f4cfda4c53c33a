"""``certify(scores, is_error, alpha=, delta=)``: a certified accept threshold from few labels.

The promise is Learn then Test's (``policies.risk_control``; Angelopoulos, Bates, Candes,
Jordan and Lei, "Learn then Test: Calibrating Predictive Algorithms to Achieve Risk Control",
arXiv:2110.01052, 2021): with probability at least 1 - delta over the draw of the labelled
items, the error among the items the threshold accepts is at most alpha. It holds whatever is
chosen below, because everything that shapes the test (the candidate thresholds, their order,
where the sequence starts) is fixed on fit items the test never sees (LTT, section 4). What this
module changes is power: how often a labelled set certifies a threshold at all, and how much
that threshold accepts. Three choices, each measured by ``visionroute bench calibration``:

1. A small fit share. The fit items only place the grid and choose where it starts (and, for a
   caller that calibrates, fit a one- or two-parameter calibrator, which needs few items):
   10% of the items, at least 20 and at most 200, instead of half. Every item moved to the test
   makes the binomial test sharper.
2. A start chosen for power. Fixed-sequence testing ends at its first failure, so a start where
   the test is unlikely to pass wastes the whole level. The previous grid started where the
   test would hold twice the fewest items that can certify alpha, whatever the error rate
   there. Here a logistic model of P(error | score) fitted on the fit share (Platt 1999) predicts,
   for each candidate start, the probability that the exact binomial test passes there with the
   test's size, and the sequence starts where that probability times the square root of the
   start's coverage is highest (a pass there buys at least that coverage). The start is kept between 1.5
   and max(2, sqrt(n_fit) / 2) times those fewest items: a model fitted on a few dozen items is
   trusted only that far.
3. One sequence at the full level delta. Splitting delta between several starts (Bonferroni
   across starts) hedges a badly placed start but raises the bar of every test; on the
   simulated distributions it certified less often at n <= 1000, so it is not the default
   (``n_starts`` keeps it available and the benchmark prints it).

``plan_labels`` answers the question before labelling: resampling a pilot set as if it were the
population, how many labelled items make ``certify`` succeed with a target probability.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policies.risk_control import (
    P_VALUES,
    RiskCertificate,
    _json_safe,
    learn_then_test,
    min_items_to_certify,
    threshold_grid,
)
from visionroute.errors import InputError

FIT_FRACTION = 0.1
MIN_FIT = 20
MAX_FIT = 200
GRID_POINTS = 100
# The start maximises P(pass) * coverage**START_TILT: a pass at the start buys at least its
# coverage, so a little of the chance to certify is traded for coverage (0.5 measured best of
# 0, 0.5 and 1 on the simulated mixtures: more certified and more coverage than 0).
START_TILT = 0.5
START_FLOOR = 1.5  # the start holds at least this many times the fewest items that can certify
METHOD = "learn-then-test, fixed-sequence from the start of highest predicted power"


class CertifyInputError(InputError, ValueError):
    """Bad input to ``certify`` / ``plan_labels``: a ValueError (for library callers) that the
    CLI reports like any other ``InputError`` (the field and the reason)."""


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class Certification:
    """What ``certify`` proved and how: the threshold (None: accept nothing), the statement,
    how the items were used and the bound."""

    certificate: RiskCertificate  # on the test share
    n_fit: int
    n_test: int
    start_threshold: float  # the first candidate tested
    method: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def threshold(self) -> float | None:
        return self.certificate.threshold

    @property
    def is_feasible(self) -> bool:
        return self.certificate.is_feasible

    @property
    def alpha(self) -> float:
        return self.certificate.alpha

    @property
    def delta(self) -> float:
        return self.certificate.delta

    @property
    def risk_upper_bound(self) -> float:
        """Exact (1 - delta) upper confidence bound on the error among accepted (1.0 if none)."""
        return self.certificate.risk_upper_bound if self.is_feasible else 1.0

    @property
    def coverage(self) -> float:
        """Share of the test items the threshold accepts."""
        return self.certificate.coverage

    def accepts(self, score: float) -> bool:
        return self.certificate.accepts(score)

    def statement(self) -> str:
        return (
            f"{self.certificate.statement()} "
            f"({self.n_fit} items placed the candidate thresholds, {self.n_test} tested them; {self.method}.)"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, like ``RiskCertificate.to_dict`` (an infinite threshold is "inf"/"-inf")."""
        return _json_safe(
            {
                **self.certificate.to_dict(),
                "statement": self.statement(),
                "n_fit": self.n_fit,
                "n_test": self.n_test,
                "start_threshold": self.start_threshold,
                "method": self.method,
                **self.extra,
            }
        )


# --------------------------------------------------------------------------- input checks


def _fail(name: str, reason: str) -> CertifyInputError:
    error = CertifyInputError(f"{name}: {reason}", field=name)
    error.reason = reason  # the CLI prints "error (<field>): <reason>"
    return error


def _check_targets(alpha: float, delta: float) -> None:
    for name, value in (("alpha", alpha), ("delta", delta)):
        if not isinstance(value, (int, float, np.floating)) or not 0 < float(value) < 1:
            raise _fail(name, f"must be a number in (0, 1), got {value!r}")


def _check_items(scores: Any, is_error: Any, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    score_name, error_name = names
    try:
        scores = np.asarray(scores, np.float64)
    except (TypeError, ValueError) as exc:
        raise _fail(score_name, f"must be numbers ({exc})") from None
    raw = np.asarray(is_error)
    if scores.ndim != 1:
        raise _fail(score_name, f"must be 1-d, got shape {scores.shape}")
    if raw.ndim != 1:
        raise _fail(error_name, f"must be 1-d, got shape {raw.shape}")
    if len(scores) != len(raw):
        raise _fail(error_name, f"has {len(raw)} items but {score_name} has {len(scores)}; they must match")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise _fail(
            score_name, f"{int(bad.sum())} values are NaN or infinite (first at index {int(np.argmax(bad))})"
        )
    if raw.dtype != bool:
        try:
            numeric = raw.astype(np.float64)
        except (TypeError, ValueError):
            raise _fail(error_name, f"must be booleans or 0/1, got dtype {raw.dtype}") from None
        if not np.isin(numeric, (0.0, 1.0)).all():
            raise _fail(
                error_name, "must be booleans or 0/1 (NaN and other values are not errors or successes)"
            )
    return scores, raw.astype(bool)


def fit_share_size(n: int) -> int:
    """Items kept out of the test to place the grid and choose its start: 10%, within [20, 200]."""
    return int(min(MAX_FIT, max(MIN_FIT, round(FIT_FRACTION * n))))


def min_labelled_items(alpha: float, delta: float) -> int:
    """The fewest items ``certify`` accepts: the fit share plus the fewest test items that can
    certify alpha at all (when every one of them is right)."""
    return MIN_FIT + min_items_to_certify(alpha, delta)


# --------------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Splits:
    """Disjoint rows of one labelled set: fit (choose the candidates), certify (test them), test
    (held out: what the certificate's promise is measured on)."""

    fit: np.ndarray
    certify: np.ndarray
    test: np.ndarray


def split_indices(
    n: int, *, seed: int, calibration_fraction: float = 0.5, fit_fraction: float = 0.5
) -> Splits:
    """Random disjoint fit / certify / test rows."""
    order = np.random.default_rng(seed).permutation(n)
    n_cal = int(round(calibration_fraction * n))
    n_fit = int(round(fit_fraction * n_cal))
    return Splits(order[:n_fit], order[n_fit:n_cal], order[n_cal:])


# --------------------------------------------------------------------------- the start


def predicted_error(fit_scores: np.ndarray, fit_is_error: np.ndarray) -> np.ndarray:
    """P(error | score) at each fit score: logistic regression on the score (on its logit for
    confidences in [0, 1]; Platt 1999), or the smoothed error rate when the fit share holds
    only one outcome."""
    n_errors = int(fit_is_error.sum())
    if n_errors in (0, len(fit_is_error)):
        return np.full(len(fit_scores), (n_errors + 0.5) / (len(fit_is_error) + 1.0))
    from sklearn.linear_model import LogisticRegression  # fitting time only

    if ((fit_scores >= 0) & (fit_scores <= 1)).all():  # confidences: Platt's feature, the logit
        clipped = np.clip(fit_scores, 1e-6, 1 - 1e-6)
        feature = np.log(clipped) - np.log1p(-clipped)
    else:
        feature = (fit_scores - fit_scores.mean()) / (fit_scores.std() or 1.0)
    # liblinear: ~1 ms on a few dozen rows (lbfgs spins BLAS threads); a large intercept_scaling
    # leaves the intercept practically unpenalised, as in lbfgs
    model = LogisticRegression(C=1.0, solver="liblinear", intercept_scaling=10.0)
    model.fit(feature[:, None], fit_is_error)
    return model.predict_proba(feature[:, None])[:, 1]


def critical_errors(n: np.ndarray, alpha: float, level: float) -> np.ndarray:
    """The most errors among n accepted items that still pass the binomial test (-1: none)."""
    from scipy import stats

    k = stats.binom.ppf(level, n, alpha)
    k = np.where(stats.binom.cdf(k, n, alpha) <= level, k, k - 1)
    return np.where(n > 0, k, -1)


def choose_start(
    fit_scores: np.ndarray, fit_is_error: np.ndarray, *, n_test: int, alpha: float, level: float
) -> float:
    """The coverage (share of the fit scores) where the sequence starts: where the chance that
    the binomial test on ``n_test`` items passes (by the risk model fitted on the fit share),
    times the square root of the coverage, is highest; clamped as the module docstring says."""
    from scipy import stats

    fewest = min_items_to_certify(alpha, level)
    coverages = np.linspace(0.01, 1.0, 100)
    order = np.argsort(-fit_scores, kind="stable")
    cum_risk = np.cumsum(predicted_error(fit_scores, fit_is_error)[order])
    n_top = np.maximum(1, np.round(coverages * len(fit_scores)).astype(np.int64))
    risk = cum_risk[n_top - 1] / n_top  # predicted error among the top share
    n_accepted = np.round(coverages * n_test).astype(np.int64)
    k = critical_errors(n_accepted, alpha, level)
    power = np.where(k >= 0, stats.binom.cdf(np.maximum(k, 0), n_accepted, risk), 0.0)
    best = float(coverages[int(np.argmax(power * coverages**START_TILT))])
    cap = max(2.0, math.sqrt(len(fit_scores)) / 2.0)
    low, high = START_FLOOR * fewest / n_test, cap * fewest / n_test
    return float(min(1.0, max(low, min(best, high))))


def start_grid(fit_scores: np.ndarray, start_coverage: float, n_points: int = GRID_POINTS) -> np.ndarray:
    """Decreasing thresholds through the fit scores' quantiles from ``start_coverage`` to all of
    them (interpolated, so a small fit share still gives a fine grid), then -inf: accept every
    item, reached only when everything above it is certified. A start at full coverage (a test
    share too small for anything less) tests accepting every item alone."""
    if start_coverage >= 1.0:
        return np.array([-np.inf])
    coverages = np.linspace(start_coverage, 1.0, n_points)
    thresholds = np.quantile(fit_scores, 1.0 - coverages, method="linear")
    return np.r_[np.unique(thresholds)[::-1], -np.inf]


# --------------------------------------------------------------------------- certify


def certify_split(
    fit_scores: Any,
    fit_is_error: Any,
    scores: Any,
    is_error: Any,
    *,
    alpha: float,
    delta: float,
    p_value: str = "binomial",
    n_starts: int = 1,
    score_name: str = "score",
) -> Certification:
    """``certify`` when the caller has already split: ``fit_*`` (e.g. the items a calibrator
    was fitted on) choose the grid and its start, ``scores``/``is_error`` are tested.

    ``n_starts > 1``: that many fixed sequences, each at level delta / n_starts (Bonferroni
    across starts), from starts spread by factors of 2 around the chosen one; the lowest
    threshold any of them certifies is returned.
    """
    _check_targets(alpha, delta)
    if p_value not in P_VALUES:
        raise _fail("p_value", f"unknown p-value {p_value!r}; expected one of {list(P_VALUES)}")
    if not isinstance(n_starts, (int, np.integer)) or n_starts < 1:
        raise _fail("n_starts", f"must be a positive integer, got {n_starts!r}")
    fit_scores, fit_is_error = _check_items(fit_scores, fit_is_error, ("fit_scores", "fit_is_error"))
    scores, is_error = _check_items(scores, is_error, ("scores", "is_error"))
    if len(fit_scores) < 2:
        raise _fail("fit_scores", f"needs at least 2 items to place a grid, got {len(fit_scores)}")
    if len(scores) == 0:
        raise _fail("scores", "no items to test")
    result = _certify_split(fit_scores, fit_is_error, scores, is_error, alpha, delta, p_value, n_starts)
    if score_name != result.certificate.score:
        result = dataclasses.replace(
            result, certificate=dataclasses.replace(result.certificate, score=score_name)
        )
    return result


def _certify_split(fit_scores, fit_is_error, scores, is_error, alpha, delta, p_value, n_starts):
    level = delta / n_starts
    start = choose_start(fit_scores, fit_is_error, n_test=len(scores), alpha=alpha, level=level)
    spread = 2.0 ** (np.arange(n_starts) - (n_starts - 1) / 2)
    starts = sorted({float(min(1.0, start * factor)) for factor in spread})
    best: RiskCertificate | None = None
    first_threshold = math.nan
    for coverage in starts:
        grid = start_grid(fit_scores, coverage)
        if math.isnan(first_threshold):
            first_threshold = float(grid[0])
        cert = learn_then_test(scores, is_error, alpha=alpha, delta=level, thresholds=grid, p_value=p_value)
        if best is None or (cert.is_feasible and (not best.is_feasible or cert.threshold < best.threshold)):
            best = cert
    assert best is not None
    method = METHOD if n_starts == 1 else f"{METHOD}; {len(starts)} starts, Bonferroni across starts"
    # The statement speaks of the level the user asked for, not of each start's share of it.
    best = dataclasses.replace(best, delta=delta, method=method, score="score")
    return Certification(best, len(fit_scores), len(scores), first_threshold, method)


def certify(
    scores: Any,
    is_error: Any,
    *,
    alpha: float,
    delta: float,
    seed: int = 0,
    p_value: str = "binomial",
    n_starts: int = 1,
    score_name: str = "score",
) -> Certification:
    """The lowest accept threshold (accept when ``score >= threshold``) certified to keep the
    error among accepted items at or below ``alpha`` with probability at least 1 - ``delta``.

    ``scores``: any 1-d scores where higher means surer (calibrated or not: a monotone
    calibration accepts the same items; ``score_name`` names them in the statement).
    ``is_error``: whether each answer was wrong.
    The items are split at random (``seed``) into a small fit share and the test share; see
    the module docstring for the choices. Raises ``ValueError`` (``CertifyInputError``) naming
    the argument on bad input or too few items.
    """
    _check_targets(alpha, delta)
    scores, is_error = _check_items(scores, is_error, ("scores", "is_error"))
    fewest = min_labelled_items(alpha, delta)
    if len(scores) < fewest:
        raise _fail(
            "scores",
            f"{len(scores)} labelled items cannot certify alpha={alpha:g} at delta={delta:g}: at least "
            f"{fewest} are needed ({MIN_FIT} to place the grid and {fewest - MIN_FIT} accepted with no error)",
        )
    n_fit = fit_share_size(len(scores))
    order = np.random.default_rng(seed).permutation(len(scores))
    fit, test = order[:n_fit], order[n_fit:]
    result = certify_split(
        scores[fit],
        is_error[fit],
        scores[test],
        is_error[test],
        alpha=alpha,
        delta=delta,
        p_value=p_value,
        n_starts=n_starts,
        score_name=score_name,
    )
    return Certification(
        result.certificate, result.n_fit, result.n_test, result.start_threshold, result.method, {"seed": seed}
    )


PREVIOUS_METHOD = "learn-then-test on two halves (previous procedure)"


def certify_split_previous(
    fit_scores: Any, scores: Any, is_error: Any, *, alpha: float, delta: float, p_value: str = "binomial"
) -> Certification:
    """The previous procedure's test, kept as the baseline the benchmark and the plan compare
    against: the grid starts where the test would hold twice the fewest items that can certify
    (``threshold_grid``), whatever the error rate there."""
    grid = threshold_grid(fit_scores, n_test=len(scores), alpha=alpha, delta=delta)
    cert = learn_then_test(scores, is_error, alpha=alpha, delta=delta, thresholds=grid, p_value=p_value)
    return Certification(cert, len(fit_scores), len(scores), float(grid[0]), PREVIOUS_METHOD)


def certify_two_halves(
    scores: Any, is_error: Any, *, alpha: float, delta: float, seed: int = 0, p_value: str = "binomial"
) -> Certification:
    """The previous procedure end to end: half of the items place the grid, the other half is
    tested (``certify_split_previous``)."""
    _check_targets(alpha, delta)
    scores, is_error = _check_items(scores, is_error, ("scores", "is_error"))
    if len(scores) < 2:
        raise _fail("scores", f"needs at least 2 items, got {len(scores)}")
    order = np.random.default_rng(seed).permutation(len(scores))
    fit, test = order[: len(scores) // 2], order[len(scores) // 2 :]
    return certify_split_previous(
        scores[fit], scores[test], is_error[test], alpha=alpha, delta=delta, p_value=p_value
    )


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class LabelPlan:
    """How many labelled items a target needs, estimated by resampling a pilot set."""

    alpha: float
    delta: float
    probability: float  # the target probability of a certificate
    pilot_items: int
    pilot_error_rate: float
    best_pilot_coverage: float  # largest share of the pilot whose error is <= alpha (0: none)
    sizes: list[int]
    certified_share: list[float]  # per size: share of resamples certified (monotone-smoothed)
    mean_coverage: list[float]  # per size: mean pilot share accepted by the certified threshold
    needed: int | None  # the smallest size reaching ``probability``; None: not within the sizes
    reps: int
    reachable: bool  # False: the pilot's error rate makes alpha unreachable at any size
    message: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def best_coverage(scores: Any, is_error: Any, alpha: float, *, min_accepted: int = 1) -> float:
    """The largest share of the items that one threshold accepts with error <= alpha among them
    (the lowest such threshold), over thresholds accepting at least ``min_accepted`` items; 0.0
    when there is none. On a population this is the best any certificate can reach."""
    scores, is_error = _check_items(scores, is_error, ("scores", "is_error"))
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    cum_errors = np.cumsum(is_error[order])
    # a threshold accepts every tied score: only the last of each run of ties is a possible cut
    cut = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    k = np.arange(1, len(scores) + 1)
    ok = cut & (k >= min(min_accepted, len(scores))) & (cum_errors <= alpha * k)
    return float(k[ok].max() / len(scores)) if ok.any() else 0.0


def plan_labels(
    scores: Any,
    is_error: Any,
    *,
    alpha: float,
    delta: float,
    probability: float = 0.8,
    reps: int = 100,
    max_items: int = 20_000,
    seed: int = 0,
    p_value: str = "binomial",
    procedure: Callable[..., Certification] = certify,
) -> LabelPlan:
    """The fewest labelled items with which ``procedure`` (``certify``) certifies alpha at delta
    with at least ``probability``, if the pilot (``scores``, ``is_error``) is representative.

    Each size is tried ``reps`` times on items drawn with replacement from the pilot (the pilot
    as the population), on a geometric ladder of sizes (x1.25) from the fewest that can certify
    to ``max_items``; the certified shares are made monotone in the size (isotonic regression)
    before the first size reaching ``probability`` is read off.
    """
    _check_targets(alpha, delta)
    scores, is_error = _check_items(scores, is_error, ("scores", "is_error"))
    if not 0 < probability < 1:
        raise _fail("probability", f"must be in (0, 1), got {probability!r}")
    if reps < 10:
        raise _fail("reps", f"must be at least 10 for a share to mean anything, got {reps}")
    if len(scores) < 20:
        raise _fail("scores", f"a pilot needs at least 20 labelled items, got {len(scores)}")
    fewest = min_labelled_items(alpha, delta)
    if max_items < fewest:
        raise _fail(
            "max_items", f"must be at least {fewest}, the fewest items that can certify, got {max_items}"
        )

    error_rate = float(is_error.mean())
    # one lucky item proves nothing: count thresholds that accept at least 5 pilot items
    best = best_coverage(scores, is_error, alpha, min_accepted=5)
    common = dict(alpha=alpha, delta=delta, probability=probability, pilot_items=len(scores))
    common |= dict(pilot_error_rate=error_rate, best_pilot_coverage=best, reps=reps)
    if best == 0.0:
        message = (
            f"UNREACHABLE: the pilot's error rate is {error_rate:.1%}, and no threshold keeps the error "
            f"among its accepted pilot items at or below alpha={alpha:g}; more labels cannot certify "
            "this target with this model. Raise alpha or improve the model."
        )
        return LabelPlan(
            **common,
            sizes=[],
            certified_share=[],
            mean_coverage=[],
            needed=None,
            reachable=False,
            message=message,
        )

    sizes, shares, coverages = [], [], []
    rng = np.random.default_rng(seed)
    size = fewest
    while True:
        certified, covered = 0, []
        for rep in range(reps):
            draw = rng.integers(0, len(scores), size)
            result = procedure(
                scores[draw], is_error[draw], alpha=alpha, delta=delta, seed=rep, p_value=p_value
            )
            if result.is_feasible:
                certified += 1
                covered.append(float((scores >= result.threshold).mean()))
        sizes.append(size)
        shares.append(certified / reps)
        coverages.append(float(np.mean(covered)) if covered else 0.0)
        # stop after two sizes in a row at the target (one could be luck), or at the limit
        if (len(shares) >= 2 and min(shares[-2:]) >= probability) or size >= max_items:
            break
        size = min(max_items, max(size + 1, int(math.ceil(size * 1.25))))

    from sklearn.isotonic import IsotonicRegression

    smooth = IsotonicRegression(y_min=0.0, y_max=1.0).fit_transform(np.arange(len(shares)), shares)
    reached = np.flatnonzero(smooth >= probability)
    needed = int(sizes[reached[0]]) if len(reached) else None
    name = getattr(procedure, "__name__", "the procedure")
    if needed is None:
        message = (
            f"NOT WITHIN {max_items} ITEMS: with {max_items} labelled items {name}() certifies "
            f"alpha={alpha:g} at delta={delta:g} in {shares[-1]:.0%} of resamples (target {probability:.0%}). "
            f"The pilot's best coverage at alpha is only {best:.1%}: raise alpha or improve the model."
        )
    else:
        message = (
            f"About {needed} labelled items certify alpha={alpha:g} at delta={delta:g} with "
            f"{probability:.0%} probability using {name}() (pilot of {len(scores)} items as the population; "
            f"expected coverage then {coverages[reached[0]]:.1%} of items, best possible {best:.1%})."
        )
    return LabelPlan(
        **common,
        sizes=sizes,
        certified_share=[float(s) for s in smooth],
        mean_coverage=coverages,
        needed=needed,
        reachable=True,
        message=message,
    )
