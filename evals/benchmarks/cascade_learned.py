"""``bench cascade``'s learned-certified row (issue 22, item 4): a learned router certified with
the served VLM's answers, measured through a second service from the same build.

1. **The router** (``fit_learned_router``): ``RouterData`` from the example's own answers on
   its calibration and certification digits (``ExampleBuild.answers``: the cheap model's
   uncalibrated probabilities, the LLaVA's answers and its Platt-calibrated confidences, the
   uploads as rendered), fitted on the calibration digits and certified on the certification
   digits with ``calibrate_router`` at the build's alpha, delta and prices. The split is
   ``digits_vlm_split(seed)``'s, so the held-out digits stay unseen by the router, its
   calibrator and its reference index. The VLM accept threshold it certifies is on the same
   calibrated confidence the served VLM stage compares with it.
2. **The service** (``learned_serve_document``): the build's serve config with
   ``cascades.digits.router: {path: <artefact>}`` and the tier's calibration replaced by the
   router's calibrator (the router was fitted on it), carrying the fallback plan's certificate
   as ``calibrate --router`` writes it.
3. **The row** (``learned_row``): what that service did with the held-out digits, priced like
   the confidence-certified row plus the features' cost, counted in the cheap tier's cost: per
   item the ``router`` step's ``cost_units`` over the cheap step's (the service prices the
   features by their measured time over the cheap tier's, cascades/router_stage.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evals.benchmarks.cascade_rows import (
    CI_CONFIDENCE,
    PolicyRow,
    Prices,
    Records,
    _row,
    accepted_error,
    accepted_error_ci,
)

ROUTER_ARTEFACT, ROUTER_CALIBRATION = "digits-llava-router.json", "digits-llava-router-cheap-calibration.json"


@dataclass(frozen=True)
class LearnedRouter:
    router: Path  # the artefact (cascades.learned_router.RouterArtefact, JSON)
    calibration: Path  # the cheap tier's calibrator the router was fitted on, + the fallback certificate
    result: Any  # cascades.router_calibration.RouterCalibration

    @property
    def learned_plan(self) -> Any:
        return self.result.artefact.plans.learned


def router_data(build) -> tuple[Any, np.ndarray, np.ndarray]:
    """(``RouterData``, fit rows, certification rows) from the build's own answers."""
    from cascades.router_calibration import RouterData
    from examples.digits import digits_vlm_split, rendered
    from examples.train_digits import LABELS

    answers = build.answers
    missing = sorted(
        {"rows", "n_fit", "seed", "labels", "probabilities", "vlm_answers", "vlm_scores"} - set(answers)
    )
    if missing:
        raise ValueError(
            f"build.answers: missing {missing}; build the example with examples.digits.build_example"
        )
    split = digits_vlm_split(int(answers["seed"]))
    rows = np.asarray(answers["rows"])
    n, n_fit = len(rows), int(answers["n_fit"])
    data = RouterData(
        tuple(LABELS),
        np.asarray(answers["probabilities"], np.float64),
        np.asarray(answers["labels"], np.int64),
        np.asarray(answers["vlm_answers"], np.int64),
        np.asarray(answers["vlm_scores"], np.float64),
        rendered(split.images[rows]),
        "digits-llava",
        "the digits LLaVA's calibrated confidence (Platt on its logprob)",
    )
    return data, np.arange(n_fit), np.arange(n_fit, n)


def fit_learned_router(build, work_dir: Path, *, seed: int = 0) -> LearnedRouter:
    """Step 1 of the module docstring; writes both files into ``work_dir``."""
    from cascades.router_calibration import calibrate_router
    from policies.risk_control import TierCosts

    cert = build.plan.certificate
    costs = TierCosts(**build.certificate["three_tier"]["costs"])
    data, fit, certify = router_data(build)
    result = calibrate_router(
        data,
        fit,
        certify,
        np.arange(0),  # the held-out digits are the services' traffic, never the router's
        alpha=cert.alpha,
        delta=cert.delta,
        costs=costs,
        seed=seed,
    )
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    fallback = result.artefact.plans.fallback
    certificate = {  # as ``calibrate --router`` writes it: thresholds_from_certificate reads it
        **fallback.document["certificate"],
        "three_tier": fallback.document | {"costs": costs.model_dump()},
        "split": {**build.certificate["split"], **result.sizes},
        "router": result.artefact.sha256,
    }
    calibration = result.calibrator.with_certificate(certificate).save(work_dir / ROUTER_CALIBRATION)
    router = result.artefact.save(work_dir / ROUTER_ARTEFACT)
    return LearnedRouter(router, calibration, result)


def learned_serve_document(
    document: dict[str, Any], learned: LearnedRouter, *, task: str = "digits"
) -> dict[str, Any]:
    """Step 2: a copy of the build's serve document with the router and its calibrator."""
    import copy

    out = copy.deepcopy(document)
    cascade = out["applications"][0]["args"]["cascades"][task]
    cascade["router"] = {"path": str(learned.router)}
    cascade["tier"]["calibration"] = str(learned.calibration)
    cascade["policy"]["version"] = f"{cascade['policy']['version']}-learned-router"
    return out


def _feature_shares(records: Records) -> np.ndarray:
    cheap, router = records.step_costs["cheap"], records.step_costs["router"]
    return np.divide(router, cheap, out=np.zeros_like(router), where=cheap > 0)


def features_in_cheap_units(records: Records) -> float:
    """Mean per item of the router step's charged units over the cheap step's: the features'
    price as a share of the cheap tier's (0 where the cheap tier charged nothing)."""
    return float(_feature_shares(records).mean())


def features_in_cheap_units_median(records: Records) -> float:
    """The median of the same per-item shares: the service prices each request's features by
    its own timing, so a stalled request on a busy machine charges many times the typical."""
    return float(np.median(_feature_shares(records)))


def learned_row(records: Records, *, prices: Prices, service: Prices) -> PolicyRow:
    """Step 3: the learned-certified row, measured through its service."""
    served_cheap, served_vlm = records.path == "cheap", records.path == "vlm"
    return _row(
        "learned-certified",
        "service",
        records,
        w_cheap=served_cheap.astype(float),
        w_vlm=served_vlm.astype(float),
        vlm_called=records.escalated.astype(float),
        correct=(served_cheap | served_vlm) & (records.answer == records.label),
        prices=prices,
        service_prices=service,
        charged_per_1000=1000.0 * float(records.cost_units.sum()) / records.n,
        features_in_cheap_units=features_in_cheap_units(records),
    )


def accepted_error_figures(records: Records, *, alpha: float) -> dict[str, Any]:
    """The accepted error through the service against alpha, with its interval."""
    wrong, accepted = accepted_error(records)
    low, high = accepted_error_ci(wrong, accepted)
    return {
        "rate": wrong / accepted if accepted else math.nan,
        "errors": wrong,
        "accepted": accepted,
        "alpha": alpha,
        "ci": [low, high],
        "ci_confidence": CI_CONFIDENCE,
    }


def learned_figures(
    records: Records, learned: LearnedRouter, *, prices: Prices, service: Prices
) -> dict[str, Any]:
    """Everything the report and the JSON say about the learned row."""
    plan = learned.learned_plan
    cert = plan.document.get("certificate") or {}
    features_ms = np.array([r.router_features_ms for r in records.items], np.float64)
    scored = np.isfinite(features_ms)
    return {
        "row": learned_row(records, prices=prices, service=service),
        "accepted_error": accepted_error_figures(records, alpha=learned.result.artefact.plans.alpha)
        | {
            "certified_empirical": cert.get("empirical_risk", math.nan),
            "certified_upper_bound": cert.get("risk_upper_bound", math.nan),
        },
        "thresholds": {
            "accept": plan.accept_threshold,
            "escalate": plan.escalate_threshold,
            "vlm_accept": plan.vlm_accept_threshold,
        },
        "router_version": learned.result.artefact.sha256,
        "features": list(learned.result.artefact.spec.names),
        "features_in_cheap_units": features_in_cheap_units(records),
        "features_in_cheap_units_median": features_in_cheap_units_median(records),
        "features_ms_p50": float(np.median(features_ms[scored])) if scored.any() else math.nan,
        "fallback": int(records.router_fallback.sum()),
        "sizes": learned.result.sizes,
    }


def report_lines(figures: dict[str, Any]) -> list[str]:
    err = figures["accepted_error"]
    t = figures["thresholds"]
    return [
        "",
        f"  learned-certified: router {figures['router_version'][:12]} ({len(figures['features'])} features), "
        f"fitted on {figures['sizes']['fit']} calibration digits, certified on {figures['sizes']['certification']} "
        "with the served LLaVA's answers",
        f"    thresholds on the router's score: cheap accept >= {t['accept']:.4g}, review below {t['escalate']:.4g}, "
        f"VLM accept >= {t['vlm_accept'] if t['vlm_accept'] is None else format(t['vlm_accept'], '.4g')}",
        f"    features' cost {figures['features_in_cheap_units']:.3f} x the cheap tier's per item as charged "
        f"(median {figures.get('features_in_cheap_units_median', math.nan):.3f}; features p50 "
        f"{figures['features_ms_p50']:.2f} ms), counted in its cost/1000; fallback plan decided "
        f"{figures['fallback']} items",
        f"    accepted error through the service: {err['rate']:.4f} ({err['errors']} wrong of {err['accepted']}), "
        f"{err['ci_confidence']:.0%} CI [{err['ci'][0]:.4f}, {err['ci'][1]:.4f}] vs alpha {err['alpha']:g}; "
        f"certificate: empirical {err['certified_empirical']:.4f}, upper bound {err['certified_upper_bound']:.4f}",
    ]
