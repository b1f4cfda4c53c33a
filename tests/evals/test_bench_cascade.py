"""``visionroute bench cascade``'s arithmetic (evals/benchmarks/cascade.py), no servers: the
policy table from per-item records. The run itself (vLLM, Ray Serve) is a benchmark, not a test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evals.benchmarks.cascade import (
    NO_ANSWER,
    ItemRecord,
    Prices,
    Records,
    accepted_error,
    format_report,
    latency_by_path,
    plot_frontier,
    policy_rows,
    replay_agreement,
    service_prices,
    to_json,
)
from policies.risk_control import RiskCertificate, TierPlan

PRICES = Prices(cheap=1.0, vlm=10.0, review=100.0)
SERVICE = Prices(cheap=1.0, vlm=0.0, review=1.0)
ACCEPT = 0.9


def synthetic_records(n: int = 400, seed: int = 0) -> list[ItemRecord]:
    """A cascade's items: the cheap tier right more often when confident, the VLM right 95% of
    the time (a few invalid answers), routed by ACCEPT / review below 0.3 / VLM accept >= 0.6."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = int(rng.integers(10))
        score = float(rng.uniform(0, 1))
        cheap = label if rng.uniform() < 0.4 + 0.6 * score else (label + 1) % 10
        vlm_valid = rng.uniform() > 0.02
        vlm = (label if rng.uniform() < 0.95 else (label + 2) % 10) if vlm_valid else NO_ANSWER
        vlm_score = float(rng.uniform(0.3, 1)) if vlm_valid else math.nan
        escalated = 0.3 <= score < ACCEPT
        if score >= ACCEPT:
            path, answer = "cheap", cheap
        elif escalated and vlm_valid and vlm_score >= 0.6:
            path, answer = "vlm", vlm
        else:
            path, answer = "review", NO_ANSWER
        out.append(
            ItemRecord(
                label=label,
                path=path,
                escalated=escalated,
                answer=answer,
                cost_units=1.0 + (path == "review") * 1.0,
                latency_ms={"cheap": 50.0, "vlm": 400.0, "review": 80.0}[path] + float(rng.uniform(0, 10)),
                cheap_answer=cheap,
                cheap_score=score,
                vlm_answer=vlm,
                vlm_score=vlm_score,
                vlm_source="service" if escalated else "direct",
                cheap_cost_units=1.0,
                vlm_cost_units=0.0,
                review_cost_units=1.0 if path == "review" else 0.0,
            )
        )
    return out


@pytest.fixture(scope="module")
def records() -> Records:
    return Records(synthetic_records())


@pytest.fixture(scope="module")
def rows(records):
    return {
        row.name.split(" (")[0]: row
        for row in policy_rows(records, accept_threshold=ACCEPT, prices=PRICES, service=SERVICE)
    }


def test_cheap_only_and_vlm_only_count_every_item_once(records, rows):
    n = records.n
    cheap = rows["cheap only"]
    assert cheap.cost_per_1000 == pytest.approx(1000 * PRICES.cheap)  # n * cheap cost, per 1000
    assert cheap.share == {"cheap": 1.0, "vlm": 0.0, "human": 0.0}
    assert cheap.accuracy == pytest.approx(records.cheap_ok.mean())
    vlm = rows["VLM only"]
    invalid = int((~records.vlm_valid).sum())
    assert invalid > 0  # the synthetic VLM sometimes gives no valid answer: a human takes it
    assert vlm.share["human"] == pytest.approx(invalid / n)
    assert vlm.cost_per_1000 == pytest.approx(1000 * (n * PRICES.vlm + invalid * PRICES.review) / n)
    assert vlm.accuracy == pytest.approx(records.vlm_ok.sum() / records.vlm_valid.sum())


def test_the_oracle_is_right_on_everything_it_answers_and_no_policy_beats_it(rows, records):
    oracle = rows["oracle router"]
    assert oracle.accuracy == 1.0
    assert all(row.accuracy <= oracle.accuracy for row in rows.values())
    # it sends to a human exactly the items both tiers get wrong
    both_wrong = (~records.cheap_ok & ~records.vlm_ok).mean()
    assert oracle.share["human"] == pytest.approx(both_wrong)
    assert oracle.vlm_call_share == pytest.approx(oracle.share["vlm"])


def test_cheap_then_vlm_uses_the_cheap_threshold_only(rows, records):
    row = rows["cheap -> VLM by confidence"]
    confident = records.cheap_score >= ACCEPT
    assert row.share["cheap"] == pytest.approx(confident.mean())
    assert row.vlm_call_share == pytest.approx((~confident).mean())
    right = (confident & records.cheap_ok) | (~confident & records.vlm_ok)
    answered = confident | records.vlm_valid
    assert row.accuracy == pytest.approx(right.sum() / answered.sum())


def test_the_certified_row_is_what_the_service_did(rows, records):
    row = rows["certified three-tier"]
    assert row.measured == "service"
    for path, share in (("cheap", "cheap"), ("vlm", "vlm"), ("review", "human")):
        assert row.share[share] == pytest.approx((records.path == path).mean())
    wrong, accepted = accepted_error(records)
    assert row.n_auto == accepted and row.accuracy == pytest.approx(1 - wrong / accepted)
    # certificate prices: every item the cheap tier, each VLM call, each review
    expected = records.n + 10 * records.escalated.sum() + 100 * (records.path == "review").sum()
    assert row.cost_per_1000 == pytest.approx(1000 * expected / records.n)
    # service units: as charged, the sum of the responses' cost_units
    assert row.cost_per_1000_service == pytest.approx(1000 * records.cost_units.mean())


def test_random_routing_is_the_expectation_at_the_service_vlm_share(rows, records):
    s = records.escalated.mean()
    row = next(r for name, r in rows.items() if name.startswith("random routing"))
    assert row.vlm_call_share == pytest.approx(s)
    expected_right = (1 - s) * records.cheap_ok.sum() + s * records.vlm_ok.sum()
    expected_auto = (1 - s) * records.n + s * records.vlm_valid.sum()
    assert row.accuracy == pytest.approx(expected_right / expected_auto)
    for r in rows.values():
        assert sum(r.share.values()) == pytest.approx(1.0)


def test_service_prices_latency_and_replay_come_from_the_records(records):
    assert service_prices(records, review_default=7.0) == Prices(cheap=1.0, vlm=0.0, review=1.0)
    latency = latency_by_path(records)
    assert latency["vlm"]["p50_ms"] > latency["review"]["p50_ms"] > latency["cheap"]["p50_ms"]
    assert sum(f["n"] for f in latency.values()) == records.n
    certificate = RiskCertificate(0.05, 0.1, 100, ACCEPT, 0.5, 50, 1, 0.02, 0.045, 0.01, "binomial", 10, 3)
    plan = TierPlan(ACCEPT, 0.3, 0.0, {}, certificate, vlm_accept_threshold=0.6)
    assert replay_agreement(records, plan) == records.n
    stricter = TierPlan(ACCEPT, 0.3, 0.0, {}, certificate, vlm_accept_threshold=0.8)
    assert replay_agreement(records, stricter) < records.n


def test_bad_records_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="records: need at least one"):
        Records([])
    bad = synthetic_records(3)[0]
    with pytest.raises(ValueError, match="path must be one of"):
        Records([ItemRecord(**{**bad.__dict__, "path": "human"})])


def test_the_report_plot_and_json_carry_every_row(records, rows, tmp_path):
    figures = {
        "n_items": records.n,
        "service_url": "http://127.0.0.1:1",
        "concurrency": 4,
        "vlm_model": "digits-llava",
        "vlm_model_version": "v",
        "thresholds": {"accept": ACCEPT, "review": 0.3, "vlm_accept": None},
        "prices": PRICES,
        "service_prices": SERVICE,
        "rows": list(rows.values()),
        "n_direct": int((~records.escalated).sum()),
        "replay_agreement": records.n,
        "accepted_error": {
            "rate": 0.01,
            "errors": 1,
            "accepted": 100,
            "alpha": 0.05,
            "delta": 0.1,
            "certified_empirical": 0.02,
            "certified_upper_bound": 0.045,
        },
        "latency": latency_by_path(records),
        "records": records,
    }
    report = format_report(figures)
    assert all(row.name in report for row in rows.values())
    assert "cheap-accepted" in report and "VLM-answered" in report and "any answer" in report
    png = plot_frontier(tmp_path / "frontier.png", records, list(rows.values()), PRICES)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads(json.dumps(to_json(figures), default=float))
    assert len(document["items"]) == records.n and len(document["rows"]) == 6
