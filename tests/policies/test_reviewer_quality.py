"""Reviewer error rates from double labels and audit agreement (issue 23): simulated reviewers of
known noise; the noisy one is flagged, careful ones are not, and recertification leaves a flagged
reviewer's labels out (as non-response)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from policies.review.double_labels import JudgedLabel
from policies.reviewer_quality import flagged_reviewers, reviewer_quality

CLASSES = [f"c{i}" for i in range(10)]
ERROR_RATES = {"ann": 0.02, "bob": 0.02, "noisy": 0.3}


def said(truth: str, error_rate: float, rng) -> dict:
    wrong = rng.random() < error_rate
    answer = rng.choice([c for c in CLASSES if c != truth]) if wrong else truth
    return {"verdict": "correct", "label": str(answer), "boxes": None}


def simulate(n_double: int = 450, n_audit: int = 300, seed: int = 0) -> list[JudgedLabel]:
    """Double-labelled items (random pairs; a disagreement is adjudicated with the truth) and
    single audit labels of accepts that are wrong 3% of the time."""
    rng = np.random.default_rng(seed)
    labels = []
    for i in range(n_double):
        truth = str(rng.choice(CLASSES))
        pair = rng.choice(list(ERROR_RATES), 2, replace=False)
        given = [said(truth, ERROR_RATES[r], rng) for r in pair]
        agree = given[0]["label"] == given[1]["label"]
        final = given[1] if agree else {"verdict": "correct", "label": truth, "boxes": None}
        common = dict(item_id=f"d{i}", kind="review", proposed=[{"label": "c0"}], final=final, disputed=False)
        for reviewer, role, label in zip(pair, ("first", "second"), given, strict=True):
            labels.append(
                JudgedLabel(reviewer=str(reviewer), role=role, label=label, adjudicated=not agree, **common)
            )
        if not agree:
            labels.append(
                JudgedLabel(reviewer="root", role="adjudication", label=final, adjudicated=True, **common)
            )
    for i in range(n_audit):
        truth = str(rng.choice(CLASSES))
        proposed = truth if rng.random() > 0.03 else str(rng.choice([c for c in CLASSES if c != truth]))
        reviewer = str(rng.choice(list(ERROR_RATES)))
        label = said(truth, ERROR_RATES[reviewer], rng)
        if label["label"] == proposed:
            label = {"verdict": "confirm", "label": proposed, "boxes": None}
        labels.append(
            JudgedLabel(
                item_id=f"a{i}",
                reviewer=reviewer,
                role="single",
                kind="audit",
                label=label,
                proposed=[{"label": proposed}],
                final=label,
                adjudicated=False,
                disputed=False,
            )
        )
    return labels


def test_the_noisy_reviewer_is_flagged_and_the_careful_ones_are_not():
    rows = {row.reviewer: row for row in reviewer_quality(simulate(), limit=0.1, alpha=0.05, confidence=0.9)}
    assert flagged_reviewers(rows.values()) == {"noisy"}
    for reviewer, rate in ERROR_RATES.items():  # (over 60 seeds: flags always right, rates within 0.07)
        row = rows[reviewer]
        assert row.double_judged > 100 and row.audits_judged > 50
        assert abs(row.error_rate - rate) <= 0.07, (reviewer, row)
    assert rows["ann"].upper_bound < 0.1 and rows["bob"].upper_bound < 0.1
    assert rows["noisy"].lower_bound > 0.1 and rows["noisy"].reason.count("above") == 1
    assert rows["root"].double_judged == 0 and rows["root"].error_rate is None and not rows["root"].flagged


def test_audit_disagreements_the_cascades_own_errors_explain_are_not_held_against_a_reviewer():
    def audits(n: int, disagreeing: int) -> list[JudgedLabel]:
        return [
            JudgedLabel(
                item_id=f"a{i}",
                reviewer="ann",
                role="single",
                kind="audit",
                label={"verdict": "reject" if i < disagreeing else "confirm", "label": None, "boxes": None},
                proposed=[{"label": "cat"}],
                final=None,
                adjudicated=False,
                disputed=False,
            )
            for i in range(n)
        ]

    (fair,) = reviewer_quality(audits(1000, 60), limit=0.03, alpha=0.05, confidence=0.9)
    assert not fair.flagged and fair.error_rate == pytest.approx(0.01)  # 6% seen, up to 5% the cascade's
    (harsh,) = reviewer_quality(audits(1000, 200), limit=0.03, alpha=0.05, confidence=0.9)
    assert harsh.flagged and harsh.lower_bound > 0.1


def test_a_dispute_no_admin_decided_counts_for_neither_side():
    common = dict(item_id="d", kind="review", proposed=[], final=None, adjudicated=False, disputed=True)
    labels = [
        JudgedLabel(reviewer="ann", role="first", label={"verdict": "reject"}, **common),
        JudgedLabel(reviewer="bob", role="second", label={"verdict": "confirm"}, **common),
    ]
    rows = reviewer_quality(labels, limit=0.1, alpha=0.05, confidence=0.9)
    assert [(r.disputes_pending, r.double_judged, r.flagged) for r in rows] == [(1, 0, False)] * 2
    with pytest.raises(ValueError, match="limit"):
        reviewer_quality(labels, limit=0.0, alpha=0.05, confidence=0.9)


def test_recertification_reads_a_flagged_reviewers_label_as_no_label():
    from policies.production_certify import sample_from_items

    def item(reviewer: str, verdict: str, created_at: float):
        return SimpleNamespace(
            task="classify",
            kind="audit",
            inclusion_probability=0.1,
            trace={"steps": [{"stage": "policy:thresholds", "score": 0.9}]},
            status="labelled",
            label={"verdict": verdict},
            labelled_by=reviewer,
            proposed=[{"label": "cat"}],
            created_at=created_at,
        )

    items = [item("ann", "confirm", 1.0), item("noisy", "confirm", 2.0), item("ann", "reject", 3.0)]
    trusted = sample_from_items(items).sample.cheap_error
    assert trusted.tolist() == [0.0, 0.0, 1.0]
    discounted = sample_from_items(items, distrusted_reviewers={"noisy"}).sample
    assert discounted.cheap_error[0] == 0.0 and math.isnan(discounted.cheap_error[1])
    assert discounted.n_unlabelled == 1  # non-response: counted as an error wherever a rule accepts


def test_the_flagged_reviewers_of_a_queue_under_a_policy_set():
    from policies.policy_set import parse_policy_set
    from policies.reviewer_quality import distrusted_reviewers

    class Queue:
        def judged_labels(self, tenant=None):
            return simulate()

    policy = parse_policy_set({"review": {"reviewer_error_limit": 0.1}})
    assert distrusted_reviewers(Queue(), policy) == {"noisy"}
    assert distrusted_reviewers(Queue(), parse_policy_set({"review": {"reviewer_error_limit": 0.5}})) == set()
