"""``bench cascade``'s learned-certified row (evals/benchmarks/cascade_learned.py), no servers:
the router fitted on the build's own answers, its serve document, the trace's ``router`` step
read into the records, and the row priced with the features' cost in the cheap tier's."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from evals.benchmarks.cascade import (
    NO_ANSWER,
    ItemRecord,
    Prices,
    Records,
    accepted_error,
    accepted_error_ci,
    format_report,
    latency_by_path,
    record_from_response,
    to_json,
)
from evals.benchmarks.cascade_learned import (
    features_in_cheap_units,
    features_in_cheap_units_median,
    fit_learned_router,
    learned_figures,
    learned_row,
    learned_serve_document,
    router_data,
)

PRICES = Prices(cheap=1.0, vlm=10.0, review=100.0)
SERVICE = Prices(cheap=1.0, vlm=0.0, review=1.0)


def learned_records(n: int = 300, seed: int = 0) -> list[ItemRecord]:
    """Items as a learned router's service answers them: router score -> cheap / VLM / review,
    the router step charged a measured share of the cheap tier's units, a few fallbacks."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = int(rng.integers(10))
        score = float(rng.uniform())
        fallback = i % 50 == 0
        path = "cheap" if score >= 0.7 else ("vlm" if score >= 0.2 else "review")
        right = rng.uniform() < (0.97 if path != "review" else 0.5)
        answer = NO_ANSWER if path == "review" else (label if right else (label + 1) % 10)
        router_units = 0.0 if fallback else float(rng.uniform(0.1, 0.3))
        out.append(
            ItemRecord(
                label=label,
                path=path,
                escalated=score < 0.7,
                answer=answer,
                cost_units=1.0 + router_units + (path == "review"),
                latency_ms=float(rng.uniform(40, 60)),
                cheap_answer=label,
                cheap_score=float(rng.uniform()),
                vlm_answer=label,
                vlm_score=0.9,
                vlm_source="service",
                cheap_cost_units=1.0,
                review_cost_units=1.0 if path == "review" else 0.0,
                router_score=math.nan if fallback else score,
                router_fallback=fallback,
                router_cost_units=router_units,
                router_features_ms=math.nan if fallback else 2.0,
            )
        )
    return out


def test_the_learned_row_is_what_its_service_did_plus_the_features_cost():
    records = Records(learned_records())
    row = learned_row(records, prices=PRICES, service=SERVICE)
    assert row.name == "learned-certified" and row.measured == "service"
    for path, share in (("cheap", "cheap"), ("vlm", "vlm"), ("review", "human")):
        assert row.share[share] == pytest.approx((records.path == path).mean())
    wrong, accepted = accepted_error(records)
    assert row.n_auto == accepted and row.accuracy == pytest.approx(1 - wrong / accepted)
    features = records.step_costs["router"].mean()  # the cheap tier charged 1 unit per item
    assert features_in_cheap_units(records) == pytest.approx(features) and features > 0
    assert features_in_cheap_units_median(records) == pytest.approx(np.median(records.step_costs["router"]))
    expected = (
        records.n * (1 + features) + 10 * records.escalated.sum() + 100 * (records.path == "review").sum()
    )
    assert row.cost_per_1000 == pytest.approx(1000 * expected / records.n)
    assert row.cost_per_1000_service == pytest.approx(1000 * records.cost_units.mean())  # as charged


def test_features_cost_nothing_where_the_cheap_tier_charged_nothing():
    items = [ItemRecord(**{**r.__dict__, "cheap_cost_units": 0.0}) for r in learned_records(20)]
    assert features_in_cheap_units(Records(items)) == 0.0


def test_the_accepted_error_interval_holds_the_rate_and_narrows_with_items():
    low, high = accepted_error_ci(3, 100)
    assert low < 0.03 < high
    wide = accepted_error_ci(30, 1000)
    assert high - low > wide[1] - wide[0]
    assert accepted_error_ci(0, 50)[0] == 0.0 and accepted_error_ci(0, 0) == (0.0, 1.0)


def _body(*, router: dict | None, policy_score: float) -> dict:
    steps = [
        {"stage": "onnx:digits", "score": 0.83, "cost_units": 1.0, "error": None, "details": {"label": "7"}},
    ]
    if router is not None:
        steps.append({"stage": "router", "cost_units": 0.2, "error": None, **router})
    steps.append({"stage": "policy:thresholds", "score": policy_score, "cost_units": 0.0, "details": {}})
    return {
        "decision": "accept",
        "answer": [{"label": "7", "confidence": 0.83}],
        "cost_units": 1.2,
        "trace": {"steps": steps},
    }


def test_the_router_step_is_read_from_the_trace():
    learned = _body(
        router={
            "score": 0.91,
            "details": {"applied": True, "fallback": False, "pricing": {"features_ms": 1.5}},
        },
        policy_score=0.91,
    )
    item = record_from_response(learned, 7, 12.0, "digits")
    assert item.path == "cheap" and item.answer == 7
    assert item.router_score == 0.91 and not item.router_fallback
    assert item.router_cost_units == 0.2 and item.router_features_ms == 1.5
    assert item.cheap_score == 0.83  # the cheap tier's own top-1, not the router's score
    fell_back = _body(
        router={"score": None, "details": {"applied": True, "fallback": True}}, policy_score=0.83
    )
    item = record_from_response(fell_back, 7, 12.0, "digits")
    assert item.router_fallback and math.isnan(item.router_score) and item.cheap_score == 0.83
    plain = record_from_response(_body(router=None, policy_score=0.83), 7, 12.0, "digits")
    assert math.isnan(plain.router_score) and plain.router_cost_units == 0.0 and plain.cheap_score == 0.83


@pytest.fixture(scope="module")
def build():
    """What ``build_example`` keeps, with synthetic answers on the real split's rows: a cheap
    tier right more often when confident, a VLM right 95% of the time, calibrated scores."""
    from examples.digits import digits_vlm_split
    from policies.risk_control import TierCosts

    split = digits_vlm_split(0)
    rows = np.concatenate([split.calibration, split.certification])
    labels = split.labels[rows]
    rng = np.random.default_rng(0)
    n = len(rows)
    logits = rng.normal(size=(n, 10))
    logits[np.arange(n), labels] += rng.uniform(0, 6, n)
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    right = rng.random(n) < 0.95
    return SimpleNamespace(
        plan=SimpleNamespace(certificate=SimpleNamespace(alpha=0.1, delta=0.1)),
        certificate={
            "three_tier": {"costs": TierCosts(cheap=1, escalate=10, review=100).model_dump()},
            "split": {"seed": 0},
        },
        answers={
            "rows": rows,
            "n_fit": len(split.calibration),
            "seed": 0,
            "labels": labels,
            "probabilities": probabilities,
            "vlm_answers": np.where(right, labels, (labels + 1) % 10),
            "vlm_scores": np.clip(np.where(right, rng.beta(8, 2, n), rng.beta(2, 4, n)), 0, 1),
        },
    )


def test_the_router_is_fitted_and_certified_on_the_builds_digits_only(build, tmp_path):
    from cascades.calibration import load_calibration
    from cascades.learned_router import RouterArtefact
    from examples.train_digits import LABELS

    learned = fit_learned_router(build, tmp_path)
    n_fit = build.answers["n_fit"]
    assert learned.result.sizes == {
        "fit": n_fit,
        "certification": len(build.answers["rows"]) - n_fit,
        "held_out": 0,  # the held-out digits are the services' traffic
    }
    artefact = RouterArtefact.load(learned.router, class_names=LABELS)
    assert artefact.sha256 == learned.result.artefact.sha256
    assert artefact.plans.alpha == 0.1 and artefact.plans.delta == 0.1
    assert {"nn_agreement", "brightness", "margin"} <= set(artefact.spec.names)  # every feature block
    certificate = load_calibration(learned.calibration).certificate
    assert certificate["router"] == artefact.sha256
    assert certificate["three_tier"]["costs"] == build.certificate["three_tier"]["costs"]


def test_router_data_needs_the_builds_answers(build):
    data, fit, certify = router_data(build)
    assert len(data.images) == len(data.labels) == len(fit) + len(certify)
    assert data.images[0].shape == (28, 28, 3)  # the uploads as rendered, what the service scores
    with pytest.raises(ValueError, match=r"build.answers: missing \['vlm_scores'\]"):
        router_data(SimpleNamespace(answers={k: v for k, v in build.answers.items() if k != "vlm_scores"}))


def test_the_learned_service_serves_the_router_with_its_calibrator():
    document = {
        "applications": [
            {
                "args": {
                    "cascades": {"digits": {"tier": {"calibration": "a.json"}, "policy": {"version": "v1"}}}
                }
            }
        ]
    }
    learned = SimpleNamespace(router="/w/router.json", calibration="/w/cal.json")
    out = learned_serve_document(document, learned)
    cascade = out["applications"][0]["args"]["cascades"]["digits"]
    assert cascade["router"] == {"path": "/w/router.json"} and cascade["tier"]["calibration"] == "/w/cal.json"
    assert document["applications"][0]["args"]["cascades"]["digits"]["tier"]["calibration"] == "a.json"


def test_the_report_and_json_carry_both_certified_rows(build, tmp_path):
    learned = fit_learned_router(build, tmp_path)
    records = Records(learned_records())
    part = learned_figures(records, learned, prices=PRICES, service=SERVICE)
    assert part["fallback"] == int(records.router_fallback.sum()) > 0
    assert (
        part["accepted_error"]["ci"][0] <= part["accepted_error"]["rate"] <= part["accepted_error"]["ci"][1]
    )
    base = learned_row(records, prices=PRICES, service=SERVICE)
    figures = {
        "n_items": records.n,
        "service_url": "http://127.0.0.1:1",
        "concurrency": 4,
        "vlm_model": "digits-llava",
        "vlm_model_version": "v",
        "thresholds": {"accept": 0.7, "review": 0.2, "vlm_accept": None},
        "prices": PRICES,
        "service_prices": SERVICE,
        "rows": [base.__class__(**{**base.__dict__, "name": "certified three-tier"}), part["row"]],
        "n_direct": 0,
        "replay_agreement": records.n,
        "accepted_error": {
            "rate": 0.01,
            "errors": 1,
            "accepted": 100,
            "alpha": 0.05,
            "delta": 0.1,
            "certified_empirical": 0.02,
            "certified_upper_bound": 0.045,
            "ci": [0.0003, 0.054],
            "ci_confidence": 0.95,
        },
        "latency": latency_by_path(records),
        "records": records,
        "learned": part,
        "learned_records": records,
    }
    report = format_report(figures)
    assert "certified three-tier" in report and "learned-certified" in report
    assert "95% CI [0.0003, 0.0540]" in report and "features' cost" in report
    document = json.loads(json.dumps(to_json(figures), default=float))
    assert document["learned"]["row"]["name"] == "learned-certified"
    scored = [item["router_score"] for item in document["items"]]
    assert len(scored) == records.n and any(isinstance(s, float) and 0 <= s <= 1 for s in scored)
