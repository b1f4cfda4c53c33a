"""``bench loop`` on a synthetic replay: a tiny seeded run gives every table row and JSON field, and
under a strong shift the static plan's accepted error rises above alpha and above the closed loop's."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from evals.benchmarks import loop as bench
from visionroute.errors import ConfigError

CLASSES = 4


def _tier(rng, labels, confidence, correct):
    """(n, C) probabilities whose top class (the label when ``correct``) has ``confidence``."""
    n = len(labels)
    wrong = (labels + rng.integers(1, CLASSES, n)) % CLASSES
    top = np.where(correct, labels, wrong)
    probabilities = np.tile(((1 - confidence) / (CLASSES - 1))[:, None], (1, CLASSES))
    probabilities[np.arange(n), top] = confidence
    return probabilities


def synthetic_replay(n: int = 1200, seed: int = 0) -> bench.Replay:
    """Level 0 clean, level 1 shifted: the cheap tier keeps its confidence but is right only half as
    often; the second tier stays good and its confidence separates its errors; one input statistic
    moves by 4 standard deviations (the guard sees it)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    confidence = rng.uniform(0.4, 1.0, n)
    cheap, strong, stats = [], [], []
    for cheap_skill, strong_error, moved in ((1.0, 0.03, 0.0), (0.5, 0.05, 4.0)):
        cheap.append(_tier(rng, labels, confidence, rng.random(n) < confidence * cheap_skill))
        strong_wrong = rng.random(n) < strong_error
        strong.append(_tier(rng, labels, np.where(strong_wrong, 0.5, 0.95), ~strong_wrong))
        level_stats = rng.normal(0.0, 1.0, (n, 5))
        level_stats[:, 3] += moved
        stats.append(level_stats)
    order = rng.permutation(n)
    third = n // 4
    return bench.Replay(
        np.stack(cheap),
        np.stack(strong),
        np.stack(stats),
        labels,
        tuple(map(str, range(CLASSES))),
        order[:third],
        order[third : 2 * third],
        order[2 * third :],
        "synthetic",
    )


CONFIG = bench.LoopConfig(
    items=4000,
    window=500,
    shift_start=0.4,
    ramp=0.1,
    max_severity=1,
    alpha=0.1,
    audit_fraction=0.3,
    audit_budget=0.5,
    alarm_factor=1.5,
    label_windows=2,
    n_points=12,
    guard_stride=50,
    seed=3,
)


@pytest.fixture(scope="module")
def certified_with():
    """The (delta, fit_share) of every production certificate the loop computed."""
    return []


@pytest.fixture(scope="module")
def result(certified_with):
    import policies.production_certify as production_certify

    certify = production_certify.certify_production_plan

    def recording(*args, **kwargs):
        certified_with.append((kwargs["delta"], kwargs.get("fit_share")))
        return certify(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(production_certify, "certify_production_plan", recording)
        return bench.simulate(synthetic_replay(), CONFIG)


def test_every_plan_the_loop_may_deploy_is_certified_at_half_delta(result, certified_with):
    """The loop keeps its running plan or deploys a new certificate: two certified plans, one
    chosen on labels; at delta / 2 each, the deployed one's promise holds at delta."""
    assert result["certificate_delta"] == pytest.approx(CONFIG.delta / 2)
    assert certified_with and set(certified_with) == {(CONFIG.delta / 2, CONFIG.fit_share)}
    every = dataclasses.replace(CONFIG, keep_cheaper_incumbent=False)
    assert every.certificate_delta == CONFIG.delta


def test_tiny_run_gives_every_row_and_field(result, tmp_path):
    table = bench.format_result(result)
    for policy in bench.POLICIES:
        assert set(result["phases"][policy]) == set(bench.PHASES)
        assert len(result["windows"][policy]) == CONFIG.items // CONFIG.window
        for phase in bench.PHASES:
            assert any(line.split()[:2] == [policy, phase] for line in table.splitlines())
    for key in ("audit_fraction", "alarm_audit_fraction", "static_plan", "recertifications", "seconds"):
        assert key in result
    assert set(result["targets"]) >= {
        "loop_windows_above_alpha",
        "lag_bound_windows",
        "accepted_error_within_alpha_outside_lag",
        "windows_above_alpha_before_shift",
        "windows_above_alpha_after_lag",
        "loop_cost_ratio_to_shifted_calibration",
        "cost_within_1_2x",
    }
    targets = result["targets"]
    split = targets["windows_above_alpha_before_shift"] + targets["windows_above_alpha_after_lag"]
    assert set(split) <= set(targets["loop_windows_above_alpha"])
    assert targets["accepted_error_within_alpha_outside_lag"] == (not split)
    baseline = result["shifted_baseline"]
    assert baseline["available"] and baseline["labels"] > 0 and baseline["cost_per_1000"] > 0
    row = result["phases"]["loop"]["settled"]
    assert {"cost_per_1000", "accepted_error", "worst_window_error", "audit_labels", "coverage"} <= set(row)
    # labels spent: the loop audits more once the guard alarms (here from the ramp on)
    windows = result["windows"]["loop"]
    assert any(w["drift_alarm"] for w in windows)
    assert max(w["audit_fraction"] for w in windows) > result["audit_fraction"]
    json.loads(json.dumps(result, default=float))
    assert bench.plot(result, tmp_path / "loop.png").stat().st_size > 0


@pytest.fixture(scope="module")
def planned():
    """The same stream with the audit fraction from the label plan (re-planned after the shift)."""
    return bench.simulate(synthetic_replay(), dataclasses.replace(CONFIG, audit_fraction=None))


def test_labels_are_a_separate_cost_column(result):
    table = bench.format_result(result)
    assert "+labels" in table and "cost/1000 leaves the audit labels out" in table
    review = CONFIG.costs["review"]
    for policy in bench.POLICIES:
        for row in result["phases"][policy].values():
            items = row["windows"] * CONFIG.window
            expected = row["cost_per_1000"] + 1000 * review * row["audit_labels"] / items
            assert row["cost_with_labels_per_1000"] == pytest.approx(expected)
    baseline = result["shifted_baseline"]
    assert baseline["cost_with_labels_per_1000"] > baseline["cost_per_1000"]
    assert baseline["loop_cost_ratio_with_labels"] == pytest.approx(
        baseline["loop_cost_with_labels_per_1000"] / baseline["cost_with_labels_per_1000"]
    )


def test_a_running_plan_stays_only_while_fresh_labels_certify_it_and_it_is_no_dearer(planned):
    windows = planned["windows"]["loop"]
    kept = [w for w in windows if "running plan kept" in w["recertification"]]
    assert kept, "the seeded stream keeps its running plan at least once"
    for w in kept:
        assert not w["recertified"] and w["plan"] == windows[w["window"] - 1]["plan"]
    for w in windows:
        if "; deployed:" in w["recertification"]:
            assert w["recertified"]


def test_the_first_certificate_of_shifted_inputs_replans_the_audit_fraction(planned):
    (replan,) = planned["audit_fraction_replans"]
    shift_window = int(CONFIG.shift_start * CONFIG.items) // CONFIG.window
    assert replan["window"] >= shift_window and 0 < replan["audit_fraction"] <= CONFIG.audit_budget
    assert _fractions_without_alarm(planned, after=replan["window"]) == {replan["audit_fraction"]}


def test_a_configured_audit_fraction_is_never_replanned(result):
    assert result["audit_fraction_replans"] == []
    assert _fractions_without_alarm(result) == {CONFIG.audit_fraction}


def _fractions_without_alarm(result, after: int = -1) -> set[float]:
    """The audit fractions of the loop's windows that began without a drift alarm (a window's
    ``drift_alarm`` is the state at its end)."""
    windows = result["windows"]["loop"]
    return {
        w["audit_fraction"]
        for before, w in zip(windows, windows[1:])
        if w["window"] > after and not before["drift_alarm"]
    }


def test_under_a_strong_shift_the_static_plan_breaks_and_the_loop_does_not(result):
    settled = {policy: result["phases"][policy]["settled"] for policy in bench.POLICIES}
    assert settled["static"]["accepted_error"] > CONFIG.alpha
    assert settled["loop"]["accepted_error"] < settled["static"]["accepted_error"]
    assert settled["loop"]["accepted_error"] <= CONFIG.alpha
    assert result["recertifications"] >= 1
    # the shift restarted the label window: the labels before it describe the clean inputs
    windows = result["windows"]["loop"]
    assert any(w["label_window_restarted"] for w in windows if w["phase"] in ("ramp", "relearning"))
    # and a certificate on the labels of a window whose inputs were still moving is never deployed
    assert not any(w["recertified"] for w in windows if w["label_window_restarted"])
    # before the shift every policy serves the same offline plan without breaking it
    clean = {
        policy: result["phases"][policy]["clean"]["accepted_error"] for policy in ("static", "static+guard")
    }
    assert clean["static"] == pytest.approx(clean["static+guard"], abs=0.02)


def test_an_unknown_task_or_fit_share_is_a_config_error():
    with pytest.raises(ConfigError) as error:
        bench.load_replay("faces", "gaussian_noise", seed=0)
    assert error.value.field == "task"
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(CONFIG, fit_share=1.0).check(levels=2)
    assert error.value.field == "fit_share"


def test_a_severity_the_replay_lacks_is_a_config_error():
    with pytest.raises(ConfigError) as error:
        bench.simulate(synthetic_replay(n=200), bench.LoopConfig(items=4000, window=500, max_severity=3))
    assert error.value.field == "max_severity"


def test_the_schedule_ramps_from_clean_to_the_max():
    config = bench.LoopConfig(items=1000, window=100, shift_start=0.5, ramp=0.2, max_severity=4)
    level = bench.severity_schedule(config)
    assert (level[:500] == 0).all() and (level[700:] == 4).all()
    assert (np.diff(level) >= 0).all() and set(level[500:700]) == {1, 2, 3, 4}


def test_the_guard_escalates_a_flagged_accept_or_sends_it_to_review():
    from types import SimpleNamespace

    plan = SimpleNamespace(accept_threshold=0.9, review_threshold=0.5, vlm_accept_threshold=0.7)
    score = np.array([0.95, 0.95, 0.6, 0.6, 0.2])
    strong = np.array([0.8, 0.8, 0.8, 0.6, 0.9])
    flagged = np.array([False, True, False, True, True])
    service = bench.route(plan, score, strong, flagged)
    assert service.cheap_ok.tolist() == [True, False, False, False, False]
    assert service.asked.tolist() == [False, True, True, True, False]
    assert service.vlm_ok.tolist() == [False, True, True, False, False]
    uncovered = bench.route(plan, score, strong, flagged, flagged_to_review=True)
    assert uncovered.reviewed.tolist() == [False, True, False, True, True]
    # per item: from an alarm on (here the fourth item), flagged items go to review
    from_alarm = np.array([False, False, False, True, True])
    after_alarm = bench.route(plan, score, strong, flagged, flagged_to_review=from_alarm)
    assert after_alarm.reviewed.tolist() == [False, False, False, True, True]


def mixed_shift_replay(n: int = 1200, seed: int = 1) -> bench.Replay:
    """Level 1 shifts half the items: one input statistic 8 standard deviations away, the cheap
    tier at its usual confidence but wrong, the second tier confidently wrong half the time (as the
    textures LLaVA under noise: its stale accept threshold takes those answers); the other half
    are the clean items. A shifted window holds both, so its accepted error shows where its
    flagged items went."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    confidence = rng.uniform(0.4, 1.0, n)
    strong_wrong = rng.random(n) < 0.03
    cheap = _tier(rng, labels, confidence, rng.random(n) < confidence)
    strong = _tier(rng, labels, np.where(strong_wrong, 0.5, 0.95), ~strong_wrong)
    stats = rng.normal(0.0, 1.0, (n, 5))
    moved = rng.random(n) < 0.5
    cheap_shifted, strong_shifted, stats_shifted = cheap.copy(), strong.copy(), stats.copy()
    cheap_shifted[moved] = _tier(rng, labels[moved], confidence[moved], np.zeros(moved.sum(), bool))
    strong_shifted[moved] = _tier(
        rng, labels[moved], np.full(moved.sum(), 0.95), rng.random(moved.sum()) < 0.5
    )
    stats_shifted[moved, 2] += 8.0
    order = rng.permutation(n)
    third = n // 4
    return bench.Replay(
        np.stack([cheap, cheap_shifted]),
        np.stack([strong, strong_shifted]),
        np.stack([stats, stats_shifted]),
        labels,
        tuple(map(str, range(CLASSES))),
        order[:third],
        order[third : 2 * third],
        order[2 * third :],
        "mixed shift",
    )


# the shift at item 1,000 at once; the guard's per-request rule alone (its window rule would
# flag the clean half of a shifted window too)
MIXED = dataclasses.replace(
    CONFIG, items=2000, shift_start=0.5, ramp=0.0, guard_window=0, alarm_check_every=100
)


def test_a_drift_alarm_within_a_window_sends_the_rest_of_its_flagged_items_to_review():
    replay = mixed_shift_replay()
    at_end = bench.simulate(replay, dataclasses.replace(MIXED, alarm_check_every=MIXED.window))
    running = bench.simulate(replay, MIXED)
    first = int(MIXED.shift_start * MIXED.items) // MIXED.window
    before, after = at_end["windows"]["loop"][first], running["windows"]["loop"][first]
    # the running certificate covered the window's start; the alarm fired at the first check
    # (the guard flags about half the items) instead of at the window's end
    assert not after["flagged_to_review"] and not before["flagged_to_review"]
    assert before["drift_alarm_at_item"] == MIXED.window
    assert after["drift_alarm_at_item"] == MIXED.alarm_check_every
    assert before["accepted_error"] > MIXED.alpha  # the second tier's stale threshold at work
    assert after["accepted_error"] < before["accepted_error"]
    assert after["reviews"] > before["reviews"] and after["escalations"] < before["escalations"]
    # while the guard is quiet the running check changes nothing
    for old, new in zip(at_end["windows"]["loop"][:first], running["windows"]["loop"][:first]):
        if new["drift_alarm_at_item"] is None:
            assert {k: v for k, v in new.items() if k != "drift_alarm_at_item"} == {
                k: v for k, v in old.items() if k != "drift_alarm_at_item"
            }
    # the other arms route as before: static has no guard, static + guard escalates what it flags
    for policy in ("static", "static+guard"):
        assert at_end["windows"][policy] == running["windows"][policy]


def test_the_drift_alarm_fires_at_the_first_check_where_the_running_share_is_above_alarm_share():
    flagged = np.zeros(1000, bool)
    assert bench.alarm_position(flagged, 100) is None
    flagged[:5] = True  # 5 of the first 100: not above 5%
    assert bench.alarm_position(flagged, 100) is None
    flagged[5] = True
    assert bench.alarm_position(flagged, 100) == 100
    late = np.zeros(1000, bool)
    late[250:] = True  # 0 of 200, then 50 of 300
    assert bench.alarm_position(late, 100) == 300
    assert bench.alarm_position(late, 1000) == 1000  # checked at the window's end only
    tail = np.zeros(250, bool)
    tail[230:] = True  # a window that is no multiple of the check: its end is checked too
    assert bench.alarm_position(tail, 100) == 250
    with pytest.raises(ConfigError) as error:
        dataclasses.replace(CONFIG, alarm_check_every=0).check(levels=2)
    assert error.value.field == "alarm_check_every"
