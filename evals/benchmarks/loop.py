"""The closed loop over time: ``visionroute bench loop`` (issue 23, "The figure").

A stream of items (default 50,000 digits) whose inputs shift mid-stream: a corruption's severity
ramps up from clean to ``--max-severity`` and stays there. The service answers about 14 items/s,
so the stream replays the tiers' recorded outputs instead: every held-out digit is run once
through the real cheap and second tiers (``evals.robustness_sets.digits_set``, ONNX) at every
severity of the corruption, with the shift guard's input statistics, and cached; a stream item
is a held-out digit drawn at random, at the severity in force at its position.

Every item goes through the same rules as the service: the three-tier plan (accept the cheap
answer, escalate to the second tier, review), the shift guard (``policies.shift_guard``: a
flagged would-be accept is escalated), the audit sampling of accepts at the audit fraction (the
label plan's, ``policies.recert_plan.plan_audit_fraction``), and the production certificate
(``policies.production_certify.certify_production_plan``: Horvitz-Thompson weighted, unlabelled
audits counted as errors). Reviewers have a known noise: a label is wrong (another class, at
random) with probability ``--reviewer-error``; an audit goes unlabelled with probability
``--nonresponse``. Three ways to run it, over the same stream:

- ``static``: the offline calibration (clean data) forever;
- ``static+guard``: the same, with the shift guard against the offline reference;
- ``loop``: the closed loop: after every window the plan is recertified from the reviews and
  audits of the last ``--label-windows`` windows (in the order they were queued) and, when the
  certificate is feasible, deployed for the next window together with a new input reference (the
  inputs it was certified on, so the guard now asks "unlike the data of this certificate?"); a
  drift alarm (the guard flags more than ``ALARM_SHARE`` of a window) raises the audit fraction
  ``--alarm-factor`` fold, within the audit budget, until the guard is quiet and a
  recertification has succeeded. The label window restarts whenever a window's inputs differ
  from the label window's before it (the guard with those inputs as its reference flags more
  than ``ALARM_SHARE``): older labels describe other inputs, and a certificate on a mixture
  holds for neither. From then until a recertification succeeds, no certificate covers the
  inputs the guard flags, the second tier's answers on them included: the loop sends them to
  review (the service's guard, as in ``static+guard``, escalates them). A refused or infeasible recertification leaves the
  running plan in place (as the service's job does); so does one on a label window that restarted
  in this very window (its inputs were still moving: the certificate would describe inputs
  already gone). A new certificate of the same inputs as the running plan replaces it only when
  it is cheaper on the label window (both plans on the same sampled items) or when the labels
  that arrived since the running plan was deployed put its accepted error above alpha
  (``--no-keep-incumbent``: every certificate replaces it). The first certificate of new inputs re-plans the loop's audit
  fraction (``plan_audit_fraction`` on its labels; ``--no-replan``: the clean pilot's stays).

Labels are not in cost/1000: an answered audit is a human label of an accepted item; the
``+labels`` column and the ``*_with_labels`` fields add them at the review cost.

The baseline for the cost after the shift: a calibration fitted on the shifted data (iid, the
same number of labels as the loop's last certificate used; ``evals.harness.calibrate``,
calibrator refitted), evaluated on the same settled post-shift items.

Not simulated: the rollout test between a recertified artefact and the replicas (shadow, canary,
promotion); here a certified artefact serves from the next window on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visionroute.errors import ConfigError

POLICIES = ("static", "static+guard", "loop")
PHASES = ("clean", "ramp", "relearning", "settled")
ALARM_SHARE = 0.05  # a window where the guard flags more than this is a drift alarm
REFERENCE_SIZE = 400  # input statistics kept per side (fit, held-out) for a refreshed reference


@dataclass(frozen=True)
class Replay:
    """The tiers' recorded outputs for each item at each severity (level 0: clean).

    ``cheap``/``strong``: (levels, n, C) class probabilities; ``stats``: (levels, n, 5) the shift
    guard's input statistics; ``labels``: (n,). ``fit_rows``/``certify_rows`` calibrate offline
    (clean); the stream draws from ``stream_rows``."""

    cheap: np.ndarray
    strong: np.ndarray
    stats: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    fit_rows: np.ndarray
    certify_rows: np.ndarray
    stream_rows: np.ndarray
    name: str = "replay"

    @property
    def levels(self) -> int:
        return self.cheap.shape[0]

    def tier_data(self, level: int):
        from evals.harness import TierData

        return TierData(self.cheap[level], self.strong[level], self.labels, self.class_names, [], self.name)


@dataclass(frozen=True)
class LoopConfig:
    items: int = 50_000
    window: int = 2_500
    shift_start: float = 0.4  # share of the stream before the severity starts to rise
    ramp: float = 0.1  # share of the stream over which it rises to max_severity
    max_severity: int = 5
    alpha: float = 0.1
    delta: float = 0.1
    reviewer_error: float = 0.01
    nonresponse: float = 0.02
    audit_fraction: float | None = None  # None: from the label plan
    audit_budget: float = 0.3  # the largest audit fraction reviewers can pay for
    alarm_factor: float = 3.0
    label_windows: int = 4
    keep_cheaper_incumbent: bool = True  # a new certificate replaces a still-certified, cheaper plan? no
    # the label plan again on the first certificate of new inputs (with audit_fraction None: a
    # configured fraction stays)
    replan_after_shift: bool = True
    false_alarm_rate: float = 0.01
    guard_window: int = 50
    guard_stride: int = 10  # the guard's window test is recomputed every this many items
    n_points: int = 30  # threshold quantiles per tier in recertification
    seed: int = 0
    costs: dict[str, float] = field(default_factory=lambda: {"cheap": 1.0, "escalate": 10.0, "review": 100.0})

    def check(self, levels: int) -> None:
        def bad(name: str, reason: str) -> ConfigError:
            return ConfigError(f"{name}: {reason}", field=name)

        if self.window < 100 or self.items < 4 * self.window:
            raise bad(
                "window",
                f"needs >= 100 items and >= 4 windows in the stream, got {self.window} of {self.items}",
            )
        if not (0 < self.shift_start and self.shift_start + self.ramp < 1 and self.ramp >= 0):
            raise bad("shift_start", "shift_start > 0, ramp >= 0 and shift_start + ramp < 1 are needed")
        if not 1 <= self.max_severity < levels:
            raise bad(
                "max_severity", f"must be in 1..{levels - 1} (the replay's levels), got {self.max_severity}"
            )
        for name in ("alpha", "delta"):
            if not 0 < getattr(self, name) < 1:
                raise bad(name, f"must be in (0, 1), got {getattr(self, name)}")
        for name in ("reviewer_error", "nonresponse"):
            if not 0 <= getattr(self, name) < 0.5:
                raise bad(name, f"must be in [0, 0.5), got {getattr(self, name)}")
        if self.audit_fraction is not None and not 0 < self.audit_fraction <= self.audit_budget:
            raise bad(
                "audit_fraction",
                f"must be in (0, audit_budget={self.audit_budget}], got {self.audit_fraction}",
            )
        if not 0 < self.audit_budget <= 1 or self.alarm_factor < 1 or self.label_windows < 1:
            raise bad(
                "audit_budget", "audit_budget in (0, 1], alarm_factor >= 1, label_windows >= 1 are needed"
            )


# --------------------------------------------------------------------------- the replay


def digits_replay(
    corruption: str = "gaussian_noise", *, seed: int = 0, cache_dir: Path | None = None
) -> Replay:
    """Both digits tiers on every pool digit at every severity of ``corruption`` (cached: the
    tiers run once per corruption, seed and model)."""
    from cascades.digits import CLASS_NAMES
    from evals.corruptions import SEVERITIES, corrupt_all, corruption_transform
    from evals.robustness_sets import digits_set
    from policies.certify import split_indices
    from policies.shift_guard import statistics_matrix
    from visionroute import paths

    corruption_transform(corruption, 1)  # an unknown name fails before any work
    image_set = digits_set(seed)
    models = "-".join(image_set.models[t]["sha256"][:12] for t in sorted(image_set.models))
    cache = (
        Path(cache_dir or paths.data_dir() / "bench-loop") / f"digits_{corruption}_seed{seed}_{models}.npz"
    )
    if cache.is_file():
        with np.load(cache) as npz:
            cheap, strong, stats = npz["cheap"], npz["strong"], npz["stats"]
    else:
        outputs, statistics = [], []
        for severity in (0, *SEVERITIES):
            images = (
                image_set.images
                if severity == 0
                else corrupt_all(image_set.images, corruption, severity, seed=seed)
            )
            outputs.append(image_set.predict(images))
            statistics.append(statistics_matrix(images))
        cheap = np.stack([c for c, _ in outputs])
        strong = np.stack([s for _, s in outputs])
        stats = np.stack(statistics)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, cheap=cheap, strong=strong, stats=stats)
    splits = split_indices(len(image_set), seed=seed, calibration_fraction=0.5)
    return Replay(
        cheap,
        strong,
        stats,
        np.asarray(image_set.labels),
        CLASS_NAMES,
        splits.fit,
        splits.certify,
        splits.test,
        f"{image_set.name}, {corruption}",
    )


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Routed:
    cheap_ok: np.ndarray
    asked: np.ndarray  # escalated to the second tier
    vlm_ok: np.ndarray
    reviewed: np.ndarray


def route(
    plan, score: np.ndarray, strong_score: np.ndarray, flagged: np.ndarray, *, flagged_to_review: bool = False
) -> Routed:
    """``TierPlan.decide`` / ``decide_vlm`` over arrays, after the guard (``guarded_decision``: a
    flagged would-be accept is escalated). ``flagged_to_review``: every flagged item goes to a
    human instead (no certificate covers its inputs, the second tier's answer included)."""
    would_accept = score >= plan.accept_threshold
    cheap_ok = would_accept & ~flagged
    asked = ~cheap_ok & ((score >= plan.review_threshold) | would_accept)
    if flagged_to_review:
        asked &= ~flagged
    vlm_t = plan.vlm_accept_threshold
    vlm_ok = asked if vlm_t is None else asked & (strong_score >= vlm_t)
    return Routed(cheap_ok, asked, vlm_ok, ~(cheap_ok | vlm_ok))


def severity_schedule(config: LoopConfig) -> np.ndarray:
    """The severity in force at each stream position: 0, a linear ramp, max_severity."""
    position = np.arange(config.items) / config.items
    progress = np.clip((position - config.shift_start) / max(config.ramp, 1e-12), 0.0, 1.0)
    level = np.ceil(progress * config.max_severity).astype(np.int64)
    return np.where(position < config.shift_start, 0, np.maximum(level, 1))


def phase_of(window: int, config: LoopConfig) -> str:
    start, end = window * config.window, (window + 1) * config.window
    shift = config.shift_start * config.items
    settled = (config.shift_start + config.ramp) * config.items
    if end <= shift:
        return "clean"
    if start < settled:
        return "ramp"
    if start < settled + config.label_windows * config.window:
        return "relearning"
    return "settled"


# --------------------------------------------------------------------------- the simulation


class _Stream:
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


def _guard(reference, config: LoopConfig):
    from policies.shift_guard import ShiftGuard

    return ShiftGuard(reference, false_alarm_rate=config.false_alarm_rate, window=config.guard_window)


def _flags(guard, stats: np.ndarray, start: int, stop: int, stride: int) -> np.ndarray:
    """The guard over items start..stop, its window already holding the inputs before ``start``."""
    lead = max(0, start - (guard.window - 1)) if guard.window else start
    flagged = guard.flags(stats[lead:stop], stride=stride)["shifted"]
    return flagged[start - lead :]


def _moved(stats: np.ndarray, first: int, start: int, stop: int, rng, config: LoopConfig) -> bool:
    """Do this window's inputs (start..stop) differ from the label window's before it
    (first..start)? The guard, with those earlier inputs as its reference, flags more than
    ``ALARM_SHARE`` of this window."""
    guard = _guard(_reference(stats[first:start], rng, "the label window"), config)
    return bool(_flags(guard, stats, start, stop, config.guard_stride).mean() > ALARM_SHARE)


def _reference(stats: np.ndarray, rng: np.random.Generator, source: str):
    from policies.shift_guard import InputReference

    order = rng.permutation(len(stats))[: 2 * REFERENCE_SIZE]
    half = len(order) // 2
    return InputReference.from_statistics(stats[order[:half]], stats[order[half:]], source=source)


def _queue(
    stream: _Stream, routed: Routed, fraction: float, start: int, stop: int, *, ask_labelled: bool = False
) -> dict[str, np.ndarray]:
    """The certification sample from items start..stop, in arrival order: every item whose audit
    coin came up (inclusion ``fraction``): accepts audited, reviews labelled anyway; the label
    judges both tiers' answers where they exist. ``ask_labelled``: the second tier is also asked on every
    queued item it did not see (the loop does: a candidate that escalates more than the deployed
    plan needs its answers there, or the worst case counts them wrong and the plan can never
    move back from review; the calls are in the loop's cost)."""
    s = slice(start, stop)
    accepted = ~routed.reviewed
    coin = stream.audit_draw[s] < fraction
    audited = accepted & coin
    # the certificate is computed on the uniformly sampled part only: a review joins it when its
    # audit coin came up, at the same inclusion probability (the other reviews would enter at
    # weight pi_min / 1 = the audit fraction, capping every bet on them at that fraction)
    queued = audited | (routed.reviewed & coin)
    label = stream.label[s].astype(np.float64)
    missing = audited & stream.unanswered[s]  # reviews answer by definition: the item waits for them
    cheap_error = np.where(missing, np.nan, (stream.cheap_pred[s] != label).astype(np.float64))
    seen = routed.asked | (queued if ask_labelled else False)
    strong_error = np.where(missing | ~seen, np.nan, (stream.strong_pred[s] != label).astype(np.float64))
    strong_score = np.where(seen, stream.strong_score[s], np.nan)
    pi = np.full(stop - start, fraction)
    keep = np.flatnonzero(queued)
    return {
        "score": stream.score[s][keep],
        "cheap_error": cheap_error[keep],
        "pi": pi[keep],
        "strong_error": strong_error[keep],
        "strong_score": strong_score[keep],
        "audits": int(audited.sum()),
        "audit_labels": int((audited & ~stream.unanswered[s]).sum()),
        "extra_calls": int((seen & ~routed.asked).sum()),
    }


def _sample(queues: list[dict], fractions: list[float]):
    """The windows' queues as one ``ProductionSample``, in the order they were queued."""
    from policies.production_certify import ProductionSample

    join = lambda key: np.concatenate([q[key] for q in queues])  # noqa: E731
    return ProductionSample(
        join("score"),
        join("cheap_error"),
        join("pi"),
        join("strong_error"),
        join("strong_score"),
        min_inclusion_probability=min(fractions),
    )


def _recertify(queues: list[dict], fractions: list[float], costs, config: LoopConfig, seed: int):
    """The production certificate on the last windows' queue; None when it refuses or is infeasible."""
    from policies.production_certify import TooFewLabels, certify_production_plan

    sample = _sample(queues, fractions)
    labelled = int((~(np.isnan(sample.cheap_error) & np.isnan(sample.strong_error))).sum())
    try:
        plan = certify_production_plan(
            sample, costs=costs, alpha=config.alpha, delta=config.delta, seed=seed, n_points=config.n_points
        )
    except TooFewLabels as refusal:
        return None, labelled, f"too few labels ({refusal.needed_more} more audit labels needed)"
    if not plan.certificate.is_feasible:
        return None, labelled, "infeasible (no candidate certified)"
    return plan, labelled, "certified"


def _keep_incumbent(
    incumbent, candidate, queues, fractions, queued_in, deployed_at: int, costs, config: LoopConfig
) -> tuple[bool, str]:
    """Keep the running plan instead of a new certificate of the same inputs? When it costs no
    more than the new plan on the label window (both on the same sampled items) and the labels that
    arrived since it was deployed put its accepted error (worst case: unknown is wrong) at most
    alpha; the guard watches its inputs. A new certificate is one draw of the front from a few
    hundred labels: deploying every one let the cost swing 26,000-86,000 per 1,000 between windows
    of the same inputs (seed 2, severity 4). Requiring the fresh labels to certify the running plan
    again was too strict (a certified plan sits near the edge: about half its fresh tests failed,
    p 0.16-0.76, at 0.04-0.05 accepted error); a one-sided test of "above alpha" at delta too lax
    (it kept the offline plan through the clean phase at 0.10-0.118: 42 of 357 wrong, p 0.15)."""
    from policies.recert_plan import check_plan

    fresh = [k for k, window in enumerate(queued_in) if window >= deployed_at]
    if not fresh:
        return False, "deployed: no labels since the running plan was deployed"
    since = check_plan(
        incumbent,
        _sample([queues[k] for k in fresh], [fractions[k] for k in fresh]),
        costs=costs,
        alpha=config.alpha,
        delta=config.delta,
    )
    if not since.accepted or since.wrong / since.accepted > config.alpha:
        return False, (
            f"deployed: the labels since put the running plan above alpha ({since.wrong} of "
            f"{since.accepted} accepts wrong or unknown)"
        )
    sample = _sample(queues, fractions)
    old = check_plan(incumbent, sample, costs=costs, alpha=config.alpha, delta=config.delta).cost_per_item
    new = check_plan(candidate, sample, costs=costs, alpha=config.alpha, delta=config.delta).cost_per_item
    if old > new:
        return (
            False,
            f"deployed: cheaper ({1000 * new:.0f} against {1000 * old:.0f} per 1000 on the label window)",
        )
    return True, (
        f"running plan kept: no dearer ({1000 * old:.0f} against {1000 * new:.0f} per 1000 on the label "
        f"window); {since.wrong} of its {since.accepted} accepts since wrong or unknown"
    )


def _plan_audit(sample, accepted, accepted_share: float, costs, config: LoopConfig):
    """``plan_audit_fraction`` for the three-tier plan within the audit budget: the clean
    pilot's plan and the shifted inputs' re-plan alike."""
    from policies.recert_plan import plan_audit_fraction

    return plan_audit_fraction(
        sample,
        alpha=config.alpha,
        delta=config.delta,
        items_per_day=config.window,
        review_budget_per_day=config.audit_budget * accepted_share * config.window,
        accepted=accepted,
        days=config.label_windows,
        nonresponse=config.nonresponse,
        plan="three_tier",
        costs=costs,
        reps=10,
        min_fraction=0.01,
        n_points=15,
        seed=config.seed,
    )


def _replanned_fraction(sample, plan, costs, config: LoopConfig, current: float):
    """The label plan (``plan_audit_fraction``) on the first certificate's labels of new inputs:
    the traffic it stands for is the shifted one, whose accepted share (and so audit labels a
    window) the clean pilot overstated. Falls back to ``current`` when the pilot is too thin."""
    from policies.certify import CertifyInputError

    labelled = ~np.isnan(sample.cheap_error)
    strong = np.where(np.isnan(sample.strong_score), -np.inf, sample.strong_score)
    routed = route(plan, sample.cheap_score, strong, np.zeros(len(sample), bool))
    accepted = ~routed.reviewed
    weight = 1.0 / sample.inclusion_probability
    accepted_share = float(weight[accepted].sum() / weight.sum())
    try:
        audit_plan = _plan_audit(sample, accepted, accepted_share, costs, config)
    except CertifyInputError as refusal:
        return current, {"refused": str(refusal), "labelled": int(labelled.sum())}
    fraction = audit_plan.audit_fraction if audit_plan.audit_fraction is not None else config.audit_budget
    return float(fraction), audit_plan.to_dict()


def _window_row(
    stream: _Stream, routed: Routed, flagged, costs, start: int, stop: int, *, extra_calls: int = 0
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
    stream = _Stream(replay, config, calibrator)
    rng = np.random.default_rng([config.seed, 7])
    offline_reference = _reference(
        np.concatenate([replay.stats[0, replay.fit_rows], replay.stats[0, replay.certify_rows]]),
        rng,
        "offline calibration images (clean)",
    )
    base_fraction, label_plan = _audit_fraction(replay, calibrator, static_plan, costs, config)
    alarm_fraction = min(config.audit_budget, config.alarm_factor * base_fraction)
    say(f"audit fraction {base_fraction:.3f} ({alarm_fraction:.3f} on a drift alarm)")

    n_windows = config.items // config.window
    windows: dict[str, list[dict[str, Any]]] = {p: [] for p in POLICIES}
    static_guard = _guard(offline_reference, config)
    loop_plan, loop_guard = static_plan, _guard(offline_reference, config)
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
                _flags(static_guard, stream.stats, start, stop, config.guard_stride),
            ),
        ):
            routed = route(plan, stream.score[s], stream.strong_score[s], flagged)
            queue = _queue(stream, routed, base_fraction, start, stop)
            row = _window_row(stream, routed, flagged, costs, start, stop)
            windows[name].append(
                common | row | {"audit_labels": queue["audit_labels"], "audit_fraction": base_fraction}
            )
        # the closed loop
        fraction = alarm_fraction if alarm else loop_fraction
        flagged = _flags(loop_guard, stream.stats, start, stop, config.guard_stride)
        routed = route(
            loop_plan, stream.score[s], stream.strong_score[s], flagged, flagged_to_review=not covered
        )
        queue = _queue(stream, routed, fraction, start, stop, ask_labelled=True)
        row = _window_row(stream, routed, flagged, costs, start, stop, extra_calls=queue["extra_calls"])
        drifting = bool(flagged.mean() > ALARM_SHARE)
        flagged_to_review = not covered
        restarted = bool(queues) and _moved(
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
        new_plan, labels, outcome = _recertify(queues, fractions, costs, config, seed=config.seed * 1000 + w)
        if restarted and new_plan is not None:
            # labels of one window whose inputs were still moving describe inputs already gone
            # (a ramp window certified on 101 labels at severities 1-3 ran at 0.17 on 4-5)
            new_plan, outcome = None, "certified, not deployed: the label window restarted (inputs moving)"
        kept = False
        if new_plan is not None and covered and config.keep_cheaper_incumbent:
            kept, why = _keep_incumbent(
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
                loop_fraction, replanned = _replanned_fraction(
                    _sample(queues, fractions), new_plan, costs, config, loop_fraction
                )
                replans.append({"window": w, "audit_fraction": loop_fraction, "label_plan": replanned})
            loop_plan = new_plan
            deployed_at = w + 1
            recertified += 1
            covered = True
            first = stop - len(queues) * config.window
            loop_guard = _guard(_reference(stream.stats[first:stop], rng, f"windows {first}..{stop}"), config)
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
                "label_window_restarted": restarted,
                "labels_in_certificate": labels,
                "plan": _plan_summary(loop_plan),
                "plan_certified_cost_per_1000": 1000 * float(loop_plan.expected_cost_units),
            }
        )
        say(
            f"window {w + 1}/{n_windows} ({phase}, severity {common['severity']}): loop accepted error "
            f"{row['accepted_error']:.3f}, cost/1000 {row['cost_per_1000']:.0f}"
            + f", recertification: {outcome}"
        )

    baseline = _shifted_baseline(replay, stream, config, costs, last_labels, windows["loop"])
    result = {
        "task": replay.name,
        "config": asdict(config),
        "alpha": config.alpha,
        "delta": config.delta,
        "audit_fraction": base_fraction,
        "alarm_audit_fraction": alarm_fraction,
        "label_plan": label_plan,
        "static_plan": _plan_summary(static_plan),
        "recertifications": recertified,
        "audit_fraction_replans": replans,
        "windows": windows,
        "phases": _phases(windows),
        "shifted_baseline": baseline,
    }
    result["targets"] = _targets(result, config)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _plan_summary(plan) -> dict[str, Any]:
    document = plan.to_dict()
    return {k: document[k] for k in ("accept_threshold", "review_threshold", "vlm_accept_threshold")}


def _audit_fraction(replay: Replay, calibrator, plan, costs, config: LoopConfig):
    """The label plan's audit fraction for the offline plan's traffic (the certify rows as the
    pilot: every item labelled, inclusion 1), within the budget; the configured one if set."""
    if config.audit_fraction is not None:
        return config.audit_fraction, None
    from policies.production_certify import ProductionSample

    rows = replay.certify_rows
    cheap, strong, labels = replay.cheap[0, rows], replay.strong[0, rows], replay.labels[rows]
    at = np.arange(len(rows))
    score = calibrator.calibrate_probabilities(cheap)[at, cheap.argmax(1)]
    strong_score = strong[at, strong.argmax(1)]
    routed = route(plan, score, strong_score, np.zeros(len(rows), bool))
    pilot = ProductionSample(
        score,
        (cheap.argmax(1) != labels).astype(float),
        np.ones(len(rows)),
        (strong.argmax(1) != labels).astype(float),
        strong_score,
    )
    accepted_share = float((~routed.reviewed).mean())
    audit_plan = _plan_audit(pilot, ~routed.reviewed, accepted_share, costs, config)
    fraction = audit_plan.audit_fraction if audit_plan.audit_fraction is not None else config.audit_budget
    return float(fraction), audit_plan.to_dict()


def _shifted_baseline(replay, stream, config, costs, labels, loop_windows) -> dict[str, Any]:
    """A calibration fitted on the shifted data (iid at max severity, as many labels as the
    loop's last certificate), on the settled items: its cost and accepted error."""
    from evals.harness import calibrate

    settled = [w for w in loop_windows if w["phase"] == "settled"]
    if not settled or not labels:
        return {"available": False, "reason": "no settled window, or no labels"}
    rng = np.random.default_rng([config.seed, 11])
    n_fit = max(20, labels // 2)
    fit = rng.choice(replay.fit_rows, n_fit)
    certify = rng.choice(replay.certify_rows, labels - n_fit)
    shifted = replay.tier_data(config.max_severity)
    rows = np.concatenate([fit, certify])
    # the same reviewers: their labels carry the same known noise
    labels_true = shifted.labels[rows]
    n_classes = len(shifted.class_names)
    flip = rng.random(len(rows)) < config.reviewer_error
    noisy = np.where(flip, (labels_true + rng.integers(1, n_classes, len(rows))) % n_classes, labels_true)
    data = dataclasses.replace(shifted.subset(rows), labels=noisy)
    calibration = calibrate(
        data,
        np.arange(n_fit),
        np.arange(n_fit, len(rows)),
        alpha=config.alpha,
        delta=config.delta,
        costs=costs,
    )
    start = settled[0]["start"]
    stop = settled[-1]["start"] + config.window
    s = slice(start, stop)
    cheap = replay.cheap[stream.level[s], stream.rows[s]]
    score = calibration.calibrator.calibrate_probabilities(cheap)[
        np.arange(stop - start), stream.cheap_pred[s]
    ]
    routed = route(calibration.plan, score, stream.strong_score[s], np.zeros(stop - start, bool))
    row = _window_row(stream, routed, np.zeros(1), costs, start, stop)
    loop_cost = float(np.mean([w["cost_per_1000"] for w in settled]))
    # with labels: the loop's audit labels in the settled windows; the baseline's labels, bought
    # once, spread over the same settled items
    loop_with_labels = loop_cost + _labels_per_1000(
        sum(w["audit_labels"] for w in settled), stop - start, config
    )
    baseline_with_labels = row["cost_per_1000"] + _labels_per_1000(labels, stop - start, config)
    return {
        "available": True,
        "labels": int(labels),
        "fit_labels": int(n_fit),
        "iid_from": "calibration rows at max severity (with replacement), labelled by the same noisy reviewers",
        "cost_per_1000": row["cost_per_1000"],
        "accepted_error": row["accepted_error"],
        "loop_cost_per_1000": loop_cost,
        "loop_cost_ratio": loop_cost / row["cost_per_1000"] if row["cost_per_1000"] else None,
        "labels_in_cost": "no: cost_per_1000 and the ratio leave labels out; the *_with_labels fields add them at the review cost",
        "cost_with_labels_per_1000": baseline_with_labels,
        "loop_cost_with_labels_per_1000": loop_with_labels,
        "loop_cost_ratio_with_labels": loop_with_labels / baseline_with_labels,
        "plan": _plan_summary(calibration.plan),
    }


def _phases(windows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for policy, rows in windows.items():
        out[policy] = {}
        for phase in PHASES:
            chosen = [r for r in rows if r["phase"] == phase]
            if not chosen:
                continue
            accepted = sum(r["accepted"] for r in chosen)
            errors = sum(r["accepted_errors"] for r in chosen)
            out[policy][phase] = {
                "windows": len(chosen),
                "cost_per_1000": float(np.mean([r["cost_per_1000"] for r in chosen])),
                "accepted_error": errors / accepted if accepted else 0.0,
                "worst_window_error": max(r["accepted_error"] for r in chosen),
                "windows_above_alpha": None,  # filled by _targets (needs alpha)
                "audit_labels": sum(r["audit_labels"] for r in chosen),
                "reviews": sum(r["reviews"] for r in chosen),
                "coverage": None,  # filled by _targets (needs the window size)
            }
    return out


def _labels_per_1000(labels: int, items: int, config: LoopConfig) -> float:
    """Audit labels as cost: each one is a human review of an item the plan accepted (the reviews
    the plan asks for are in cost/1000 already)."""
    return 1000 * config.costs["review"] * labels / items


def _targets(result: dict[str, Any], config: LoopConfig) -> dict[str, Any]:
    alpha = config.alpha
    for policy, rows in result["windows"].items():
        for phase, summary in result["phases"][policy].items():
            chosen = [r for r in rows if r["phase"] == phase]
            summary["windows_above_alpha"] = sum(r["accepted_error"] > alpha for r in chosen)
            summary["coverage"] = sum(r["accepted"] for r in chosen) / (len(chosen) * config.window)
            summary["cost_with_labels_per_1000"] = summary["cost_per_1000"] + _labels_per_1000(
                summary["audit_labels"], len(chosen) * config.window, config
            )
    loop = result["windows"]["loop"]
    above = [r["window"] for r in loop if r["accepted_error"] > alpha]
    shift_window = int(config.shift_start * config.items) // config.window
    lag_bound = int(np.ceil(config.ramp * config.items / config.window)) + config.label_windows
    late = [w for w in above if w < shift_window or w >= shift_window + lag_bound]
    baseline = result["shifted_baseline"]
    ratio = baseline.get("loop_cost_ratio") if baseline.get("available") else None
    return {
        "loop_windows_above_alpha": above,
        "lag_bound_windows": lag_bound,
        "lag_bound_meaning": (
            f"the windows from the shift's start through the ramp ({config.ramp:.0%} of the stream) and the "
            f"{config.label_windows} label windows a certificate of the shifted data needs; meanwhile the guard "
            "alone stands between the stale plan and the accepts"
        ),
        "accepted_error_within_alpha_outside_lag": not late,
        # the two sides apart: before the shift only the offline certificate (or the loop's
        # first recertifications) can break alpha; after it, the lag bound is the promise
        "windows_above_alpha_before_shift": [w for w in above if w < shift_window],
        "windows_above_alpha_after_lag": [w for w in above if w >= shift_window + lag_bound],
        "loop_cost_ratio_to_shifted_calibration": ratio,
        "cost_within_1_2x": None if ratio is None else bool(ratio <= 1.2),
    }


# --------------------------------------------------------------------------- output


def format_result(result: dict[str, Any]) -> str:
    config = result["config"]
    lines = [
        f"closed loop: {result['task']}, {config['items']} items in windows of {config['window']}, severity "
        f"0 -> {config['max_severity']} from {config['shift_start']:.0%} over {config['ramp']:.0%} of the stream; "
        f"alpha={result['alpha']}, delta={result['delta']}; reviewers wrong {config['reviewer_error']:.0%}, "
        f"audits unanswered {config['nonresponse']:.0%}; audit fraction {result['audit_fraction']:.3f} "
        f"({result['alarm_audit_fraction']:.3f} on a drift alarm); {result['seconds']} s",
        f"cost/1000 leaves the audit labels out; +labels adds each answered audit label at the review cost "
        f"({config['costs']['review']:g}; the reviews the plans ask for are in both)",
        f"{'policy':<13} {'phase':<11} {'windows':>7} {'cost/1000':>9} {'+labels':>7} {'acc.err':>7} {'worst':>6} "
        f"{'>alpha':>6} {'coverage':>8} {'audits':>7} {'reviews':>7}",
    ]
    for policy in POLICIES:
        for phase, row in result["phases"][policy].items():
            lines.append(
                f"{policy:<13} {phase:<11} {row['windows']:>7} {row['cost_per_1000']:>9.0f} "
                f"{row['cost_with_labels_per_1000']:>7.0f} "
                f"{row['accepted_error']:>7.3f} {row['worst_window_error']:>6.3f} {row['windows_above_alpha']:>6} "
                f"{row['coverage']:>8.1%} {row['audit_labels']:>7} {row['reviews']:>7}"
            )
    baseline, targets = result["shifted_baseline"], result["targets"]
    if baseline.get("available"):
        lines.append(
            f"calibration fitted on the shifted data ({baseline['labels']} iid labels): cost/1000 "
            f"{baseline['cost_per_1000']:.0f}, accepted error {baseline['accepted_error']:.3f}; the loop settled: "
            f"{baseline['loop_cost_per_1000']:.0f} ({baseline['loop_cost_ratio']:.2f}x; target <= 1.2x: "
            f"{'met' if targets['cost_within_1_2x'] else 'NOT met'}; labels not in cost). With labels at the "
            f"review cost (the baseline's spread over the settled items): {baseline['cost_with_labels_per_1000']:.0f} "
            f"against {baseline['loop_cost_with_labels_per_1000']:.0f} ({baseline['loop_cost_ratio_with_labels']:.2f}x)"
        )
    else:
        lines.append(f"calibration fitted on the shifted data: not available ({baseline['reason']})")
    lines.append(
        f"loop windows above alpha: {targets['loop_windows_above_alpha'] or 'none'}; lag bound "
        f"{targets['lag_bound_windows']} windows from the shift; outside it within alpha: "
        f"{'yes' if targets['accepted_error_within_alpha_outside_lag'] else 'NO'} (before the shift: "
        f"{targets['windows_above_alpha_before_shift'] or 'none'}; after the lag: "
        f"{targets['windows_above_alpha_after_lag'] or 'none'}); "
        f"recertifications: {result['recertifications']}"
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    from evals.plots import _pyplot, _save

    plt = _pyplot()
    config = result["config"]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for policy in POLICIES:
        rows = result["windows"][policy]
        x = [(r["start"] + config["window"]) / 1000 for r in rows]
        axes[0].plot(x, [r["cost_per_1000"] for r in rows], marker=".", label=policy)
        axes[1].plot(x, [r["accepted_error"] for r in rows], marker=".", label=policy)
        axes[2].plot(x, np.cumsum([r["audit_labels"] for r in rows]), marker=".", label=policy)
    baseline = result["shifted_baseline"]
    if baseline.get("available"):
        axes[0].axhline(
            baseline["cost_per_1000"], color="grey", linestyle=":", label="fitted on shifted data"
        )
    axes[1].axhline(result["alpha"], color="black", linestyle="--", label="alpha")
    shift = config["shift_start"] * config["items"] / 1000
    for ax in axes:
        ax.axvspan(shift, shift + config["ramp"] * config["items"] / 1000, color="tab:red", alpha=0.1)
    axes[0].set_ylabel("cost per 1000 items")
    axes[1].set_ylabel("accepted error")
    axes[2].set_ylabel("audit labels (cumulative)")
    axes[2].set_xlabel("stream items (thousands); shaded: the severity ramp")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    axes[0].set_title(f"closed loop: {result['task']}")
    return _save(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LoopConfig()
    parser.add_argument("--corruption", default="gaussian_noise", help="evals.corruptions name that ramps up")
    parser.add_argument("--items", type=int, default=d.items)
    parser.add_argument(
        "--window", type=int, default=d.window, help="items per window (recertified after each)"
    )
    parser.add_argument(
        "--shift-start", type=float, default=d.shift_start, help="share of the stream before the shift"
    )
    parser.add_argument("--ramp", type=float, default=d.ramp, help="share of the stream the ramp takes")
    parser.add_argument("--max-severity", type=int, default=d.max_severity)
    parser.add_argument("--alpha", type=float, default=d.alpha)
    parser.add_argument("--delta", type=float, default=d.delta)
    parser.add_argument("--reviewer-error", type=float, default=d.reviewer_error)
    parser.add_argument("--nonresponse", type=float, default=d.nonresponse, help="audits never labelled")
    parser.add_argument("--audit-fraction", type=float, default=None, help="default: the label plan's")
    parser.add_argument(
        "--audit-budget", type=float, default=d.audit_budget, help="the largest audit fraction"
    )
    parser.add_argument("--label-windows", type=int, default=d.label_windows)
    parser.add_argument(
        "--no-keep-incumbent",
        action="store_true",
        help="deploy every new certificate (default: keep a running plan that is still certified and no dearer)",
    )
    parser.add_argument(
        "--no-replan",
        action="store_true",
        help="keep the clean pilot's audit fraction after a shift (default: the label plan again on the shifted labels)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the stream, reviewers, audit coins and splits")
    parser.add_argument(
        "--replay-seed",
        type=int,
        default=None,
        help="the digits split the tiers' recorded outputs come from (default: --seed); reusing one "
        "skips the ~5 min tier replay for a new --seed",
    )
    parser.add_argument(
        "--out-dir", default=None, help="loop.json and loop.png (default: data dir/bench-loop)"
    )


def register(bench) -> None:
    parser = bench.add_parser(
        "loop", help="the closed loop under a mid-stream shift: cost/1000, accepted error, labels, per phase"
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from visionroute import paths

    config = LoopConfig(
        items=args.items,
        window=args.window,
        shift_start=args.shift_start,
        ramp=args.ramp,
        max_severity=args.max_severity,
        alpha=args.alpha,
        delta=args.delta,
        reviewer_error=args.reviewer_error,
        nonresponse=args.nonresponse,
        audit_fraction=args.audit_fraction,
        audit_budget=args.audit_budget,
        label_windows=args.label_windows,
        keep_cheaper_incumbent=not args.no_keep_incumbent,
        replan_after_shift=not args.no_replan,
        seed=args.seed,
    )
    started = time.perf_counter()
    replay_seed = args.seed if args.replay_seed is None else args.replay_seed
    replay = digits_replay(args.corruption, seed=replay_seed)
    replayed = time.perf_counter() - started
    result = simulate(replay, config, progress=lambda line: print(line, flush=True))
    result["replay_seconds"] = round(replayed, 1)
    result["replay_seed"] = replay_seed
    out = Path(args.out_dir or paths.data_dir() / "bench-loop")
    out.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(plot(result, out / "loop.png"))
    (out / "loop.json").write_text(json.dumps(result, indent=1, default=float))
    print(format_result(result))
    print(
        f"replay (tiers on every item and severity, cached) {replayed:.1f} s; plot {result['plot']}; JSON {out / 'loop.json'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
