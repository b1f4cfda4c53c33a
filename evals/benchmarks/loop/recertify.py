"""The closed loop's labels and certificates: the review queue a window fills, the production
certificate on the label window, the keep-the-running-plan rule and the label plan's audit
fraction."""

from __future__ import annotations

import numpy as np

from evals.benchmarks.loop.config import LoopConfig
from evals.benchmarks.loop.replay import Replay
from evals.benchmarks.loop.stream import Routed, Stream, route


def queue_window(
    stream: Stream, routed: Routed, fraction: float, start: int, stop: int, *, ask_labelled: bool = False
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


def production_sample(queues: list[dict], fractions: list[float]):
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


def recertify(queues: list[dict], fractions: list[float], costs, config: LoopConfig, seed: int):
    """The production certificate on the last windows' queue; None when it refuses or is infeasible."""
    from policies.production_certify import TooFewLabels, certify_production_plan

    sample = production_sample(queues, fractions)
    labelled = int((~(np.isnan(sample.cheap_error) & np.isnan(sample.strong_error))).sum())
    try:
        plan = certify_production_plan(
            sample,
            costs=costs,
            alpha=config.alpha,
            delta=config.certificate_delta,
            seed=seed,
            n_points=config.n_points,
            fit_share=config.fit_share,
        )
    except TooFewLabels as refusal:
        return None, labelled, f"too few labels ({refusal.needed_more} more audit labels needed)"
    if not plan.certificate.is_feasible:
        return None, labelled, "infeasible (no candidate certified)"
    return plan, labelled, "certified"


def keep_incumbent(
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
        production_sample([queues[k] for k in fresh], [fractions[k] for k in fresh]),
        costs=costs,
        alpha=config.alpha,
        delta=config.certificate_delta,
    )
    if not since.accepted or since.wrong / since.accepted > config.alpha:
        return False, (
            f"deployed: the labels since put the running plan above alpha ({since.wrong} of "
            f"{since.accepted} accepts wrong or unknown)"
        )
    sample = production_sample(queues, fractions)
    old = check_plan(
        incumbent, sample, costs=costs, alpha=config.alpha, delta=config.certificate_delta
    ).cost_per_item
    new = check_plan(
        candidate, sample, costs=costs, alpha=config.alpha, delta=config.certificate_delta
    ).cost_per_item
    if old > new:
        return (
            False,
            f"deployed: cheaper ({1000 * new:.0f} against {1000 * old:.0f} per 1000 on the label window)",
        )
    return True, (
        f"running plan kept: no dearer ({1000 * old:.0f} against {1000 * new:.0f} per 1000 on the label "
        f"window); {since.wrong} of its {since.accepted} accepts since wrong or unknown"
    )


def plan_audit(sample, accepted, accepted_share: float, costs, config: LoopConfig):
    """``plan_audit_fraction`` for the three-tier plan within the audit budget: the clean
    pilot's plan and the shifted inputs' re-plan alike."""
    from policies.recert_plan import plan_audit_fraction

    return plan_audit_fraction(
        sample,
        alpha=config.alpha,
        delta=config.certificate_delta,
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
        fit_share=config.fit_share,
    )


def replanned_fraction(sample, plan, costs, config: LoopConfig, current: float):
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
        audit_plan = plan_audit(sample, accepted, accepted_share, costs, config)
    except CertifyInputError as refusal:
        return current, {"refused": str(refusal), "labelled": int(labelled.sum())}
    fraction = audit_plan.audit_fraction if audit_plan.audit_fraction is not None else config.audit_budget
    return float(fraction), audit_plan.to_dict()


def pilot_audit_fraction(replay: Replay, calibrator, plan, costs, config: LoopConfig):
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
    audit_plan = plan_audit(pilot, ~routed.reviewed, accepted_share, costs, config)
    fraction = audit_plan.audit_fraction if audit_plan.audit_fraction is not None else config.audit_budget
    return float(fraction), audit_plan.to_dict()
