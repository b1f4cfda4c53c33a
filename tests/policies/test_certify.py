"""certify(): seeded regression checks of its power, its input errors, the label plan and
`visionroute calibrate --plan`. Rates over many draws are measured by `visionroute bench
calibration`, not asserted here."""

from __future__ import annotations

import numpy as np
import pytest

from evals.benchmarks.calibration import BetaMixture
from policies.certify import (
    CertifyInputError,
    best_coverage,
    certify,
    certify_split,
    certify_two_halves,
    fit_share_size,
    min_labelled_items,
    plan_labels,
)
from visionroute.cli import main
from visionroute.errors import InputError

ALPHA, DELTA = 0.05, 0.1
# 15% wrong; the best threshold (0.753) accepts 61% of the items at alpha = 0.05.
MIXTURE = BetaMixture(error_rate=0.15, right=(6.0, 1.5), wrong=((1.0, 2.5, 2.0),))


def draw(n: int, seed: int):
    return MIXTURE.sample((n,), np.random.default_rng(seed))


def test_certify_finds_a_threshold_where_the_two_halves_do_not():
    scores, is_error = draw(400, seed=4)
    assert not certify_two_halves(scores, is_error, alpha=ALPHA, delta=DELTA).is_feasible
    result = certify(scores, is_error, alpha=ALPHA, delta=DELTA)
    assert result.is_feasible and (result.n_fit, result.n_test) == (40, 360)
    assert result.risk_upper_bound <= ALPHA
    true_risk, coverage = MIXTURE.risk_and_coverage(result.threshold)
    assert true_risk <= ALPHA and coverage > 0.3
    test_accepted = result.certificate.n_accepted
    assert test_accepted == round(result.coverage * result.n_test) and test_accepted >= 45


def test_certify_certifies_more_of_twenty_seeded_draws_than_the_two_halves():
    old = new = 0
    for seed in range(20):
        scores, is_error = draw(500, seed)
        old += certify_two_halves(scores, is_error, alpha=ALPHA, delta=DELTA, seed=seed).is_feasible
        new += certify(scores, is_error, alpha=ALPHA, delta=DELTA, seed=seed).is_feasible
    assert new > old


def test_the_result_says_what_was_proved_and_how():
    scores, is_error = draw(1000, seed=1)
    result = certify(scores, is_error, alpha=ALPHA, delta=DELTA, score_name="calibrated confidence")
    assert result.is_feasible and fit_share_size(1000) == result.n_fit == 100 and result.n_test == 900
    assert result.start_threshold >= result.threshold
    assert result.accepts(result.threshold) and not result.accepts(result.threshold - 1e-9)
    statement = result.statement()
    assert "at most 5.00%" in statement and "calibrated confidence >=" in statement
    assert "100 items placed the candidate thresholds, 900 tested them" in statement
    document = result.to_dict()
    assert document["feasible"] and document["n_fit"] == 100 and document["seed"] == 0
    assert document["method"].startswith("learn-then-test, fixed-sequence")
    # the same seed gives the same split and the same answer; another seed may differ
    assert certify(scores, is_error, alpha=ALPHA, delta=DELTA).threshold == result.threshold


def test_bonferroni_starts_state_the_level_the_user_asked_for():
    scores, is_error = draw(1000, seed=2)
    result = certify(scores, is_error, alpha=ALPHA, delta=DELTA, n_starts=2)
    assert result.delta == DELTA and "2 starts, Bonferroni" in result.method
    if result.is_feasible:  # each sequence ran at delta / 2, so its bound is at that level
        assert result.risk_upper_bound <= ALPHA


def test_all_wrong_certifies_nothing():
    scores = np.random.default_rng(0).uniform(size=300)
    result = certify(scores, np.ones(300, bool), alpha=ALPHA, delta=DELTA)
    assert not result.is_feasible and result.threshold is None and result.risk_upper_bound == 1.0
    assert "INFEASIBLE" in result.statement() and not result.accepts(1.0)


def test_scores_outside_the_unit_interval_work_too():
    scores, is_error = draw(600, seed=3)
    on_a_logit_scale = np.log(scores) - np.log1p(-scores)
    result = certify(on_a_logit_scale, is_error, alpha=ALPHA, delta=DELTA)
    assert result.is_feasible and result.threshold < 0.9 * on_a_logit_scale.max()


@pytest.mark.parametrize(
    ("kwargs", "field", "reason"),
    [
        ({"scores": [0.5] * 100, "is_error": [False] * 99}, "is_error", "has 99 items but scores has 100"),
        ({"scores": [0.5] * 99 + [float("nan")], "is_error": [False] * 100}, "scores", "NaN or infinite"),
        ({"scores": [[0.5]] * 100, "is_error": [False] * 100}, "scores", "must be 1-d"),
        ({"scores": [0.5] * 100, "is_error": [0, 2] * 50}, "is_error", "booleans or 0/1"),
        ({"alpha": 0.0}, "alpha", "must be a number in (0, 1)"),
        ({"alpha": 1.5}, "alpha", "must be a number in (0, 1)"),
        ({"delta": 1.0}, "delta", "must be a number in (0, 1)"),
        ({"delta": -0.1}, "delta", "must be a number in (0, 1)"),
        ({"scores": [0.9] * 50, "is_error": [False] * 50}, "scores", "50 labelled items cannot certify"),
        ({"p_value": "bonferroni"}, "p_value", "unknown p-value"),
        ({"n_starts": 0}, "n_starts", "positive integer"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_argument(kwargs, field, reason):
    call = {"scores": np.linspace(0, 1, 100), "is_error": np.zeros(100, bool), "alpha": ALPHA, "delta": DELTA}
    call |= kwargs
    with pytest.raises(ValueError) as error:
        certify(call.pop("scores"), call.pop("is_error"), **call)
    assert isinstance(error.value, (CertifyInputError, InputError)) and error.value.field == field
    assert reason in str(error.value) and str(error.value).startswith(f"{field}:")


def test_the_fewest_items_are_the_fit_share_and_a_perfect_test():
    fewest = min_labelled_items(ALPHA, DELTA)
    assert fewest == 20 + 45
    perfect = np.linspace(0.5, 1, fewest)
    assert certify(perfect, np.zeros(fewest, bool), alpha=ALPHA, delta=DELTA).is_feasible
    with pytest.raises(ValueError, match=f"at least {fewest}"):
        certify(perfect[1:], np.zeros(fewest - 1, bool), alpha=ALPHA, delta=DELTA)


def test_certify_split_checks_each_share():
    scores, is_error = draw(200, seed=0)
    with pytest.raises(ValueError, match="fit_is_error: has 3 items but fit_scores has 2"):
        certify_split(scores[:2], is_error[:3], scores, is_error, alpha=ALPHA, delta=DELTA)
    with pytest.raises(ValueError, match="scores: no items to test"):
        certify_split(scores, is_error, [], [], alpha=ALPHA, delta=DELTA)


def test_best_coverage_is_the_lowest_threshold_within_alpha():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    is_error = np.array([False, False, True, False, True])
    assert best_coverage(scores, is_error, 0.25) == pytest.approx(0.8)  # 1 error in the top 4
    assert best_coverage(scores, is_error, 0.25, min_accepted=5) == 0.0
    assert best_coverage(scores, np.ones(5, bool), 0.25) == 0.0


# --------------------------------------------------------------------------- the plan


def test_the_plan_is_monotone_and_certify_needs_fewer_labels_than_the_halves():
    # an easier model than MIXTURE (12% wrong, the best threshold accepts 86%): a few hundred labels
    easier = BetaMixture(error_rate=0.12, right=(7.0, 1.3), wrong=((0.85, 2.5, 2.5), (0.15, 6.0, 1.5)))
    scores, is_error = easier.sample((600,), np.random.default_rng(7))
    options = dict(alpha=ALPHA, delta=DELTA, reps=30, max_items=4000, seed=0)
    plan = plan_labels(scores, is_error, **options)
    halves = plan_labels(scores, is_error, procedure=certify_two_halves, **options)
    for p in (plan, halves):
        assert p.reachable and 0 < p.best_pilot_coverage < 1
        assert p.sizes == sorted(p.sizes) and p.sizes[0] == min_labelled_items(ALPHA, DELTA)
        assert all(a <= b for a, b in zip(p.certified_share, p.certified_share[1:]))
    assert plan.needed is not None and "About" in plan.message
    at = plan.sizes.index(plan.needed)
    assert plan.certified_share[at] >= 0.8 > plan.certified_share[at - 1]
    assert plan.sizes[-1] < 4000  # it stopped once the target was reached
    # the two halves need more (here: not even 4000 reach 80%, and the plan says so)
    assert halves.needed is None or halves.needed > plan.needed
    assert halves.needed is not None or halves.message.startswith("NOT WITHIN 4000 ITEMS")
    # a stricter target needs at least as many labels
    strict = plan_labels(scores, is_error, **{**options, "alpha": 0.03})
    assert strict.needed is None or strict.needed >= plan.needed


def test_a_pilot_whose_best_items_err_too_often_is_unreachable():
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=200)
    plan = plan_labels(scores, rng.uniform(size=200) < 0.4, alpha=0.05, delta=DELTA, reps=20)
    assert not plan.reachable and plan.needed is None and plan.sizes == []
    assert plan.message.startswith("UNREACHABLE") and "error rate" in plan.message


def test_plan_input_errors_name_the_argument():
    scores, is_error = draw(100, seed=0)
    with pytest.raises(ValueError, match="probability: must be in"):
        plan_labels(scores, is_error, alpha=ALPHA, delta=DELTA, probability=1.0)
    with pytest.raises(ValueError, match="scores: a pilot needs at least 20"):
        plan_labels(scores[:10], is_error[:10], alpha=ALPHA, delta=DELTA)
    with pytest.raises(ValueError, match="max_items: must be at least 65"):
        plan_labels(scores, is_error, alpha=ALPHA, delta=DELTA, max_items=50)


def pilot_npz(path, n: int, right_rate: float, *, confident_errors: bool = False, seed: int = 0):
    """Synthetic 3-class outputs: right ~``right_rate`` of the time, confident when right (and
    as confident when wrong with ``confident_errors``)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    right = rng.random(n) < right_rate
    boost = np.where(right | confident_errors, rng.uniform(2, 8, n), rng.uniform(0, 2.5, n))
    logits[np.arange(n), np.where(right, labels, (labels + 1) % 3)] += boost
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.savez(path, probabilities=probabilities, labels=labels)
    return str(path)


def test_calibrate_plan_prints_the_labels_needed(tmp_path, capsys):
    pilot = pilot_npz(tmp_path / "pilot.npz", 300, 0.85)
    assert main(["calibrate", "--plan", "--predictions", pilot, "--plan-reps", "20"]) == 0
    out = capsys.readouterr().out
    assert "pilot pilot: 300 labelled items" in out and "P(certified), certify()" in out
    assert "certify(): About" in out and "labelled items certify alpha=0.05 at delta=0.1" in out
    assert "with the 300 pilot items themselves, certify():" in out
    assert not list(tmp_path.glob("*.json"))  # a plan writes no artefact


def test_calibrate_plan_says_when_the_target_is_out_of_reach(tmp_path, capsys):
    pilot = pilot_npz(tmp_path / "weak.npz", 300, 0.6, confident_errors=True)  # 40% wrong, just as sure
    assert main(["calibrate", "--plan", "--predictions", pilot, "--plan-reps", "20"]) == 1
    assert "UNREACHABLE" in capsys.readouterr().out
    assert main(["calibrate", "--plan", "--predictions", pilot, "--plan-probability", "2"]) == 2
    assert "probability" in capsys.readouterr().err


def test_the_power_bench_rows_on_a_few_seeded_draws():
    from evals.benchmarks.calibration import format_power, power_simulated

    result = power_simulated(sizes=(500,), n_splits=60, mixture=MIXTURE)
    rows = {row["procedure"]: row for row in result["rows"]}
    assert set(rows) == {"before", "after", "after, 2 starts (Bonferroni)"}
    assert (rows["before"]["n_fit"], rows["after"]["n_fit"]) == (250, 50)
    assert rows["after"]["certified_share"] > rows["before"]["certified_share"]
    for row in rows.values():
        assert 0 <= row["violation_rate"] <= row["certified_share"] <= 1 and row["splits"] == 60
        assert row["relative_coverage"] == pytest.approx(
            row["certified_share"] * row["relative_coverage_if_certified"]
        )
    assert 0 < result["oracle_certified_share"][500] < 1
    assert result["distribution"]["best_coverage"] == pytest.approx(0.612, abs=0.002)
    table = format_power({"alpha": ALPHA, "delta": DELTA, "splits": 60, "simulated": result})
    assert "ceiling" in table and "after, 2 starts (Bonferroni)" in table
