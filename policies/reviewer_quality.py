"""Each reviewer's error rate, from double labels and audit agreement, and who is flagged.

No Dawid-Skene library is installed and with two labels per item and unknown truth its EM has
little to work with, so the estimate is a count of *judged* labels, each right or wrong:

- **double labels** (``policies/review/double_labels.py``): when the pair agreed, both labels
  count as right; when they disagreed, the admin's adjudication is the truth and each label that
  differs from it counts as wrong. (Two reviewers making the same mistake look right: the
  estimate is low by that share, which is small when errors are rare and spread over classes.)
  A dispute no admin has decided yet counts for neither side (``disputes_pending``).
- **audit agreement**: a single label of an audit item (an auto-accept sampled uniformly) is
  compared with the cascade's certified answer. Disagreeing is a reviewer error unless the
  accept itself was wrong, which happens to at most ``alpha`` of the accepts while the
  certificate holds. So with ``a`` the share of audit labels among the judged ones, the
  disagreement rate ``p`` satisfies ``e - a*alpha*e <= p <= e + a*alpha``, and the error rate
  ``e`` is in ``[p - a*alpha, p / (1 - a*alpha)]``.

The interval: exact Clopper-Pearson bounds on ``p`` at ``confidence`` (the audit's), widened as
above. A reviewer is **flagged** when the lower bound is above ``review.reviewer_error_limit``:
the labels show, at that confidence, that they err more often than the limit allows; a new
reviewer with few labels is not flagged on noise. Recertification leaves flagged reviewers'
labels out (``policies.production_certify.sample_from_items(distrusted_reviewers=...)``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from policies.audit_sampling import clopper_pearson, is_error
from policies.review.double_labels import JudgedLabel, same_answer


@dataclass(frozen=True)
class ReviewerQuality:
    reviewer: str
    labels: int  # every label they gave through the queue or a Label Studio import
    double_judged: int  # their labels of double-labelled items that agreed or were adjudicated
    double_errors: int  # of those, labels the adjudication overruled
    disputes_pending: int  # their labels in a dispute no admin has decided yet
    audits_judged: int  # their single labels of audit items
    audit_disagreements: int  # of those, labels that called the certified accept wrong
    error_rate: float | None  # None: nothing judged yet
    lower_bound: float
    upper_bound: float
    confidence: float
    limit: float
    flagged: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reviewer_quality(
    labels: Iterable[JudgedLabel], *, limit: float, alpha: float, confidence: float
) -> list[ReviewerQuality]:
    """One row per reviewer (by name), worst lower bound first (see the module docstring)."""
    if not 0 < limit < 1:
        raise ValueError(f"limit must be in (0, 1), got {limit!r}")
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_item: dict[str, list[JudgedLabel]] = defaultdict(list)
    for label in labels:
        by_item[label.item_id].append(label)
        counts[label.reviewer]["labels"] += 1
    for item_labels in by_item.values():
        adjudication = next((x for x in item_labels if x.role == "adjudication"), None)
        pair = [x for x in item_labels if x.role in ("first", "second")]
        for label in item_labels:
            tally = counts[label.reviewer]
            if label.role == "single":
                if label.kind == "audit":
                    tally["audits_judged"] += 1
                    tally["audit_disagreements"] += int(is_error(label.label, label.proposed))
            elif label.role in ("first", "second") and len(pair) == 2:
                if adjudication is not None:
                    tally["double_judged"] += 1
                    tally["double_errors"] += int(
                        not same_answer(label.label, adjudication.label, label.proposed)
                    )
                elif label.disputed:
                    tally["disputes_pending"] += 1
                elif label.final is not None:  # the pair agreed
                    tally["double_judged"] += 1
    rows = [_row(reviewer, tally, limit, alpha, confidence) for reviewer, tally in counts.items()]
    return sorted(rows, key=lambda row: (-row.lower_bound, row.reviewer))


def _row(
    reviewer: str, tally: dict[str, int], limit: float, alpha: float, confidence: float
) -> ReviewerQuality:
    judged = tally["double_judged"] + tally["audits_judged"]
    wrong = tally["double_errors"] + tally["audit_disagreements"]
    audit_share = tally["audits_judged"] / judged if judged else 0.0
    slack = audit_share * alpha  # disagreements an erring cascade, not the reviewer, may explain
    lower, upper = clopper_pearson(wrong, judged, confidence)
    lower, upper = max(0.0, lower - slack), min(1.0, upper / (1.0 - slack))
    rate = max(0.0, wrong / judged - slack) if judged else None
    flagged = judged > 0 and lower > limit
    if not judged:
        reason = "no judged labels yet (a double label agreed or adjudicated, or an audit label)"
    else:
        side = "above" if flagged else "within"
        reason = (
            f"{wrong} of {judged} judged labels were overruled by an adjudication or disagreed with the"
            f" certified accept; the {confidence:.0%} lower bound {lower:.3f} is {side} the limit {limit:g}"
        )
    return ReviewerQuality(
        reviewer=reviewer,
        labels=tally["labels"],
        double_judged=tally["double_judged"],
        double_errors=tally["double_errors"],
        disputes_pending=tally["disputes_pending"],
        audits_judged=tally["audits_judged"],
        audit_disagreements=tally["audit_disagreements"],
        error_rate=rate,
        lower_bound=lower,
        upper_bound=upper,
        confidence=confidence,
        limit=limit,
        flagged=flagged,
        reason=reason,
    )


def flagged_reviewers(rows: Iterable[ReviewerQuality]) -> frozenset[str]:
    """The reviewers whose labels recertification leaves out."""
    return frozenset(row.reviewer for row in rows if row.flagged)


def distrusted_reviewers(queue: Any, policy: Any, *, tenant: str | None = None) -> frozenset[str]:
    """The flagged reviewers under a policy set (``PolicySet``), read from a ``ReviewQueue``: what
    a recalibration passes as ``sample_from_items(distrusted_reviewers=...)``."""
    rows = reviewer_quality(
        queue.judged_labels(tenant=tenant),
        limit=policy.review.reviewer_error_limit,
        alpha=policy.audit.alpha,
        confidence=policy.audit.confidence,
    )
    return flagged_reviewers(rows)
