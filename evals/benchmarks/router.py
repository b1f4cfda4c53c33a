"""``visionroute bench router``: what the certificate costs with a learned router score against
the cheap tier's confidence, as distributions over resampled fit/certification draws (issue 22).

The task is the digits (scikit-learn's 1,797), with tiers trained here per seed
(``cascades.digits``: the cheap tier is the linear model on 4x4-pooled pixels that ships as
``digits_cheap``; the second tier is the digits CNN, ``strong``). **The second tier stands in for
the VLM**: its answers and calibrated-or-not top-1 confidences take the VLM's place in the
three-tier plan, priced as a VLM call. (The LLaVA tier needs the vLLM venv and a server; there is
no recorded-answers path yet, so ``bench cascade`` remains the through-the-service figure.)

Per training seed, the 1,079 digits the tiers never saw form the population. Each draw splits
it at random into a fit share (270), a certification share (270) and the rest (539), the sizes
of the digits example. On each draw:

- **confidence-certified** (today): ``choose_tier_thresholds`` on the cheap tier's top-1
  probability (fit share orders the candidates, certification share tests them);
- **learned-certified**: the router (``cascades.learned_router.fit_router``: logistic score on
  output, input and neighbour features; the reference index is the fit share, embedded as the
  cheap tier's 64 input pixels) is fitted on the fit share only; the fit share's out-of-fold
  scores order the candidates; the certification share (never seen by the learner or the index)
  tests them. Its cheap price includes the features' measured cost (below);
- **learned, features free**: the same plans with the features' cost left out (to show what
  the pricing of the features below does to the figure);
- **certified oracle**: a perfect cheap ranking (every right answer above every wrong one, ties
  broken at random) through the same certificate with the same items;
- **alpha-oracle**: knows every answer, needs no certificate: the cheapest routing of the rest
  whose accepted error is <= alpha (accept wrong cheap answers where the VLM is wrong too, then
  where it is right, while the budget alpha * accepted lasts);
- **zero-error oracle** (``bench cascade``'s oracle router): the cheap answer when right, else
  the VLM's when right, else a human (without a VLM call).

Each plan is applied to the rest: cost per 1000 at the certificate's prices (cheap 1, VLM 10,
review 100), accepted error, tier shares, and violation (accepted error on the rest > alpha;
the promise is that this happens in at most delta of the draws, up to the rest's own sampling
noise). The features: the cheap tier's output (top-3, margin, entropy) and 10 neighbours in the
reference index; the shift guard's input statistics are left out by default (``--input-features``
adds them): on the digits they cost 85 us per request (cv2 on the upload) and did not lower the
learned router's cost (30 draws, seed 0: 2,707 with them, 2,633 without, features unpriced),
while the neighbours carry the signal (output only: 5,972). The figure is the median and IQR over draws and seeds; the baseline ratio is the
learned row's median cost over the certified oracle's (target <= 1.5x; the confidence router's
was ~2.3x in issue 22's measurement).

Feature cost: per request, the output features, the shift guard's input statistics of the
uploaded image (28x28 RGB), the k-NN lookup and the logistic score, timed one request at a time
(median, microseconds), beside the cheap stage the service runs (``OnnxStage.predict`` on one
uploaded image) in the same run. The features are priced at the cheap tier's rate:
``feature_units = cheap_units * feature_us / cheap_stage_us``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionroute import paths

log = logging.getLogger(__name__)

METHODS = (
    "confidence-certified",
    "learned-certified",
    "learned, features free",
    "certified oracle",
    "alpha-oracle",
    "zero-error oracle",
)
N_FIT, N_CERT = 270, 270
EMBEDDING = "cheap tier input pixels (8x8 digits), L2-normalised"


def default_work_dir() -> Path:
    return paths.data_dir() / "bench-router"


# --------------------------------------------------------------------------- the population


@dataclass(frozen=True)
class Population:
    """Per item of the population (the digits the tiers never saw), both tiers' outputs."""

    seed: int
    labels: np.ndarray  # (n,)
    cheap_probabilities: np.ndarray  # (n, 10)
    strong_probabilities: np.ndarray  # (n, 10)
    input_statistics: np.ndarray  # (n, 5) of the rendered upload
    embeddings: np.ndarray  # (n, 64)
    pool_index: np.ndarray  # row in load_digits()

    @property
    def cheap_answer(self) -> np.ndarray:
        return self.cheap_probabilities.argmax(1)

    @property
    def strong_answer(self) -> np.ndarray:
        return self.strong_probabilities.argmax(1)

    @property
    def cheap_score(self) -> np.ndarray:
        return self.cheap_probabilities.max(1)

    @property
    def strong_score(self) -> np.ndarray:
        return self.strong_probabilities.max(1)


def digits_population(seed: int, work_dir: Path) -> Population:
    from scipy.special import softmax

    from cascades.digits import load_split, prepare_tiers, tier_logits
    from cascades.router_features import input_features
    from examples.digits import rendered

    split = load_split(seed)
    tiers = prepare_tiers(work_dir / "models", seed=seed)
    logits = tier_logits(tiers, split.images_pool)
    return Population(
        seed,
        split.labels_pool,
        softmax(logits["cheap"].astype(np.float64), axis=1),
        softmax(logits["strong"].astype(np.float64), axis=1),
        input_features(rendered(split.images_pool)),
        split.images_pool.reshape(len(split.labels_pool), -1),
        split.pool_index,
    )


# --------------------------------------------------------------------------- one draw


@dataclass(frozen=True)
class Outcome:
    cost_per_1000: float
    accepted_error: float  # NaN when nothing is accepted
    violation: bool
    shares: dict[str, float]  # cheap / vlm / human: who answered


def apply_plan(
    plan, score, strong_score, cheap_error, strong_error, *, alpha: float, cheap_price: float, prices
) -> Outcome:
    """The plan's decisions on items it was not certified on, as ``TierPlan.decide`` makes them."""
    cheap_ok = score >= plan.accept_threshold
    escalated = (score >= plan.review_threshold) & ~cheap_ok
    vlm_t = -np.inf if plan.vlm_accept_threshold is None else plan.vlm_accept_threshold
    vlm_ok = escalated & (strong_score >= vlm_t)
    reviewed = ~(cheap_ok | vlm_ok)
    n = len(score)
    n_auto = int((cheap_ok | vlm_ok).sum())
    n_err = int((cheap_ok & cheap_error).sum() + (vlm_ok & strong_error).sum())
    error = n_err / n_auto if n_auto else math.nan
    cost = cheap_price + (prices.escalate * escalated.sum() + prices.review * reviewed.sum()) / n
    shares = {"cheap": cheap_ok.mean(), "vlm": vlm_ok.mean(), "human": reviewed.mean()}
    return Outcome(
        1000 * cost, error, bool(n_auto and error > alpha), {k: float(v) for k, v in shares.items()}
    )


def alpha_oracle(cheap_error, strong_error, *, alpha: float, prices) -> Outcome:
    right = ~cheap_error
    vlm_only = cheap_error & ~strong_error
    both = cheap_error & strong_error
    n, n0 = len(right), int(right.sum() + vlm_only.sum())
    b = min(
        int(both.sum()), math.floor(alpha * n0 / (1 - alpha) + 1e-9)
    )  # wrong answers where a human was due
    w = min(
        int(vlm_only.sum()), max(0, math.floor(alpha * (n0 + b) + 1e-9) - b)
    )  # then where the VLM was due
    n_vlm, n_human = int(vlm_only.sum()) - w, int(both.sum()) - b
    cost = prices.cheap + (prices.escalate * n_vlm + prices.review * n_human) / n
    n_auto = n - n_human
    error = (b + w) / n_auto if n_auto else math.nan
    shares = {"cheap": (right.sum() + b + w) / n, "vlm": n_vlm / n, "human": n_human / n}
    return Outcome(1000 * cost, error, False, {k: float(v) for k, v in shares.items()})


def zero_error_oracle(cheap_error, strong_error, *, prices) -> Outcome:
    vlm = cheap_error & ~strong_error
    human = cheap_error & strong_error
    n = len(vlm)
    cost = prices.cheap + (prices.escalate * vlm.sum() + prices.review * human.sum()) / n
    shares = {"cheap": float((~cheap_error).mean()), "vlm": float(vlm.mean()), "human": float(human.mean())}
    return Outcome(1000 * float(cost), 0.0, False, shares)


def run_draw(
    pop: Population, rng: np.random.Generator, *, alpha: float, delta: float, feature_units: float, spec
) -> tuple[dict[str, Outcome], dict[str, Any]]:
    from cascades.learned_router import fit_router
    from policies.risk_control import TierCosts, TierOutcomes, choose_tier_thresholds

    prices = TierCosts()
    order = rng.permutation(len(pop.labels))
    fit, cert, rest = order[:N_FIT], order[N_FIT : N_FIT + N_CERT], order[N_FIT + N_CERT :]
    cheap_error = pop.cheap_answer != pop.labels
    strong_error = pop.strong_answer != pop.labels
    strong_score = pop.strong_score

    def plan_on(score_fit, score_cert):
        return choose_tier_thresholds(
            TierOutcomes(score_fit, cheap_error[fit], strong_error[fit], strong_score[fit]),
            TierOutcomes(score_cert, cheap_error[cert], strong_error[cert], strong_score[cert]),
            costs=prices,
            alpha=alpha,
            delta=delta,
        )

    def outcome(plan, score_rest, cheap_price):
        return apply_plan(
            plan,
            score_rest,
            strong_score[rest],
            cheap_error[rest],
            strong_error[rest],
            alpha=alpha,
            cheap_price=cheap_price,
            prices=prices,
        )

    out: dict[str, Outcome] = {}
    conf = pop.cheap_score
    out["confidence-certified"] = outcome(plan_on(conf[fit], conf[cert]), conf[rest], prices.cheap)

    fitted = fit_router(
        class_names=[str(d) for d in range(10)],
        spec=spec,
        output=pop.cheap_probabilities[fit],
        cheap_answers=pop.cheap_answer[fit],
        labels=pop.labels[fit],
        input_statistics=pop.input_statistics[fit],
        embeddings=pop.embeddings[fit],
        embedding=EMBEDDING,
        seed=int(rng.integers(2**31)),
    )
    router = fitted.artefact

    def router_score(rows):
        return router.score(
            output=pop.cheap_probabilities[rows],
            cheap_answers=pop.cheap_answer[rows],
            input_statistics=pop.input_statistics[rows],
            embeddings=pop.embeddings[rows],
        )

    learned_cert, learned_rest = router_score(cert), router_score(rest)
    learned_plan = plan_on(fitted.fit_scores, learned_cert)
    out["learned-certified"] = outcome(learned_plan, learned_rest, prices.cheap + feature_units)
    out["learned, features free"] = outcome(learned_plan, learned_rest, prices.cheap)

    perfect = (~cheap_error).astype(np.float64) + 0.5 * rng.uniform(size=len(cheap_error))
    out["certified oracle"] = outcome(plan_on(perfect[fit], perfect[cert]), perfect[rest], prices.cheap)
    out["alpha-oracle"] = alpha_oracle(cheap_error[rest], strong_error[rest], alpha=alpha, prices=prices)
    out["zero-error oracle"] = zero_error_oracle(cheap_error[rest], strong_error[rest], prices=prices)

    router_scores = np.full(len(pop.labels), np.nan)
    router_scores[fit], router_scores[cert], router_scores[rest] = (
        fitted.fit_scores,
        learned_cert,
        learned_rest,
    )
    role = np.empty(len(pop.labels), object)
    role[fit], role[cert], role[rest] = "fit (out-of-fold)", "certification", "held-out"
    detail = {"router_score": router_scores, "role": role, "router_version": router.version}
    return out, detail


# --------------------------------------------------------------------------- the feature cost


def feature_cost_us(pop: Population, spec, *, repeats: int = 300) -> dict[str, float]:
    """Median microseconds per request of each part, one request at a time (no batching)."""
    from cascades.learned_router import fit_router
    from cascades.router_features import classifier_features, input_features
    from examples.digits import rendered

    rows = np.arange(N_FIT)
    router = fit_router(
        class_names=[str(d) for d in range(10)],
        spec=spec,
        output=pop.cheap_probabilities[rows],
        cheap_answers=pop.cheap_answer[rows],
        labels=pop.labels[rows],
        input_statistics=pop.input_statistics[rows],
        embeddings=pop.embeddings[rows],
    ).artefact
    uploads = rendered(np.asarray(pop.embeddings[N_FIT : N_FIT + repeats]).reshape(-1, 8, 8))
    parts = {"output": [], "input": [], "neighbours": [], "score": [], "total": []}
    for i, image in enumerate(uploads):
        row = N_FIT + i
        probs, answer, emb = (
            pop.cheap_probabilities[row : row + 1],
            pop.cheap_answer[row : row + 1],
            pop.embeddings[row : row + 1],
        )
        t0 = time.perf_counter()
        blocks = [classifier_features(probs, spec.top_k)]
        t1 = time.perf_counter()
        if spec.use_input:
            blocks.append(input_features([image]))
        t2 = time.perf_counter()
        blocks.append(router.index.neighbour_features(emb, answer, spec.neighbours_k))
        t3 = time.perf_counter()
        router.learner.score(np.column_stack(blocks))
        t4 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            parts[key].append(value * 1e6)
    return {key: float(np.median(values)) for key, values in parts.items()}


def cheap_stage_us(work_dir: Path, pop: Population, *, repeats: int = 300) -> float:
    """Median microseconds of the service's cheap stage (``OnnxStage.predict``) on one upload."""
    from cascades.models import DIGITS_NAME, train_digits_cheap
    from examples.digits import cheap_stage, rendered

    models = work_dir / "service_models"
    if not (models / f"{DIGITS_NAME}.onnx").is_file():
        models.mkdir(parents=True, exist_ok=True)
        train_digits_cheap(models)
    stage = cheap_stage(models)
    uploads = rendered(np.asarray(pop.embeddings[:repeats]).reshape(-1, 8, 8))
    stage.predict(uploads[:1])  # warm
    times = []
    for image in uploads:
        t0 = time.perf_counter()
        stage.predict([image])
        times.append((time.perf_counter() - t0) * 1e6)
    return float(np.median(times))


# --------------------------------------------------------------------------- the figure


def summarise(outcomes: dict[str, list[Outcome]], *, alpha: float) -> dict[str, dict[str, Any]]:
    table = {}
    for name, rows in outcomes.items():
        cost = np.array([o.cost_per_1000 for o in rows])
        error = np.array([o.accepted_error for o in rows])
        table[name] = {
            "draws": len(rows),
            "cost_median": float(np.median(cost)),
            "cost_q25": float(np.quantile(cost, 0.25)),
            "cost_q75": float(np.quantile(cost, 0.75)),
            "violation_rate": float(np.mean([o.violation for o in rows])),
            "accepted_error_median": float(np.nanmedian(error)) if np.isfinite(error).any() else math.nan,
            "shares_median": {
                k: float(np.median([o.shares[k] for o in rows])) for k in ("cheap", "vlm", "human")
            },
        }
    return table


def format_table(figures: dict[str, Any]) -> str:
    table = figures["table"]
    lines = [
        f"bench router: digits, alpha {figures['alpha']:g}, delta {figures['delta']:g}; prices cheap 1 / VLM 10 / "
        f"review 100; {figures['draws_total']} draws over seeds {figures['seeds']} "
        f"({figures['draws_per_seed']} per seed); second tier: {figures['second_tier']}",
        f"features per request: {figures['feature_us']['total']:.0f} us median "
        f"(output {figures['feature_us']['output']:.0f}, input {figures['feature_us']['input']:.0f}, "
        f"neighbours {figures['feature_us']['neighbours']:.0f}, score {figures['feature_us']['score']:.0f}); "
        f"cheap stage {figures['cheap_stage_us']:.0f} us -> +{figures['feature_units']:.3f} units on the learned "
        "router's cheap tier",
        "",
        f"{'router':<22}{'cost/1000 median':>17}{'IQR':>18}{'violation':>11}{'acc. error':>11}"
        f"{'cheap':>7}{'VLM':>7}{'human':>7}",
    ]
    for name in METHODS:
        row = table[name]
        s = row["shares_median"]
        iqr = f"{row['cost_q25']:,.0f}-{row['cost_q75']:,.0f}"
        lines.append(
            f"{name:<22}{row['cost_median']:>17,.0f}{iqr:>18}"
            f"{row['violation_rate']:>11.3f}{row['accepted_error_median']:>11.3f}"
            f"{s['cheap']:>7.3f}{s['vlm']:>7.3f}{s['human']:>7.3f}"
        )
    lines += [
        "",
        f"baseline ratio (median cost / certified oracle's): learned {figures['ratio_learned']:.2f}x "
        f"(target <= 1.5x; {figures['ratio_learned_features_free']:.2f}x with the features free), "
        f"confidence {figures['ratio_confidence']:.2f}x",
        f"violation allowance: delta {figures['delta']:g} (+ binomial 2-sigma over the draws: "
        f"{figures['violation_allowance']:.3f})",
    ]
    return "\n".join(lines)


def run_bench(
    *,
    seeds: list[int],
    draws: int,
    alpha: float,
    delta: float,
    work_dir: Path,
    json_path: Path | None,
    input_features: bool = False,
) -> dict[str, Any]:
    from cascades.router_features import FeatureSpec

    spec = FeatureSpec(use_input=input_features)
    outcomes: dict[str, list[Outcome]] = {name: [] for name in METHODS}
    items: list[dict[str, Any]] = []
    per_draw: list[dict[str, Any]] = []
    feature_us = stage_us = None
    started = time.monotonic()
    for seed in seeds:
        pop = digits_population(seed, work_dir)
        if feature_us is None:
            feature_us = feature_cost_us(pop, spec)
            stage_us = cheap_stage_us(work_dir, pop)
        feature_units = feature_us["total"] / stage_us
        rng = np.random.default_rng([seed, 22])
        for d in range(draws):
            out, detail = run_draw(pop, rng, alpha=alpha, delta=delta, feature_units=feature_units, spec=spec)
            for name, o in out.items():
                outcomes[name].append(o)
            per_draw.append({"seed": seed, "draw": d, **{n: o.__dict__ for n, o in out.items()}})
            if d == 0:
                for i in range(len(pop.labels)):
                    items.append(
                        {
                            "seed": seed,
                            "digits_row": int(pop.pool_index[i]),
                            "label": int(pop.labels[i]),
                            "cheap_answer": int(pop.cheap_answer[i]),
                            "cheap_score": float(pop.cheap_score[i]),
                            "vlm_answer": int(pop.strong_answer[i]),
                            "vlm_score": float(pop.strong_score[i]),
                            "router_score": float(detail["router_score"][i]),
                            "router_role_draw0": detail["role"][i],
                        }
                    )
        log.info("seed %d: %d draws, %.0fs so far", seed, draws, time.monotonic() - started)
    table = summarise(outcomes, alpha=alpha)
    n_total = draws * len(seeds)
    figures = {
        "alpha": alpha,
        "delta": delta,
        "seeds": seeds,
        "draws_per_seed": draws,
        "draws_total": n_total,
        "second_tier": "digits CNN (stand-in for the VLM)",
        "feature_us": feature_us,
        "cheap_stage_us": stage_us,
        "feature_units": feature_us["total"] / stage_us,
        "table": table,
        "ratio_learned": table["learned-certified"]["cost_median"] / table["certified oracle"]["cost_median"],
        "ratio_learned_features_free": table["learned, features free"]["cost_median"]
        / table["certified oracle"]["cost_median"],
        "ratio_confidence": table["confidence-certified"]["cost_median"]
        / table["certified oracle"]["cost_median"],
        "violation_allowance": delta + 2 * math.sqrt(delta * (1 - delta) / n_total),
        "seconds": time.monotonic() - started,
        "feature_spec": spec.to_document(),
    }
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(
            json.dumps({**figures, "items": items, "draws": per_draw}, default=_json_default)
        )
    return figures


def _json_default(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


def run(args) -> int:
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir()
    figures = run_bench(
        seeds=seeds,
        draws=args.draws,
        alpha=args.alpha,
        delta=args.delta,
        work_dir=work_dir,
        json_path=Path(args.json) if args.json else work_dir / "router.json",
        input_features=args.input_features,
    )
    print(format_table(figures))
    print(f"({figures['seconds']:.0f}s; per-item and per-draw JSON: {args.json or work_dir / 'router.json'})")
    return 0
