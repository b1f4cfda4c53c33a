"""Every policy over the same stream, window by window (the package docstring has the rules)."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np

from evals.benchmarks.loop.config import ALARM_SHARE, POLICIES, LoopConfig, phase_of
from evals.benchmarks.loop.recertify import (
    keep_incumbent,
    pilot_audit_fraction,
    production_sample,
    queue_window,
    recertify,
    replanned_fraction,
)
from evals.benchmarks.loop.replay import Replay
from evals.benchmarks.loop.stream import (
    Stream,
    alarm_position,
    guard_flags,
    input_reference,
    inputs_moved,
    make_guard,
    plan_summary,
    route,
    window_row,
)
from evals.benchmarks.loop.summary import check_targets, shifted_baseline, summarise_phases


def simulate(replay: Replay, config: LoopConfig, *, progress=None) -> dict[str, Any]:
    """Every policy over the same stream; per window and per phase (module docstring)."""
    from evals.harness import calibrate
    from policies.risk_control import TierCosts

    config.check(replay.levels)
    say = progress or (lambda _: None)
    started = time.perf_counter()
    costs = TierCosts(**config.costs)
    clean = replay.tier_data(0)
    offline = calibrate(
        clean, replay.fit_rows, replay.certify_rows, alpha=config.alpha, delta=config.delta, costs=costs
    )
    static_plan = offline.plan
    calibrator = offline.calibrator
    # the loop's first plan, the same calibration certified at the loop's level (every plan it
    # may deploy is certified at config.certificate_delta)
    first_loop_plan = (
        static_plan
        if config.certificate_delta == config.delta
        else calibrate(
            clean,
            replay.fit_rows,
            replay.certify_rows,
            alpha=config.alpha,
            delta=config.certificate_delta,
            costs=costs,
        ).plan
    )
    stream = Stream(replay, config, calibrator)
    rng = np.random.default_rng([config.seed, 7])
    offline_reference = input_reference(
        np.concatenate([replay.stats[0, replay.fit_rows], replay.stats[0, replay.certify_rows]]),
        rng,
        "offline calibration images (clean)",
    )
    base_fraction, label_plan = pilot_audit_fraction(replay, calibrator, first_loop_plan, costs, config)
    alarm_fraction = min(config.audit_budget, config.alarm_factor * base_fraction)
    say(f"audit fraction {base_fraction:.3f} ({alarm_fraction:.3f} on a drift alarm)")

    n_windows = config.items // config.window
    windows: dict[str, list[dict[str, Any]]] = {p: [] for p in POLICIES}
    static_guard = make_guard(offline_reference, config)
    loop_plan, loop_guard = first_loop_plan, make_guard(offline_reference, config)
    covered = True  # the running certificate was computed on inputs like the current ones
    queues: list[dict] = []
    fractions: list[float] = []
    queued_in: list[int] = []  # the window of each queue
    deployed_at = 0  # the first window the running plan served
    loop_fraction = base_fraction  # the loop's audit fraction without an alarm (re-planned after a shift)
    replans: list[dict[str, Any]] = []
    alarm, recertified, last_labels = False, 0, None
    for w in range(n_windows):
        start, stop = w * config.window, (w + 1) * config.window
        s = slice(start, stop)
        phase = phase_of(w, config)
        common = {"window": w, "start": start, "phase": phase, "severity": int(stream.level[stop - 1])}
        none = np.zeros(stop - start, bool)
        for name, plan, flagged in (
            ("static", static_plan, none),
            (
                "static+guard",
                static_plan,
                guard_flags(static_guard, stream.stats, start, stop, config.guard_stride),
            ),
        ):
            routed = route(plan, stream.score[s], stream.strong_score[s], flagged)
            queue = queue_window(stream, routed, base_fraction, start, stop)
            row = window_row(stream, routed, flagged, costs, start, stop)
            windows[name].append(
                common | row | {"audit_labels": queue["audit_labels"], "audit_fraction": base_fraction}
            )
        # the closed loop
        fraction = alarm_fraction if alarm else loop_fraction
        flagged = guard_flags(loop_guard, stream.stats, start, stop, config.guard_stride)
        # the drift alarm on the running count: once it fires, the running certificate no longer
        # covers the inputs, and the rest of the window's flagged items go to review at once (at
        # the window's end only, the second tier's stale threshold accepted them meanwhile:
        # textures window 8 at 0.34)
        alarm_at = alarm_position(flagged, config.alarm_check_every)
        to_review = np.full(stop - start, not covered)
        if alarm_at is not None:
            to_review[alarm_at:] = True
        routed = route(
            loop_plan, stream.score[s], stream.strong_score[s], flagged, flagged_to_review=to_review
        )
        queue = queue_window(stream, routed, fraction, start, stop, ask_labelled=True)
        row = window_row(stream, routed, flagged, costs, start, stop, extra_calls=queue["extra_calls"])
        drifting = bool(flagged.mean() > ALARM_SHARE)
        flagged_to_review = not covered
        restarted = bool(queues) and inputs_moved(
            stream.stats, start - len(queues) * config.window, start, stop, rng, config
        )
        if restarted:
            # the labels before describe other inputs than this window's
            queues, fractions, queued_in = [], [], []
            covered = False  # nor does the running certificate: flagged inputs go to review until one does
        queues, fractions, queued_in = (
            (queues + [queue])[-config.label_windows :],
            (fractions + [fraction])[-config.label_windows :],
            (queued_in + [w])[-config.label_windows :],
        )
        new_plan, labels, outcome = recertify(queues, fractions, costs, config, seed=config.seed * 1000 + w)
        if restarted and new_plan is not None:
            # labels of one window whose inputs were still moving describe inputs already gone
            # (a ramp window certified on 101 labels at severities 1-3 ran at 0.17 on 4-5)
            new_plan, outcome = None, "certified, not deployed: the label window restarted (inputs moving)"
        kept = False
        if new_plan is not None and covered and config.keep_cheaper_incumbent:
            kept, why = keep_incumbent(
                loop_plan, new_plan, queues, fractions, queued_in, deployed_at, costs, config
            )
            outcome = f"certified; {why}"
            if kept:
                new_plan = None
        # the alarm (and the raised audit fraction) holds until the guard is quiet and a
        # certificate of the new inputs exists
        alarm = drifting or (alarm and new_plan is None and not kept)
        last_labels = labels
        if new_plan is not None:
            if not covered and config.replan_after_shift and config.audit_fraction is None:
                # the first certificate of new inputs: the label plan again, on their labels
                loop_fraction, replanned = replanned_fraction(
                    production_sample(queues, fractions), new_plan, costs, config, loop_fraction
                )
                replans.append({"window": w, "audit_fraction": loop_fraction, "label_plan": replanned})
            loop_plan = new_plan
            deployed_at = w + 1
            recertified += 1
            covered = True
            first = stop - len(queues) * config.window
            loop_guard = make_guard(
                input_reference(stream.stats[first:stop], rng, f"windows {first}..{stop}"), config
            )
        windows["loop"].append(
            common
            | row
            | {
                "audit_labels": queue["audit_labels"],
                "audit_fraction": fraction,
                "drift_alarm": alarm,
                "recertified": new_plan is not None,
                "recertification": outcome,
                "flagged_to_review": flagged_to_review,
                # the item (in the window) from which the drift alarm held on the running count
                "drift_alarm_at_item": alarm_at,
                "label_window_restarted": restarted,
                "labels_in_certificate": labels,
                "plan": plan_summary(loop_plan),
                "plan_certified_cost_per_1000": 1000 * float(loop_plan.expected_cost_units),
            }
        )
        say(
            f"window {w + 1}/{n_windows} ({phase}, severity {common['severity']}): loop accepted error "
            f"{row['accepted_error']:.3f}, cost/1000 {row['cost_per_1000']:.0f}"
            + f", recertification: {outcome}"
        )

    baseline = shifted_baseline(replay, stream, config, costs, last_labels, windows["loop"])
    result = {
        "task": replay.name,
        "config": asdict(config),
        "alpha": config.alpha,
        "delta": config.delta,
        "certificate_delta": config.certificate_delta,
        "loop_first_plan": plan_summary(first_loop_plan),
        "audit_fraction": base_fraction,
        "alarm_audit_fraction": alarm_fraction,
        "label_plan": label_plan,
        "static_plan": plan_summary(static_plan),
        "recertifications": recertified,
        "audit_fraction_replans": replans,
        "windows": windows,
        "phases": summarise_phases(windows),
        "shifted_baseline": baseline,
    }
    result["targets"] = check_targets(result, config)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
