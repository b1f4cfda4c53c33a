"""Replay scores a new learned router on logged traces (evals/replay.py ``replay_router``): the
served router replayed on its own traces reproduces every logged decision; another router's
decisions are reported beside the logged ones; items whose features were not logged (the
served router fell back) are decided by the candidate's fallback plan, as the service would."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json

import pytest
from PIL import Image

from cascades.learned_router import CertifiedThresholds, RouterPlans
from evals.replay import read_traces, replay_router
from router.config import parse_app_config
from router.services import ImageRequest, VisionRouteService
from router.services.backends import LocalOnnxTier
from tests.support.router_artefact import LABELS, calibrated_router, tier_config
from visionroute.cli import main


def png(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Traces of 40 uploads through a service with the calibrated router (the last 5 through the
    same router with timeout_ms 0: logged as fallbacks), one JSONL line each with its label."""
    tmp = tmp_path_factory.mktemp("replay-router")
    model, result, images, data = calibrated_router(tmp, n=600)
    calibration = result.calibrator.save(tmp / "calibration.json")
    router = result.artefact.save(tmp / "router.json")
    lines = []
    for name, extra, rows in (("live", {}, range(400, 435)), ("drill", {"timeout_ms": 0}, range(435, 440))):
        config = parse_app_config(
            {
                "models_dir": str(tmp),
                "default_task": "colour8",
                "cascades": {
                    "colour8": {
                        "tier": tier_config(model, calibration),
                        "router": {"path": str(router), **extra},
                    }
                },
                "review": {"path": str(tmp / f"review-{name}")},
                "retrieval": {"enabled": False},
            }
        )
        tier = LocalOnnxTier(config.cascades["colour8"].tier.model_dump(), config.models_dir)
        service = VisionRouteService.build(config, tiers={"colour8": tier})
        for row in rows:
            analysis = asyncio.run(service.analyze.analyze(ImageRequest(png(images[row]), f"r{row}"), None))
            lines.append(
                json.dumps({**analysis.trace.to_dict(), "ground_truth": LABELS[int(data.labels[row])]})
            )
    path = tmp / "traces.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, result.artefact


def test_the_served_router_replayed_on_its_own_traces_changes_nothing(logged):
    path, artefact = logged
    items = read_traces(path)
    assert sum(item.router_features is not None for item in items) == 35
    report = replay_router(items, artefact)
    router = report["router"]
    assert router["decided_by"] == {"learned": 35, "fallback": 5, "failed": 0}
    assert router["changed_decisions"] == 0 and report["slices"]["all"]["changed_decisions"] == 0
    assert router["logged_versions"] == [artefact.sha256] and router["candidate"] == artefact.sha256
    assert router["other_reference_index"] == 0 and router["missing_features"] == []
    assert all(key.split("->")[0] == key.split("->")[1] for key in router["transitions"])


def test_another_router_is_reported_beside_the_logged_decisions(logged, tmp_path, capsys):
    path, artefact = logged
    items = read_traces(path)
    accept_all = {"accept_threshold": 0.0, "review_threshold": 0.0, "certificate": {"n": 0}}
    plans = RouterPlans(
        CertifiedThresholds.from_document(accept_all, score="learned", field="learned"),
        artefact.plans.fallback,
        artefact.plans.alpha,
        artefact.plans.delta,
    )
    candidate = dataclasses.replace(artefact, plans=plans)
    report = replay_router(items, candidate)
    router = report["router"]
    logged_learned = [item for item in items if item.router_features is not None]
    not_accepted = sum(item.recorded_policy_decision != "accept" for item in logged_learned)
    assert router["changed_decisions"] == not_accepted
    assert sum(n for key, n in router["transitions"].items() if key.endswith("->accept")) >= len(
        logged_learned
    )
    assert report["slices"]["all"]["n"] == 40

    # the same through `visionroute eval --traces --router`
    out = tmp_path / "report"
    candidate_path = candidate.save(tmp_path / "candidate.json")
    assert main(["eval", "--traces", str(path), "--router", str(candidate_path), "--out", str(out)]) == 0
    written = json.loads((out / "report.json").read_text())
    assert written["replay"]["router"]["changed_decisions"] == not_accepted
    capsys.readouterr()
