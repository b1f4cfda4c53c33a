"""``visionroute calibrate --router`` and ``cascades.router_calibration``: one call fits the cheap
tier's calibrator and the router and certifies both three-tier plans with the VLM's answers; the
artefacts it writes start a service; bad input and an infeasible review capacity are errors
naming the field (the capacity one with the smallest share that works)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cascades.learned_router import RouterArtefact
from cascades.router_stage import served_output
from router.config import parse_app_config
from tests.support.router_artefact import LABELS, calibrated_router, tier_config
from visionroute.cli import main
from visionroute.errors import ConfigError


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    return calibrated_router(tmp_path_factory.mktemp("router-calibration"))


def test_both_plans_are_certified_with_the_vlm_threshold(calibrated):
    _, result, _, data = calibrated
    plans = result.artefact.plans
    assert plans.learned.score == "learned" and plans.fallback.score == "top1"
    for plan in (plans.learned, plans.fallback):
        assert plan.vlm_accept_threshold is not None  # certified with the VLM's scores
        assert plan.document["certificate"]["alpha"] == 0.1
        assert "capacity" not in plan.document  # no review-capacity constraint was asked for
    assert result.sizes == {"fit": 225, "certification": 225, "held_out": 450}
    assert set(result.held_out) == {"learned", "fallback"}
    for held in result.held_out.values():
        assert sum(held.rates.values()) == pytest.approx(1.0)
    # the router's class names are the tier's; its features are the served ones
    assert result.artefact.class_names == tuple(LABELS)
    assert result.artefact.spec.use_input and result.artefact.spec.neighbours_k > 0
    output, _, top1 = served_output(data.probabilities[:5], LABELS, calibrator=result.calibrator)
    assert output.shape == (5, 8) and np.allclose(output.sum(1), 1.0, atol=1e-5)
    assert np.allclose(top1, output.max(1), atol=1e-7)  # the fallback's score: the served top-1


def test_an_infeasible_review_capacity_gives_the_smallest_share_that_works(tmp_path):
    """No plan sends nobody to a human at alpha 0.05 here (the VLM is wrong 10% of the time)."""
    with pytest.raises(ConfigError) as error:
        calibrated_router(tmp_path / "a", n=600, alpha=0.05, max_review_share=0.0)
    assert error.value.field == "max_review_share"
    smallest = float(re.search(r"the smallest review share that works is ([0-9.e-]+)", error.value.reason)[1])
    assert 0.0 < smallest <= 1.0
    _, result, _, _ = calibrated_router(tmp_path / "b", n=600, alpha=0.05, max_review_share=smallest)
    for plan in (result.artefact.plans.learned, result.artefact.plans.fallback):
        assert plan.document["capacity"]["feasible"]
        assert plan.document["rates"]["review"] <= smallest + 1e-12


def write_predictions(path, data, *, strong=True, images=True, scores=None):
    arrays = {
        "probabilities": data.probabilities,
        "labels": data.labels,
        "class_names": np.array(LABELS),
    }
    if strong:
        arrays |= {
            "strong_answers": data.strong_answers,
            "strong_scores": data.strong_scores if scores is None else scores,
        }
    if images:
        arrays["images"] = np.stack(data.images)
    np.savez(path, **arrays)
    return path


def test_the_command_writes_artefacts_that_serve(tmp_path, calibrated, capsys):
    model, _, _, data = calibrated
    predictions = write_predictions(tmp_path / "colour8.npz", data)
    router, calibration = tmp_path / "router.json", tmp_path / "calibration.json"
    code = main(
        [
            "calibrate",
            "--router",
            "--predictions",
            str(predictions),
            "--alpha",
            "0.1",
            "--embedding-dim",
            "12",
            "--task",
            "colour8",
            "--router-out",
            str(router),
            "--out",
            str(calibration),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"router: {{path: {router}}}" in out and f"tier: {{calibration: {calibration}}}" in out
    assert "    colour8:" in out and "learned (router score)" in out and "fallback" in out
    artefact = RouterArtefact.load(router, class_names=LABELS)
    assert artefact.plans is not None and artefact.version in out
    # the printed lines make a config that starts (the artefact is checked against the tier)
    parse_app_config(
        {
            "models_dir": str(tmp_path),
            "default_task": "colour8",
            "cascades": {
                "colour8": {"tier": tier_config(model, calibration), "router": {"path": str(router)}}
            },
            "review": {"path": str(tmp_path / "review")},
            "retrieval": {"enabled": False},
        }
    )


@pytest.mark.parametrize(
    "arrays, flags, field",
    [
        ({"strong": False}, [], "predictions.strong_answers"),
        ({"images": False}, ["--router-features", "output,neighbours"], "router-features"),
        ({}, ["--max-review-share", "1.5"], "max-review-share"),
        ({}, ["--router-features", "output,colour"], "router-features"),
        ({}, ["--embedding-dim", "10"], "embedding-dim"),
        ({"scores": np.full(900, 1.5)}, [], "predictions.strong_scores"),
    ],
)
def test_bad_input_is_an_error_naming_the_field(tmp_path, calibrated, capsys, arrays, flags, field):
    predictions = write_predictions(tmp_path / "p.npz", calibrated[3], **arrays)
    router = tmp_path / "router.json"
    code = main(
        ["calibrate", "--router", "--predictions", str(predictions), "--router-out", str(router), *flags]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"error ({field}):" in err
    assert not router.exists()


def test_without_images_the_router_uses_the_output_features(tmp_path, calibrated, capsys):
    predictions = write_predictions(tmp_path / "p.npz", calibrated[3], images=False)
    router = tmp_path / "router.json"
    code = main(
        [
            "calibrate",
            "--router",
            "--predictions",
            str(predictions),
            "--alpha",
            "0.1",
            "--router-out",
            str(router),
        ]
    )
    assert code == 0, capsys.readouterr().err
    spec = RouterArtefact.load(router).spec
    assert not spec.use_input and spec.neighbours_k == 0
