"""``bench router``'s arithmetic (evals.routing, evals.metrics' RouteLLM figures), the whole bench
at a tiny size on a synthetic task (every row, the plot, the JSON fields), and the direction the
learned router must move the certified cost on a population where the confidence misses a signal."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from evals.benchmarks import router as bench
from evals.metrics import (
    RoutingCurve,
    apgr,
    calls_to_performance,
    oracle_routing_curve,
    random_routing_curve,
    routing_curve,
)
from evals.routing import alpha_oracle, apply_plan, random_at_alpha, vlm_only, zero_error_oracle
from policies.risk_control import TierCosts, TierOutcomes, choose_tier_thresholds
from policies.router_learner import LearnedScore, cross_fitted_scores
from visionroute.errors import ConfigError, InputError

NAMES = ("confidence", "second")


# --------------------------------------------------------------------------- RouteLLM's figures

# 10 items: the cheap tier is right on the first 6, the VLM on all 10 (g = 0.4, no item lost)
CHEAP_OK = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], bool)
VLM_OK = np.ones(10, bool)


def test_random_routing_recovers_the_gap_in_proportion():
    x, accuracy = random_routing_curve(CHEAP_OK, VLM_OK)
    assert apgr(x, accuracy, 0.6, 1.0) == pytest.approx(0.5)
    for level in (0.5, 0.8, 0.95):
        assert calls_to_performance(x, accuracy, 0.6, 1.0, level) == pytest.approx(level)


def test_the_optimal_router_recovers_the_gap_with_the_fewest_calls():
    x, accuracy = oracle_routing_curve(CHEAP_OK, VLM_OK)
    assert apgr(x, accuracy, 0.6, 1.0) == pytest.approx(1 - 0.4 / 2)  # 1 - g/2
    assert calls_to_performance(x, accuracy, 0.6, 1.0, 0.5) == pytest.approx(0.2)
    assert calls_to_performance(x, accuracy, 0.6, 1.0, 0.95) == pytest.approx(0.38)
    # a score that ranks every wrong cheap answer lowest traces the same curve here
    x2, perfect = routing_curve(CHEAP_OK.astype(float), CHEAP_OK, VLM_OK)
    np.testing.assert_allclose(perfect, accuracy)


def test_any_ranking_runs_from_the_cheap_tier_to_the_vlm_and_a_worse_one_scores_lower():
    rng = np.random.default_rng(0)
    cheap_ok, vlm_ok = rng.uniform(size=200) < 0.8, rng.uniform(size=200) < 0.95
    score = rng.uniform(size=200)
    x, accuracy = routing_curve(score, cheap_ok, vlm_ok)
    assert accuracy[0] == pytest.approx(cheap_ok.mean()) and accuracy[-1] == pytest.approx(vlm_ok.mean())
    a_cheap, a_vlm = cheap_ok.mean(), vlm_ok.mean()
    best = apgr(*routing_curve(cheap_ok.astype(float), cheap_ok, vlm_ok), a_cheap, a_vlm)
    worst = apgr(*routing_curve(-cheap_ok.astype(float), cheap_ok, vlm_ok), a_cheap, a_vlm)
    assert worst < 0.5 < best
    assert math.isnan(calls_to_performance(*random_routing_curve(cheap_ok, vlm_ok), a_cheap, a_vlm, 1.5))
    metric = RoutingCurve()
    metric.update(router_score=score[:100], cheap_correct=cheap_ok[:100], vlm_correct=vlm_ok[:100])
    metric.update(router_score=score[100:], cheap_correct=cheap_ok[100:], vlm_correct=vlm_ok[100:])
    assert metric.compute()["apgr"] == pytest.approx(apgr(x, accuracy, a_cheap, a_vlm))
    assert set(metric.compute()["cpt"]) == {"50%", "80%", "95%"}
    metric.reset()
    assert metric.compute()["apgr"] is None


def test_bench_cascade_reports_routellm_figures_from_its_records():
    from evals.benchmarks.cascade import ItemRecord, Records, routing_figures

    records = Records(
        [
            ItemRecord(
                label=1,
                path="cheap" if ok else "vlm",
                escalated=not ok,
                answer=1,
                cost_units=1.0,
                latency_ms=1.0,
                cheap_answer=1 if ok else 0,
                cheap_score=0.9 if ok else 0.3,
                vlm_answer=1,
                vlm_score=0.9,
                vlm_source="service",
            )
            for ok in CHEAP_OK
        ]
    )
    figures = routing_figures(records)
    assert figures["confidence"]["apgr"] == pytest.approx(figures["oracle"]["apgr"]) == pytest.approx(0.8)
    assert figures["random"]["apgr"] == pytest.approx(0.5)
    assert figures["confidence"]["cpt"]["50%"] == pytest.approx(0.2)


# --------------------------------------------------------------------------- routing outcomes


def population(n: int, rng: np.random.Generator):
    """The confidence ranks the cheap tier's errors only in part; a second feature flags a
    region where the cheap tier is often wrong at any confidence. The second tier is always
    right here (the test is about which cheap answers to accept)."""
    confidence = rng.uniform(size=n)
    second = rng.uniform(size=n)
    p_wrong = 0.01 + 0.1 * (1 - confidence) ** 2 + 0.6 * (second < 0.1)
    cheap_error = rng.uniform(size=n) < p_wrong
    return np.column_stack([confidence, second]), cheap_error, np.zeros(n, bool)


def test_oracles_and_random_routing_at_alpha():
    rng = np.random.default_rng(0)
    _, cheap_error, _ = population(5000, rng)
    strong_error = rng.uniform(size=5000) < 0.02
    prices = TierCosts()
    zero = zero_error_oracle(cheap_error, strong_error, prices=prices)
    alpha = alpha_oracle(cheap_error, strong_error, alpha=0.04, prices=prices)
    assert alpha.accepted_error <= 0.04 and alpha.cost_per_1000 < zero.cost_per_1000
    for outcome in (zero, alpha):
        assert sum(outcome.shares.values()) == pytest.approx(1.0)
    random = random_at_alpha(cheap_error, strong_error, alpha=0.04, prices=prices)
    assert random.accepted_error == pytest.approx(0.04) and not random.violation
    assert alpha.cost_per_1000 < random.cost_per_1000 < 1000 * (prices.cheap + prices.escalate)
    assert random_at_alpha(cheap_error, cheap_error, alpha=0.01, prices=prices).violation  # VLM no better
    missing = vlm_only(strong_error, np.arange(5000) % 10 != 0, alpha=0.04, prices=prices)
    assert missing.shares["human"] == pytest.approx(0.1)
    assert missing.cost_per_1000 == pytest.approx(1000 * (prices.escalate + 0.1 * prices.review))


# --------------------------------------------------------------------------- the bench, tiny


def synthetic_task(seed: int, work_dir) -> bench.RouterTask:
    """4 clustered classes; the cheap tier is noisy, the VLM mostly right; reference items
    from the same clusters (what a task's tiers were trained on)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 12)) * 2.5

    def items(n):
        labels = rng.integers(0, 4, n)
        return labels, centres[labels] + rng.normal(size=(n, 12))

    labels, embeddings = items(640)
    ref_labels, ref_embeddings = items(200)
    logits = np.eye(4)[labels] * 2.2 + rng.normal(size=(640, 4)) * 1.2
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    vlm_right = rng.uniform(size=640) < 0.97
    vlm_answers = np.where(vlm_right, labels, (labels + 1) % 4)
    vlm_answers[:5] = -1  # no valid answer
    return bench.RouterTask(
        name="synthetic",
        seed=seed,
        class_names=("a", "b", "c", "d"),
        labels=labels,
        cheap_probabilities=probabilities,
        vlm_answers=vlm_answers,
        vlm_scores=np.where(vlm_answers >= 0, 0.5 + 0.5 * vlm_right * rng.uniform(size=640), np.nan),
        embeddings=embeddings,
        reference_embeddings=ref_embeddings,
        reference_labels=ref_labels,
        item_ids=np.arange(640),
        cheap_stage_us=lambda: 50.0,
        second_tier="synthetic VLM",
    )


@pytest.mark.slow
def test_the_bench_prints_every_row_and_writes_the_plot_and_per_item_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "task_loader", lambda name: synthetic_task)
    args = argparse.Namespace(
        task="synthetic",
        seeds="0,1",
        draws=2,
        frontier_draws=1,
        votes=True,
        alpha=0.1,
        delta=0.1,
        work_dir=str(tmp_path),
        json=str(tmp_path / "router.json"),
        plot_dir=None,
        input_features=False,
    )
    assert bench.run(args) == 0
    printed = capsys.readouterr().out
    for name in bench.METHODS:
        assert f"\n{name} " in printed
    assert "bench router [synthetic]" in printed and "baseline ratio" in printed
    assert (tmp_path / "router_frontier_synthetic.png").stat().st_size > 10_000
    figures = json.loads((tmp_path / "router.json").read_text())["tasks"]["synthetic"]
    assert figures["draws_total"] == 4 and len(figures["draws"]) == 4
    assert set(figures["table"]) == set(bench.METHODS)
    for name, row in figures["table"].items():
        assert sum(row["shares_median"].values()) == pytest.approx(1.0, abs=0.02), name
        assert (row["apgr"] is None) == (name in ("cheap only", "VLM only"))
    assert figures["table"]["random (alpha-tuned)"]["apgr"]["median"] == pytest.approx(0.5)
    learned, free = figures["table"]["learned-certified"], figures["table"]["learned, features free"]
    assert learned["cost_per_1000"]["median"] > free["cost_per_1000"]["median"]  # the features are priced
    items = figures["items"]
    assert len(items) == 2 * 640  # per seed, draw 0
    fields = {"label", "cheap_answer", "cheap_score", "vlm_answer", "vlm_score", "router_score"}
    assert fields <= set(items[0])
    assert all(0.0 <= item["router_score"] <= 1.0 for item in items)
    assert {p["alpha"] for p in figures["frontier"]["learned-certified"]} == set(bench.FRONTIER_ALPHAS)


def test_the_command_takes_its_flags(capsys):
    from visionroute.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "router", "--help"])
    usage = capsys.readouterr().out
    flags = ["--task", "--seeds", "--draws", "--frontier-draws", "--json", "--plot-dir", "--votes", "--alpha"]
    assert [flag for flag in flags if flag not in usage] == []
    args = build_parser().parse_args(["bench", "router"])
    assert len(args.seeds.split(",")) * args.draws >= 500  # the default is a figure, not a smoke run


def test_a_cpt_never_reached_counts_as_infinitely_many_calls():
    q = bench._quantiles([0.1, math.nan, math.nan, 0.2, math.nan], nan_as=math.inf)
    assert q["median"] == math.inf and q["q25"] == pytest.approx(0.2)  # never NaN, never dropped
    assert bench._quantiles([0.1, math.nan, 0.3])["median"] == pytest.approx(0.2)  # costs: NaN dropped


def test_a_task_is_named_from_the_registry_or_as_module_function():
    assert bench.task_loader("digits") is bench.digits_task
    assert bench.task_loader("evals.benchmarks.router:digits_task") is bench.digits_task
    with pytest.raises(ConfigError) as info:
        bench.task_loader("flowers")
    assert info.value.field == "task" and "digits" in str(info.value)


def test_a_task_with_mismatched_shapes_names_the_field():
    task = synthetic_task(0, None)
    with pytest.raises(InputError) as info:
        bench.RouterTask(**{**task.__dict__, "vlm_scores": task.vlm_scores[:-1]})
    assert info.value.field == "vlm_scores"


# --------------------------------------------------------------------------- the direction


def test_learned_certified_cost_is_below_confidence_certified_over_draws():
    alpha, delta, prices = 0.05, 0.1, TierCosts()
    learned, confidence = [], []
    for seed in range(16):
        rng = np.random.default_rng(seed)
        x_fit, e_fit, s_fit = population(400, rng)
        x_cert, e_cert, s_cert = population(400, rng)
        x_rest, e_rest, s_rest = population(4000, rng)
        model = LearnedScore.fit(x_fit, ~e_fit, NAMES)
        for costs, fit_score, cert_score, rest_score in (
            (
                learned,
                cross_fitted_scores(x_fit, ~e_fit, NAMES, folds=3),
                model.score(x_cert),
                model.score(x_rest),
            ),
            (confidence, x_fit[:, 0], x_cert[:, 0], x_rest[:, 0]),
        ):
            plan = choose_tier_thresholds(
                TierOutcomes(fit_score, e_fit, s_fit),
                TierOutcomes(cert_score, e_cert, s_cert),
                costs=prices,
                alpha=alpha,
                delta=delta,
                n_points=25,
            )
            out = apply_plan(
                plan,
                rest_score,
                np.ones(len(rest_score)),
                e_rest,
                s_rest,
                alpha=alpha,
                cheap_price=1.0,
                prices=prices,
            )
            costs.append(out.cost_per_1000)
    # a direction with a margin over many draws, not a pinned number
    # (seen here: medians about 0.55x apart, the learned one lower in every draw)
    assert np.median(learned) < 0.8 * np.median(confidence)
    assert np.mean(np.array(learned) < np.array(confidence)) >= 0.75
