"""The stream's items (drawn once for every policy), the routing rule over arrays, the shift
guard over a window, and one window's row of the table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from evals.benchmarks.loop.config import ALARM_SHARE, REFERENCE_SIZE, LoopConfig, severity_schedule
from evals.benchmarks.loop.replay import Replay


@dataclass(frozen=True)
class Routed:
    cheap_ok: np.ndarray
    asked: np.ndarray  # escalated to the second tier
    vlm_ok: np.ndarray
    reviewed: np.ndarray


def route(
    plan,
    score: np.ndarray,
    strong_score: np.ndarray,
    flagged: np.ndarray,
    *,
    flagged_to_review: bool | np.ndarray = False,
) -> Routed:
    """``TierPlan.decide`` / ``decide_vlm`` over arrays, after the guard (``guarded_decision``: a
    flagged would-be accept is escalated). ``flagged_to_review`` (for every item, or per item):
    a flagged item goes to a human instead (no certificate covers its inputs, the second tier's
    answer included)."""
    would_accept = score >= plan.accept_threshold
    cheap_ok = would_accept & ~flagged
    asked = ~cheap_ok & ((score >= plan.review_threshold) | would_accept)
    asked &= ~(flagged & flagged_to_review)
    vlm_t = plan.vlm_accept_threshold
    vlm_ok = asked if vlm_t is None else asked & (strong_score >= vlm_t)
    return Routed(cheap_ok, asked, vlm_ok, ~(cheap_ok | vlm_ok))


class Stream:
    """The stream's items, their recorded outputs and the truth, drawn once for every policy."""

    def __init__(self, replay: Replay, config: LoopConfig, calibrator) -> None:
        rng = np.random.default_rng([config.seed, 23])
        self.rows = rng.choice(replay.stream_rows, config.items)
        self.level = severity_schedule(config)
        cheap = replay.cheap[self.level, self.rows]
        strong = replay.strong[self.level, self.rows]
        at = np.arange(config.items)
        self.cheap_pred = cheap.argmax(1)
        self.score = calibrator.calibrate_probabilities(cheap)[at, self.cheap_pred]
        self.strong_pred = strong.argmax(1)
        self.strong_score = strong[at, self.strong_pred]
        self.truth = replay.labels[self.rows]
        self.stats = replay.stats[self.level, self.rows]
        # the reviewers: wrong with a known probability (another class at random); audits unanswered
        n_classes = cheap.shape[1]
        wrong_label = rng.random(config.items) < config.reviewer_error
        other = (self.truth + rng.integers(1, n_classes, config.items)) % n_classes
        self.label = np.where(wrong_label, other, self.truth)
        self.unanswered = rng.random(config.items) < config.nonresponse
        self.audit_draw = rng.random(config.items)  # item i is audited when draw < its fraction


def make_guard(reference, config: LoopConfig):
    from policies.shift_guard import ShiftGuard

    return ShiftGuard(reference, false_alarm_rate=config.false_alarm_rate, window=config.guard_window)


def guard_flags(guard, stats: np.ndarray, start: int, stop: int, stride: int) -> np.ndarray:
    """The guard over items start..stop, its window already holding the inputs before ``start``."""
    lead = max(0, start - (guard.window - 1)) if guard.window else start
    flagged = guard.flags(stats[lead:stop], stride=stride)["shifted"]
    return flagged[start - lead :]


def alarm_position(flagged: np.ndarray, every: int) -> int | None:
    """The drift alarm on the running count of a window's items: the first check (after every
    ``every`` items, and at the window's end) at which the guard has flagged more than
    ``ALARM_SHARE`` of the items so far; None when it never fires. The last check is the
    end-of-window rule, so a window that alarms at its end alarms here too, at the latest there.
    Items from the returned position on come after the alarm."""
    n = len(flagged)
    if not n:
        return None
    checks = np.unique(np.append(np.arange(every, n + 1, every), n))
    share = np.cumsum(flagged)[checks - 1] / checks
    fired = np.flatnonzero(share > ALARM_SHARE)
    return int(checks[fired[0]]) if len(fired) else None


def inputs_moved(stats: np.ndarray, first: int, start: int, stop: int, rng, config: LoopConfig) -> bool:
    """Do this window's inputs (start..stop) differ from the label window's before it
    (first..start)? The guard, with those earlier inputs as its reference, flags more than
    ``ALARM_SHARE`` of this window."""
    guard = make_guard(input_reference(stats[first:start], rng, "the label window"), config)
    return bool(guard_flags(guard, stats, start, stop, config.guard_stride).mean() > ALARM_SHARE)


def input_reference(stats: np.ndarray, rng: np.random.Generator, source: str):
    from policies.shift_guard import InputReference

    order = rng.permutation(len(stats))[: 2 * REFERENCE_SIZE]
    half = len(order) // 2
    return InputReference.from_statistics(stats[order[:half]], stats[order[half:]], source=source)


def window_row(
    stream: Stream, routed: Routed, flagged, costs, start: int, stop: int, *, extra_calls: int = 0
) -> dict[str, Any]:
    s = slice(start, stop)
    n = stop - start
    auto = routed.cheap_ok | routed.vlm_ok
    wrong = (routed.cheap_ok & (stream.cheap_pred[s] != stream.truth[s])) | (
        routed.vlm_ok & (stream.strong_pred[s] != stream.truth[s])
    )
    calls = routed.asked.sum() + extra_calls
    cost = costs.cheap * n + costs.escalate * calls + costs.review * routed.reviewed.sum()
    return {
        "accepted": int(auto.sum()),
        "accepted_errors": int(wrong.sum()),
        "accepted_error": float(wrong.sum() / auto.sum()) if auto.any() else 0.0,
        "cost_per_1000": float(1000 * cost / n),
        "cost_units": float(cost),
        "reviews": int(routed.reviewed.sum()),
        "escalations": int(routed.asked.sum()),
        "guard_flagged": float(flagged.mean()),
    }


def plan_summary(plan) -> dict[str, Any]:
    document = plan.to_dict()
    return {k: document[k] for k in ("accept_threshold", "review_threshold", "vlm_accept_threshold")}
