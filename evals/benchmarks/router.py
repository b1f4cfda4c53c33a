"""``visionroute bench router``: what the certificate costs with a learned router score against
the cheap tier's confidence, as distributions over resampled fit/certification draws and
training seeds, with the figures the routing literature reports (issue 22).

**Tasks.** ``--task`` names one or more tasks (``TASKS``, or ``module:function`` for a loader
elsewhere). A task's loader has the ``TaskLoader`` signature, ``load(seed, work_dir) ->
RouterTask``: per training seed, the population (labelled items the tiers never saw) with both
tiers' answers, the embeddings of its reference index, labelled reference items outside the
population, and the cheap tier's latency. ``textures`` is ``evals.textures:router_task``
(docs/second_task.md). ``digits`` (``digits_task``): scikit-learn's digits
with tiers trained here per seed (``cascades.digits``: the cheap tier is the linear model on
4x4-pooled pixels that ships as ``digits_cheap``; the second tier is the digits CNN, which
**stands in for the VLM**, priced as a VLM call; there is no recorded-answers path for the LLaVA
yet, so ``bench cascade`` remains the through-the-service figure).

**Draws.** Each draw splits the population at random into a fit share (270), a certification
share (270) and the rest (the sizes of the digits example). Plans are chosen with
``choose_tier_thresholds`` (fit share orders the candidates, certification share tests them)
and applied to the rest, where every figure is measured (``evals.routing``):

- **cheap only**, **VLM only**: every answer of one tier accepted;
- **random (alpha-tuned)**: the least random VLM share whose expected accepted error <= alpha;
- **confidence-certified** (today): the plan on the cheap tier's top-1 probability;
- **learned-certified**: the router (``cascades.learned_router.fit_router``: a logistic score on
  the cheap output's top-3, margin and entropy and the 10 nearest labelled neighbours' agreement
  and distances; ``--votes`` adds the neighbours' class vote and the output's log-odds) fitted on
  the fit share only. Its reference index holds the fit share (scored
  leave-one-out) and the task's reference items (for the digits, the tiers' 718 training
  digits); never a certification item. The fit share's out-of-fold scores order the candidates;
  the certification share (never seen by the learner or the index) tests them. Its cheap price
  includes the features' measured cost (below); **learned, features free** leaves it out;
- **certified oracle**: a perfect cheap ranking (every right answer above every wrong one, ties
  at random) through the same certificate with the same items;
- **alpha-oracle**: knows every answer, needs no certificate (the cheapest routing of the rest
  whose accepted error <= alpha); **zero-error oracle**: cheap when right, else the VLM when
  right, else a human.

Per row: cost per 1000 at the certificate's prices (cheap 1, VLM 10, review 100), accuracy of
the accepted answers, tier shares, violation (accepted error on the rest > alpha; the promise is
at most delta of the draws, up to the rest's own sampling noise), and for the rows that rank
items, RouteLLM's APGR and CPT(50%, 80%, 95%) on the rest (``evals.metrics``: two-model curves,
cheap vs VLM, every answer accepted; the human tier is not on them). The figure is the median
and IQR over every draw of every seed; the baseline ratio is the learned row's median cost over
the certified oracle's (target <= 1.5x).

**Feature cost.** Per request, one at a time (median microseconds, in the same run): the
embedding of the upload for the lookup (the served stage's ``pixel_embedder``), the router's
whole score (``RouterArtefact.score``: output block, k-NN lookup and votes, logistic score),
against the cheap tier the service runs on one upload (``OnnxStage.predict``). The features are
priced at the cheap tier's rate: ``feature_units = cheap_units * feature_us / cheap_stage_us``.

**Frontier.** For the first ``--frontier-draws`` draws of each seed the certified plans are also
chosen at several alphas (``FRONTIER_ALPHAS``); the plot (``evals.plots.router_frontier``) shows
the median (cost, accepted accuracy) of both certified routers and the oracles per alpha, beside
the two-model sweeps of each router's ranking and the single tiers.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from evals.routing import (  # noqa: F401  (apply_plan and the oracles are this bench's arithmetic)
    Outcome,
    alpha_oracle,
    apply_plan,
    cheap_only,
    random_at_alpha,
    vlm_only,
    zero_error_oracle,
)
from visionroute import paths
from visionroute.errors import ConfigError, InputError

log = logging.getLogger(__name__)

METHODS = (
    "cheap only",
    "VLM only",
    "random (alpha-tuned)",
    "confidence-certified",
    "learned-certified",
    "learned, features free",
    "certified oracle",
    "alpha-oracle",
    "zero-error oracle",
)
RANKED = {  # rows whose routing curve (APGR, CPT) is a ranking of the items
    "random (alpha-tuned)": "random",
    "confidence-certified": "confidence",
    "learned-certified": "learned",
    "learned, features free": "learned",
    "certified oracle": "perfect",
    "alpha-oracle": "optimal",
    "zero-error oracle": "optimal",
}
N_FIT, N_CERT = 270, 270
FRONTIER_ALPHAS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15)
# the features kept (see docs/routing_figures.md): the cheap output and 10 neighbours; the
# neighbours' vote and the output log-odds (--votes) did not lower the digits' cost, and cost 15 us
DEFAULT_SPEC = {"top_k": 3, "neighbours_k": 10}


def default_work_dir() -> Path:
    return paths.data_dir() / "bench-router"


# --------------------------------------------------------------------------- the task interface


@dataclass(frozen=True, eq=False)
class RouterTask:
    """What ``bench router`` needs of one task for one training seed (a loader returns one).

    The population is n labelled items the tiers never saw; C classes; d the embedding size.
    Class ids index ``class_names``. Scores need not be calibrated (the certificate needs only a
    ranking), but they are what the served router would see."""

    name: str
    seed: int
    class_names: tuple[str, ...]
    labels: np.ndarray  # (n,) int class ids
    cheap_probabilities: np.ndarray  # (n, C) the cheap tier's class probabilities
    vlm_answers: np.ndarray  # (n,) the VLM's class id; -1 where it gave no valid answer
    vlm_scores: np.ndarray  # (n,) the VLM's confidence in its answer; NaN where none
    embeddings: np.ndarray  # (n, d) what the reference index is searched with
    reference_embeddings: (
        np.ndarray
    )  # (m, d) labelled items outside the population (e.g. the tiers' training items); m may be 0
    reference_labels: np.ndarray  # (m,)
    item_ids: np.ndarray  # (n,) provenance: the item's row in its source dataset
    cheap_stage_us: Callable[[], float]  # times the cheap tier on one request: median microseconds
    embedding: str = ""  # what the embedding is
    second_tier: str = ""  # what answers as the VLM
    embed_us: Callable[[], float] | None = None  # times embedding one upload (None: the embedding is free)
    input_statistics: np.ndarray | None = None  # (n, 5) the shift guard's statistics of each upload
    extra: dict[str, Any] = field(default_factory=dict)  # anything the loader wants in the JSON

    def __post_init__(self) -> None:
        n, c = len(self.labels), len(self.class_names)
        shapes = {
            "labels": (np.shape(self.labels), (n,)),
            "cheap_probabilities": (np.shape(self.cheap_probabilities), (n, c)),
            "vlm_answers": (np.shape(self.vlm_answers), (n,)),
            "vlm_scores": (np.shape(self.vlm_scores), (n,)),
            "item_ids": (np.shape(self.item_ids), (n,)),
        }
        d = np.shape(self.embeddings)[1] if np.ndim(self.embeddings) == 2 else -1
        shapes["embeddings"] = (np.shape(self.embeddings), (n, d))
        m = len(self.reference_labels)
        shapes["reference_embeddings"] = (np.shape(self.reference_embeddings), (m, d))
        if self.input_statistics is not None:
            shapes["input_statistics"] = (np.shape(self.input_statistics), (n, 5))
        for name, (got, expected) in shapes.items():
            if tuple(got) != expected or d < 1:
                raise InputError(
                    f"task {self.name!r}: {name} has shape {tuple(got)}, expected {expected}", field=name
                )
        for name, values in (("labels", self.labels), ("reference_labels", self.reference_labels)):
            values = np.asarray(values)
            if len(values) and (values.min() < 0 or values.max() >= c):
                raise InputError(f"task {self.name!r}: {name} must be class ids in [0, {c})", field=name)
        if n < N_FIT + N_CERT + 10:
            raise InputError(
                f"task {self.name!r}: the population has {n} items; a draw needs {N_FIT} + {N_CERT} + >= 10",
                field="labels",
            )

    @property
    def cheap_answer(self) -> np.ndarray:
        return self.cheap_probabilities.argmax(1)

    @property
    def cheap_score(self) -> np.ndarray:
        return self.cheap_probabilities.max(1)


class TaskLoader(Protocol):
    def __call__(self, seed: int, work_dir: Path) -> RouterTask: ...


TASKS: dict[str, str] = {
    "digits": "evals.benchmarks.router:digits_task",
    "textures": "evals.textures:router_task",  # scikit-image's photographs as texture patches
}


def task_loader(name: str) -> TaskLoader:
    """A registered task's loader, or ``module:function`` for one defined elsewhere."""
    target = TASKS.get(name, name)
    if ":" not in target:
        raise ConfigError(
            f"unknown task {name!r}; expected one of {sorted(TASKS)} or 'module:function'", field="task"
        )
    module, _, function = target.partition(":")
    try:
        loader = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"task {name!r}: cannot load {target!r}: {exc}", field="task") from exc
    return loader


# --------------------------------------------------------------------------- digits


def digits_task(seed: int, work_dir: Path) -> RouterTask:
    from scipy.special import softmax

    from cascades.digits import CLASS_NAMES, load_split, prepare_tiers, tier_logits
    from cascades.router_features import input_features
    from cascades.router_stage import pixel_embedder
    from examples.digits import rendered

    split = load_split(seed)
    tiers = prepare_tiers(work_dir / "models", seed=seed)
    logits = tier_logits(tiers, split.images_pool)
    strong = softmax(logits["strong"].astype(np.float64), axis=1)
    # the embedding the served stage computes: the upload resized back to 8x8 grey
    embed = pixel_embedder(64)
    uploads = rendered(split.images_pool)
    reference_uploads = rendered(split.images_train)
    return RouterTask(
        name="digits",
        seed=seed,
        class_names=tuple(CLASS_NAMES),
        labels=split.labels_pool,
        cheap_probabilities=softmax(logits["cheap"].astype(np.float64), axis=1),
        vlm_answers=strong.argmax(1),
        vlm_scores=strong.max(1),
        embeddings=np.vstack([embed(image) for image in uploads]),
        reference_embeddings=np.vstack([embed(image) for image in reference_uploads]),
        reference_labels=split.labels_train,
        item_ids=split.pool_index,
        cheap_stage_us=lambda: _digits_cheap_stage_us(work_dir, uploads[:300]),
        embedding="the upload resized to 8x8 grey (router_stage.pixel_embedder), L2-normalised",
        second_tier="digits CNN (stand-in for the VLM)",
        embed_us=lambda: _median_us(embed, uploads[:300]),
        input_statistics=input_features(uploads),
    )


def _median_us(function, items) -> float:
    function(items[0])  # warm
    times = []
    for item in items:
        t0 = time.perf_counter()
        function(item)
        times.append((time.perf_counter() - t0) * 1e6)
    return float(np.median(times))


def _digits_cheap_stage_us(work_dir: Path, uploads) -> float:
    """Median microseconds of the service's cheap stage (``OnnxStage.predict``) on one upload."""
    from cascades.models import DIGITS_NAME, train_digits_cheap
    from examples.digits import cheap_stage

    models = work_dir / "service_models"
    if not (models / f"{DIGITS_NAME}.onnx").is_file():
        models.mkdir(parents=True, exist_ok=True)
        train_digits_cheap(models)
    stage = cheap_stage(models)
    return _median_us(lambda image: stage.predict([image]), uploads)


# --------------------------------------------------------------------------- one draw


def fit_on(task: RouterTask, rows: np.ndarray, spec, *, seed: int):
    from cascades.learned_router import fit_router

    return fit_router(
        class_names=task.class_names,
        spec=spec,
        output=task.cheap_probabilities[rows],
        cheap_answers=task.cheap_answer[rows],
        labels=task.labels[rows],
        input_statistics=None if task.input_statistics is None else task.input_statistics[rows],
        embeddings=task.embeddings[rows],
        embedding=task.embedding,
        seed=seed,
        reference_embeddings=task.reference_embeddings,
        reference_labels=task.reference_labels,
    )


def routing_figures(kind: str, score, cheap_correct, vlm_correct) -> dict[str, Any]:
    """APGR and CPT of one ranking on the items (``evals.metrics``)."""
    from evals.metrics import oracle_routing_curve, random_routing_curve, routing_curve, routing_summary

    if kind == "random":
        x, accuracy = random_routing_curve(cheap_correct, vlm_correct)
    elif kind == "optimal":
        x, accuracy = oracle_routing_curve(cheap_correct, vlm_correct)
    else:
        x, accuracy = routing_curve(score, cheap_correct, vlm_correct)
    return routing_summary(x, accuracy, float(np.mean(cheap_correct)), float(np.mean(vlm_correct)))


@dataclass
class Draw:
    outcomes: dict[str, Outcome]
    routing: dict[str, dict[str, Any]]  # ranking kind -> APGR/CPT on the rest
    frontier: dict[str, dict[float, Outcome]]  # router -> alpha -> outcome (frontier draws only)
    router_score: np.ndarray  # per population item (fit: out-of-fold)
    role: np.ndarray
    router_version: str


def run_draw(
    task: RouterTask,
    rng: np.random.Generator,
    *,
    alpha: float,
    delta: float,
    feature_units: float,
    spec,
    frontier_alphas: tuple[float, ...] = (),
) -> Draw:
    from policies.risk_control import TierCosts, TierOutcomes, choose_tier_thresholds

    prices = TierCosts()
    order = rng.permutation(len(task.labels))
    fit, cert, rest = order[:N_FIT], order[N_FIT : N_FIT + N_CERT], order[N_FIT + N_CERT :]
    cheap_error = task.cheap_answer != task.labels
    strong_error = np.asarray(task.vlm_answers) != task.labels
    strong_score = np.asarray(task.vlm_scores, np.float64)

    def plan_on(score_fit, score_cert, a):
        return choose_tier_thresholds(
            TierOutcomes(score_fit, cheap_error[fit], strong_error[fit], strong_score[fit]),
            TierOutcomes(score_cert, cheap_error[cert], strong_error[cert], strong_score[cert]),
            costs=prices,
            alpha=a,
            delta=delta,
        )

    def outcome(plan, score_rest, cheap_price, a):
        return apply_plan(
            plan,
            score_rest,
            strong_score[rest],
            cheap_error[rest],
            strong_error[rest],
            alpha=a,
            cheap_price=cheap_price,
            prices=prices,
        )

    fitted = fit_on(task, fit, spec, seed=int(rng.integers(2**31)))
    router = fitted.artefact

    def router_score(rows):
        return router.score(
            output=task.cheap_probabilities[rows],
            cheap_answers=task.cheap_answer[rows],
            input_statistics=None if task.input_statistics is None else task.input_statistics[rows],
            embeddings=task.embeddings[rows],
        )

    learned = np.full(len(task.labels), np.nan)
    learned[fit], learned[cert], learned[rest] = fitted.fit_scores, router_score(cert), router_score(rest)
    perfect = (~cheap_error).astype(np.float64) + 0.5 * rng.uniform(size=len(cheap_error))
    scores = {"confidence": task.cheap_score, "learned": learned, "perfect": perfect}
    cheap_prices = {
        "confidence": prices.cheap,
        "learned": prices.cheap + feature_units,
        "perfect": prices.cheap,
    }

    def certified(kind: str, a: float, cheap_price: float | None = None) -> Outcome:
        s = scores[kind]  # the learned score's fit rows are its out-of-fold scores
        plan = plan_on(s[fit], s[cert], a)
        return outcome(plan, s[rest], cheap_prices[kind] if cheap_price is None else cheap_price, a)

    e_rest, s_rest = cheap_error[rest], strong_error[rest]
    out = {
        "cheap only": cheap_only(e_rest, alpha=alpha, prices=prices),
        "VLM only": vlm_only(s_rest, np.asarray(task.vlm_answers)[rest] >= 0, alpha=alpha, prices=prices),
        "random (alpha-tuned)": random_at_alpha(e_rest, s_rest, alpha=alpha, prices=prices),
        "confidence-certified": certified("confidence", alpha),
        "learned-certified": certified("learned", alpha),
    }
    free = out["learned-certified"]
    out["learned, features free"] = Outcome(
        free.cost_per_1000 - 1000 * feature_units, free.accepted_error, free.violation, free.shares
    )
    out["certified oracle"] = certified("perfect", alpha)
    out["alpha-oracle"] = alpha_oracle(e_rest, s_rest, alpha=alpha, prices=prices)
    out["zero-error oracle"] = zero_error_oracle(e_rest, s_rest, prices=prices)

    cheap_ok, vlm_ok = ~e_rest, ~s_rest
    routing = {
        kind: routing_figures(
            kind, None if kind in ("random", "optimal") else scores[kind][rest], cheap_ok, vlm_ok
        )
        for kind in ("random", "confidence", "learned", "perfect", "optimal")
    }
    frontier: dict[str, dict[float, Outcome]] = {}
    if frontier_alphas:
        frontier = {
            "confidence-certified": {a: certified("confidence", a) for a in frontier_alphas},
            "learned-certified": {a: certified("learned", a) for a in frontier_alphas},
            "certified oracle": {a: certified("perfect", a) for a in frontier_alphas},
            "alpha-oracle": {
                a: alpha_oracle(e_rest, s_rest, alpha=a, prices=prices) for a in frontier_alphas
            },
        }
    role = np.empty(len(task.labels), object)
    role[fit], role[cert], role[rest] = "fit (out-of-fold)", "certification", "held-out"
    return Draw(out, routing, frontier, learned, role, router.version)


# --------------------------------------------------------------------------- the feature cost


def feature_cost_us(task: RouterTask, spec, *, repeats: int = 300) -> dict[str, float]:
    """Median microseconds per request, one request at a time (no batching): the whole served
    score (``RouterArtefact.score``) and its parts, plus the embedding of the upload."""
    from cascades.router_features import classifier_features, output_log_odds

    router = fit_on(task, np.arange(N_FIT), spec, seed=0).artefact
    rows = range(N_FIT, min(len(task.labels), N_FIT + repeats))
    parts: dict[str, list[float]] = {"output": [], "neighbours": [], "score": [], "router": []}
    for row in rows:
        probs = task.cheap_probabilities[row : row + 1]
        answer = task.cheap_answer[row : row + 1]
        emb = task.embeddings[row : row + 1]
        stats = None if task.input_statistics is None else task.input_statistics[row : row + 1]
        t0 = time.perf_counter()
        blocks = [classifier_features(probs, spec.top_k)]
        if spec.output_log_odds:
            blocks.append(output_log_odds(probs))
        if spec.use_input:
            blocks.append(stats)
        t1 = time.perf_counter()
        blocks.append(
            router.index.neighbour_features(
                emb, answer, spec.neighbours_k, probabilities=probs if spec.neighbour_votes else None
            )
        )
        t2 = time.perf_counter()
        router.learner.score(np.column_stack(blocks))
        t3 = time.perf_counter()
        router.score(output=probs, cheap_answers=answer, input_statistics=stats, embeddings=emb)
        t4 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[key].append(value * 1e6)
    cost = {key: float(np.median(values)) for key, values in parts.items()}
    cost["embed"] = task.embed_us() if task.embed_us is not None else 0.0
    cost["total"] = cost["router"] + cost["embed"]
    return cost


# --------------------------------------------------------------------------- the figure


def _quantiles(values, *, nan_as: float | None = None) -> dict[str, float]:
    """Median and quartiles; NaN values are dropped, or counted as ``nan_as`` (CPT: a level never
    reached counts as infinitely many calls, so it is not dropped in the router's favour)."""
    v = np.asarray(values, np.float64)
    v = np.where(np.isnan(v), nan_as, v) if nan_as is not None else v[np.isfinite(v)]
    if len(v) == 0:
        return {"median": math.nan, "q25": math.nan, "q75": math.nan}
    # with infinities, quantiles that are sample values (interpolating with inf gives NaN)
    method = "linear" if np.isfinite(v).all() else "inverted_cdf"
    q25, median, q75 = np.quantile(v, [0.25, 0.5, 0.75], method=method)
    return {"median": float(median), "q25": float(q25), "q75": float(q75)}


def summarise(draws: list[Draw]) -> dict[str, dict[str, Any]]:
    table = {}
    for name in METHODS:
        rows = [d.outcomes[name] for d in draws]
        kind = RANKED.get(name)
        entry = {
            "draws": len(rows),
            "cost_per_1000": _quantiles([o.cost_per_1000 for o in rows]),
            "accepted_accuracy": _quantiles([o.accepted_accuracy for o in rows]),
            "violation_rate": float(np.mean([o.violation for o in rows])),
            "shares_median": {
                k: float(np.median([o.shares[k] for o in rows])) for k in ("cheap", "vlm", "human")
            },
            "ranking": kind,
            "apgr": None,
            "cpt": None,
        }
        if kind is not None:
            entry["apgr"] = _quantiles([d.routing[kind]["apgr"] for d in draws])
            entry["cpt"] = {
                level: _quantiles([d.routing[kind]["cpt"][level] for d in draws], nan_as=math.inf)
                for level in draws[0].routing[kind]["cpt"]
            }
        table[name] = entry
    return table


def summarise_frontier(draws: list[Draw]) -> dict[str, list[dict[str, float]]]:
    with_frontier = [d for d in draws if d.frontier]
    if not with_frontier:
        return {}
    out = {}
    for router, by_alpha in with_frontier[0].frontier.items():
        out[router] = [
            {
                "alpha": a,
                "draws": len(with_frontier),
                "cost_per_1000": _quantiles([d.frontier[router][a].cost_per_1000 for d in with_frontier])[
                    "median"
                ],
                "accepted_accuracy": _quantiles(
                    [d.frontier[router][a].accepted_accuracy for d in with_frontier]
                )["median"],
                "violation_rate": float(np.mean([d.frontier[router][a].violation for d in with_frontier])),
            }
            for a in by_alpha
        ]
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def format_table(figures: dict[str, Any]) -> str:
    table, fu = figures["table"], figures["feature_us"]
    lines = [
        f"bench router [{figures['task']}]: alpha {figures['alpha']:g}, delta {figures['delta']:g}; prices cheap 1 / "
        f"VLM 10 / review 100; {figures['draws_total']} draws over seeds {figures['seeds']} "
        f"({figures['draws_per_seed']} per seed; fit {N_FIT} / certification {N_CERT} / rest "
        f"{figures['n_rest']}); second tier: {figures['second_tier']}",
        f"features per request: {fu['total']:.0f} us median (embed {fu['embed']:.0f}, router score "
        f"{fu['router']:.0f}: output {fu['output']:.0f}, neighbours {fu['neighbours']:.0f}, learner "
        f"{fu['score']:.0f}); cheap stage {figures['cheap_stage_us']:.0f} us -> +{figures['feature_units']:.3f} "
        "units on the learned router's cheap tier",
        "",
        f"{'router':<24}{'cost/1000':>10}{'IQR':>18}{'viol.':>7}{'acc.':>7}{'cheap':>7}{'VLM':>7}"
        f"{'human':>7}{'APGR':>7}{'CPT50':>7}{'CPT80':>7}{'CPT95':>7}",
    ]
    for name in METHODS:
        row = table[name]
        s, c = row["shares_median"], row["cost_per_1000"]
        iqr = f"{c['q25']:,.0f}-{c['q75']:,.0f}"
        apgr = row["apgr"]["median"] if row["apgr"] else None
        cpt = {k: v["median"] for k, v in row["cpt"].items()} if row["cpt"] else {}
        lines.append(
            f"{name:<24}{c['median']:>10,.0f}{iqr:>18}{row['violation_rate']:>7.3f}"
            f"{_fmt(row['accepted_accuracy']['median'], '.3f'):>7}"
            f"{s['cheap']:>7.3f}{s['vlm']:>7.3f}{s['human']:>7.3f}{_fmt(apgr, '.3f'):>7}"
            + "".join(f"{_fmt(cpt.get(k), '.3f'):>7}" for k in ("50%", "80%", "95%"))
        )
    lines += [
        "",
        f"baseline ratio (median cost / certified oracle's): learned {figures['ratio_learned']:.2f}x "
        f"(target <= 1.5x; {figures['ratio_learned_features_free']:.2f}x with the features free), "
        f"confidence {figures['ratio_confidence']:.2f}x",
        f"violation allowance: delta {figures['delta']:g} (+ binomial 2-sigma over the draws: "
        f"{figures['violation_allowance']:.3f})",
        "acc. = accuracy of the answers accepted without a human (median); viol. = share of draws whose "
        "accepted error on the rest > alpha; APGR/CPT: RouteLLM's, two-model (cheap vs VLM) curves of the "
        "row's ranking on the rest, every answer accepted, the human tier not on them",
    ]
    return "\n".join(lines)


def run_task(
    name: str,
    *,
    seeds: list[int],
    draws: int,
    alpha: float,
    delta: float,
    work_dir: Path,
    spec,
    frontier_draws: int,
) -> dict[str, Any]:
    loader = task_loader(name)
    all_draws: list[Draw] = []
    items: list[dict[str, Any]] = []
    per_draw: list[dict[str, Any]] = []
    feature_us = stage_us = None
    started = time.monotonic()
    n_rest = 0
    second_tier = ""
    for seed in seeds:
        task = loader(seed, work_dir)
        second_tier = task.second_tier
        n_rest = len(task.labels) - N_FIT - N_CERT
        if feature_us is None:
            feature_us = feature_cost_us(task, spec)
            stage_us = task.cheap_stage_us()
        feature_units = feature_us["total"] / stage_us
        rng = np.random.default_rng([seed, 22])
        for d in range(draws):
            draw = run_draw(
                task,
                rng,
                alpha=alpha,
                delta=delta,
                feature_units=feature_units,
                spec=spec,
                frontier_alphas=FRONTIER_ALPHAS if d < frontier_draws else (),
            )
            all_draws.append(draw)
            per_draw.append(
                {
                    "seed": seed,
                    "draw": d,
                    "router_version": draw.router_version,
                    **{n: o.__dict__ for n, o in draw.outcomes.items()},
                    "routing": draw.routing,
                }
            )
            if d == 0:
                items += _items(task, draw)
        log.info("%s seed %d: %d draws, %.0fs so far", name, seed, draws, time.monotonic() - started)
    table = summarise(all_draws)
    oracle = table["certified oracle"]["cost_per_1000"]["median"]
    n_total = len(all_draws)
    return {
        "task": name,
        "alpha": alpha,
        "delta": delta,
        "seeds": seeds,
        "draws_per_seed": draws,
        "draws_total": n_total,
        "n_rest": n_rest,
        "second_tier": second_tier,
        "feature_us": feature_us,
        "cheap_stage_us": stage_us,
        "feature_units": feature_us["total"] / stage_us,
        "table": table,
        "frontier": summarise_frontier(all_draws),
        "sweeps": _sweeps(task, all_draws[-1], feature_us["total"] / stage_us) if all_draws else {},
        "ratio_learned": table["learned-certified"]["cost_per_1000"]["median"] / oracle,
        "ratio_learned_features_free": table["learned, features free"]["cost_per_1000"]["median"] / oracle,
        "ratio_confidence": table["confidence-certified"]["cost_per_1000"]["median"] / oracle,
        "violation_allowance": delta + 2 * math.sqrt(delta * (1 - delta) / n_total),
        "seconds": time.monotonic() - started,
        "feature_spec": spec.to_document(),
        "items": items,
        "draws": per_draw,
    }


def _items(task: RouterTask, draw: Draw) -> list[dict[str, Any]]:
    """Per item (draw 0 of a seed): the label, both tiers' answers and scores, the router's score."""
    return [
        {
            "task": task.name,
            "seed": task.seed,
            "item_id": int(task.item_ids[i]),
            "label": int(task.labels[i]),
            "cheap_answer": int(task.cheap_answer[i]),
            "cheap_score": float(task.cheap_score[i]),
            "vlm_answer": int(task.vlm_answers[i]),
            "vlm_score": float(task.vlm_scores[i]),
            "router_score": float(draw.router_score[i]),
            "router_role_draw0": draw.role[i],
        }
        for i in range(len(task.labels))
    ]


def _sweeps(task: RouterTask, draw: Draw, feature_units: float) -> dict[str, Any]:
    """The two-model sweeps of the last draw's rest (cost per item, accuracy), for the plot."""
    from evals.metrics import oracle_routing_curve, random_routing_curve, routing_curve

    rest = draw.role == "held-out"
    cheap_ok = (task.cheap_answer == task.labels)[rest]
    vlm_ok = (np.asarray(task.vlm_answers) == task.labels)[rest]
    curves = {
        "confidence": (routing_curve(task.cheap_score[rest], cheap_ok, vlm_ok), 1.0),
        "learned (features priced)": (
            routing_curve(draw.router_score[rest], cheap_ok, vlm_ok),
            1.0 + feature_units,
        ),
        "random": (random_routing_curve(cheap_ok, vlm_ok), 1.0),
        "oracle": (oracle_routing_curve(cheap_ok, vlm_ok), 1.0),
    }
    return {
        name: {"cost": (cheap + 10.0 * x).tolist(), "accuracy": acc.tolist()}
        for name, ((x, acc), cheap) in curves.items()
    }


def plot_task(figures: dict[str, Any], path: Path) -> Path:
    from evals.plots import router_frontier

    table = figures["table"]
    points = {
        name: (table[name]["cost_per_1000"]["median"] / 1000, table[name]["accepted_accuracy"]["median"])
        for name in ("cheap only", "VLM only", "random (alpha-tuned)")
    }
    family = {  # the same colour for a router's certified curve and its sweep
        "confidence-certified": "confidence",
        "learned-certified": "learned (features priced)",
        "certified oracle": "oracle",
        "alpha-oracle": "alpha-oracle (no certificate)",
    }
    certified = {
        family[name]: (
            [p["cost_per_1000"] / 1000 for p in rows],
            [p["accepted_accuracy"] for p in rows],
            [p["alpha"] for p in rows],
        )
        for name, rows in figures["frontier"].items()
    }
    sweeps = {name: (c["cost"], c["accuracy"]) for name, c in figures["sweeps"].items()}
    return router_frontier(
        path,
        certified=certified,
        sweeps=sweeps,
        points=points,
        alpha=figures["alpha"],
        title=f"bench router [{figures['task']}]: certified (median over draws, per alpha) and two-model sweeps",
    )


def run(args) -> int:
    from cascades.router_features import FeatureSpec

    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    tasks = [t.strip() for t in str(args.task).split(",") if t.strip()]
    if not seeds or not tasks:
        raise ConfigError(
            "--seeds and --task need at least one value each", field="seeds" if not seeds else "task"
        )
    if len(seeds) * args.draws < 1:
        raise ConfigError(f"--draws must be at least 1, got {args.draws}", field="draws")
    for name in tasks:
        task_loader(name)  # a bad name fails before any training
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir()
    votes = bool(getattr(args, "votes", False))
    spec = FeatureSpec(
        **DEFAULT_SPEC,
        use_input=bool(args.input_features),
        neighbour_votes=votes,
        output_log_odds=votes,
    )
    out: dict[str, Any] = {}
    for name in tasks:
        figures = run_task(
            name,
            seeds=seeds,
            draws=args.draws,
            alpha=args.alpha,
            delta=args.delta,
            work_dir=work_dir,
            spec=spec,
            frontier_draws=args.frontier_draws,
        )
        plot = (
            Path(args.plot_dir or work_dir)
            / f"router_frontier_{name.replace(':', '_').replace('.', '_')}.png"
        )
        if figures["frontier"]:
            plot_task(figures, plot)
        print(format_table(figures))
        print(
            f"({figures['seconds']:.0f}s; frontier plot: {plot if figures['frontier'] else 'none (--frontier-draws 0)'})\n"
        )
        out[name] = figures
    json_path = Path(args.json) if args.json else work_dir / "router.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"tasks": out}, default=_json_default))
    print(f"per-item and per-draw JSON: {json_path}")
    return 0


def _json_default(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)
