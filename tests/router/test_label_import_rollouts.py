"""Labels imported from Label Studio are a rollout's evidence as the queue's labels are
(``visionroute review import-label-studio``), each item counted once (service core, no Ray)."""

from __future__ import annotations

import argparse
import asyncio

from policies.review.label_import import LabelImport
from tests.policies.test_double_labels import annotation
from tests.router.test_rollouts import ADMIN, build, rollout_config, traffic, truths
from visionroute.cli import review as review_cli


def test_imported_labels_of_a_rollouts_audit_items_are_its_evidence_once(tmp_path):
    service = build(rollout_config(tmp_path))
    body = {"task": "colour", "candidate": "cheaper", "mode": "canary", "fraction": 0.5}
    started = asyncio.run(
        service.rollouts.start(ADMIN, {**body, "sticky_by": "request", "audit_fraction": 1.0})
    )
    truth_of = truths(asyncio.run(traffic(service, 12, "ls")))
    queue = service.review.queue
    audits = [item for item in queue.iter_all() if item.kind == "audit" and item.status == "pending"]
    assert audits, "the rollout audits every accept of both arms"
    imports = LabelImport(queue.database)
    for n, item in enumerate(audits):
        assert imports.record(annotation(item, "ann", truth_of[item.request_id], n)).status == "imported"
    args = argparse.Namespace(path=str(service.config.review.path), config=None)
    ids = [item.id for item in audits]
    assert review_cli._rollout_evidence(args, queue, ids) == len(audits)
    review_cli._rollout_evidence(args, queue, ids)  # imported again: each item counts once
    rollout = service.rollouts.store.get(started.to_json()["id"])
    assert sum(state.cs.labelled for state in rollout.monitor.arms.values()) == len(audits)
    assert sum(state.cs.errors for state in rollout.monitor.arms.values()) == 0  # the labels agree
