"""The service's drift monitors (router/drift/service.py) fed with real traffic, no Ray.

Traffic: scikit-learn's digits upsampled to 32x32, sent as JPEG uploads (quality 90) and decoded
like the service decodes them; the confidence is a real classifier's (a logistic regression fit
on other digits). Shifts come from evals/corruptions.py. Seeded: these are regression checks of
one run; false-alarm and detection rates over many runs are `visionroute bench drift`'s.
"""

from __future__ import annotations

import functools
import io
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from router.drift.monitors import DriftInputError
from router.drift.service import DriftConfig, DriftService
from visionroute.errors import ConfigError
from visionroute.records import Analysis, Step, Trace

TASK = "digits"
# every request's inputs (input_fraction 1): the windows below are counted in requests
CONFIG = DriftConfig(reference_size=200, window_size=100, every=50, level=0.01, input_fraction=1.0)


@functools.cache
def _digits():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    train, pool = order[:600], order[600:]
    model = LogisticRegression(max_iter=1000).fit(digits.data[train], digits.target[train])
    images = (digits.images * (255 / 16)).astype(np.uint8)
    return images, pool, model


@functools.cache
def _upload(index: int, shift: tuple[str, int] | None = None) -> tuple[bytes, np.ndarray, float]:
    """(JPEG bytes, decoded RGB, the classifier's top-1 confidence) for one digit."""
    from evals.corruptions import corrupt

    images, _, model = _digits()
    rgb = np.repeat(np.kron(images[index], np.ones((4, 4), np.uint8))[..., None], 3, axis=2)
    if shift is not None:
        rgb = corrupt(rgb, shift[0], shift[1], seed=0, index=index)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    features = decoded[..., 0].astype(np.float64).reshape(8, 4, 8, 4).mean(axis=(1, 3)) * 16 / 255
    return data, decoded, float(model.predict_proba(features.reshape(1, -1)).max())


def _request(index: int, shift: tuple[str, int] | None = None) -> tuple[Analysis, bytes]:
    data, decoded, confidence = _upload(int(index), shift)
    trace = Trace(f"r{index}")
    trace.append(Step(stage="input", details={"format": "JPEG", "width": 32, "height": 32}))
    trace.append(Step(stage=f"onnx:{TASK}", score=confidence))
    return Analysis(image_rgb=decoded, image_sha256="-", task=TASK, trace=trace), data


def _feed(service: DriftService, indices, shift=None) -> None:
    for index in indices:
        service.observe_request(*_request(index, shift))
    service.drain(timeout_s=60)


def _rows(service: DriftService) -> dict[str, dict]:
    return {row["monitor"]: row for row in service.report().to_json()["monitors"] if row["task"] == TASK}


@pytest.fixture
def service():
    drift = DriftService(CONFIG, tasks=[TASK, "other"])
    yield drift
    drift.close()


def test_unshifted_traffic_raises_no_alarm(service):
    _, pool, _ = _digits()
    _feed(service, pool[:600])
    rows = _rows(service)
    for name in ("confidence", "inputs"):
        row = rows[name]
        assert row["status"] == "ok" and row["tests"] == 7, row  # windows at 100, 150, ..., 400
        assert not any(test["alarm"] for test in row["history"])
        assert (row["n_reference"], row["n_window"]) == (200, 100)
        assert row["reference_source"] == "first requests after start"
    jpeg = rows["inputs"]["details"]["statistics"]["jpeg_quality"]
    assert jpeg["reference_median"] == jpeg["window_median"] == 90  # read from the uploads' headers
    assert rows["embeddings"]["status"] == "no data" and "observe_embedding" in rows["embeddings"]["note"]
    assert rows["verdicts"]["status"] == "no data"
    assert service.results().keys() == {(TASK, "confidence"), (TASK, "inputs")}


def test_noise_alarms_on_inputs_and_confidence_then_clears(service, caplog):
    _, pool, _ = _digits()
    _feed(service, pool[:200])  # the reference
    with caplog.at_level(logging.INFO, logger="visionroute.service.drift"):
        _feed(service, pool[200:300], ("gaussian_noise", 3))
        rows = _rows(service)
        assert rows["inputs"]["alarm"] and rows["confidence"]["alarm"], rows
        sharpness = rows["inputs"]["details"]["statistics"]["sharpness"]
        assert sharpness["window_median"] > sharpness["reference_median"]  # noise raises it
        assert rows["confidence"]["details"]["window_mean"] < rows["confidence"]["details"]["reference_mean"]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert {r.args[:2] for r in warnings} == {(TASK, "inputs"), (TASK, "confidence")}  # once each
        assert rows["inputs"]["alarm_since_unix"] is not None
        _feed(service, pool[300:400])  # clean again: the window no longer holds shifted requests
    rows = _rows(service)
    assert rows["inputs"]["status"] == rows["confidence"]["status"] == "ok"
    cleared = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("cleared: task digits, monitor inputs" in m for m in cleared), cleared


def test_blur_alarms_on_the_inputs_sharpness(service):
    _, pool, _ = _digits()
    _feed(service, pool[:200])
    _feed(service, pool[200:300], ("defocus_blur", 1))
    inputs = _rows(service)["inputs"]
    assert inputs["alarm"]
    sharpness = inputs["details"]["statistics"]["sharpness"]
    assert sharpness["window_median"] < sharpness["reference_median"]


def test_inputs_on_a_sample_of_requests_still_alarm_on_noise_and_not_on_clean_traffic():
    """``input_fraction`` 1 in 4: the inputs monitor sees the sampled requests only (keyed by the
    request id), the confidence monitor every request; the sample's windows still tell clean
    traffic from noisy."""
    from policies.audit_sampling import is_sampled

    config = DriftConfig(reference_size=60, window_size=30, every=10, level=0.01, input_fraction=0.25)
    drift = DriftService(config, tasks=[TASK])
    _, pool, _ = _digits()
    _feed(drift, pool[:600])
    rows = _rows(drift)
    sampled = sum(is_sampled(f"drift-inputs:r{i}", 0.25) for i in pool[:600])
    assert 100 < sampled < 200 and rows["inputs"]["observed"] == sampled
    assert rows["confidence"]["observed"] == 600
    assert rows["inputs"]["status"] == "ok" and rows["inputs"]["tests"] >= 5
    assert not any(test["alarm"] for test in rows["inputs"]["history"])
    _feed(drift, pool[600:800], ("gaussian_noise", 3))  # about 50 sampled: the window is all noise
    assert _rows(drift)["inputs"]["alarm"]
    drift.close()


def _artefact(tmp_path, *, with_reference: bool):
    from cascades.calibration import fit_classifier
    from policies.shift_guard import InputReference, attach_reference

    _, pool, model = _digits()
    calibration = pool[600:900]
    probabilities = np.array([model.predict_proba(np.zeros((1, 64)))[0]] * len(calibration))
    calibrator = fit_classifier(
        "temperature", probabilities, np.arange(len(calibration)) % 10, list("0123456789")
    )
    if with_reference:
        decoded = [_upload(int(i))[1] for i in calibration]
        calibrator = attach_reference(
            calibrator, InputReference.from_images(decoded[:150], decoded[150:], source="digits uploads")
        )
    return str(calibrator.save(tmp_path / "calibration.json"))


def test_the_inputs_reference_comes_from_the_calibration_artefact(tmp_path):
    drift = DriftService(CONFIG, tasks=[TASK], calibrations={TASK: _artefact(tmp_path, with_reference=True)})
    _, pool, _ = _digits()
    _feed(drift, pool[:150])  # no reference to collect: tests start once the window is full
    inputs = _rows(drift)["inputs"]
    assert "calibration artefact" in inputs["reference_source"] and inputs["n_reference"] == 150
    assert drift.whole_image_tasks() == {TASK}  # its reference: whole decodes
    assert inputs["tests"] == 2 and inputs["status"] == "ok"
    assert set(inputs["details"]["statistics"]) >= {"log2_pixels", "sharpness", "blockiness"}
    assert _rows(drift)["confidence"]["status"] == "collecting reference"  # artefacts hold no scores
    _feed(drift, pool[150:250], ("gaussian_noise", 3))
    assert _rows(drift)["inputs"]["alarm"]
    drift.close()


def test_an_artefact_without_input_reference_falls_back_to_the_first_requests(tmp_path):
    drift = DriftService(CONFIG, tasks=[TASK], calibrations={TASK: _artefact(tmp_path, with_reference=False)})
    assert _rows(drift)["inputs"]["reference_source"] == "first requests after start"
    drift.close()


def test_a_verdict_mix_shift_alarms_and_the_same_mix_does_not(service):
    rng = np.random.default_rng(0)
    usual, shifted = [0.85, 0.12, 0.03], [0.6, 0.25, 0.15]
    verdicts = ["confirm", "correct", "reject"]
    for verdict in rng.choice(verdicts, size=300, p=usual):
        service.observe_verdict(TASK, str(verdict))
    service.drain()
    row = _rows(service)["verdicts"]
    assert row["status"] == "ok" and row["tests"] == 1 and row["n_reference"] == 200
    for verdict in rng.choice(verdicts, size=100, p=shifted):
        service.observe_verdict(TASK, str(verdict))
    service.drain()
    row = _rows(service)["verdicts"]
    assert row["alarm"] and row["details"]["shares"]["reject"]["window"] > 0.03
    with pytest.raises(DriftInputError) as info:
        service.observe_verdict(TASK, "maybe")
    assert info.value.field == "verdict"


def test_embeddings_alarm_when_the_cluster_moves(service):
    rng = np.random.default_rng(0)
    for vector in rng.normal(size=(300, 16)):
        service.observe_embedding(TASK, vector)
    service.drain()
    assert _rows(service)["embeddings"]["status"] == "ok"
    for vector in rng.normal(size=(100, 16)) + 0.8:
        service.observe_embedding(TASK, vector)
    service.drain()
    assert _rows(service)["embeddings"]["alarm"]
    with pytest.raises(DriftInputError) as info:
        service.observe_embedding(TASK, np.zeros(8))
    assert info.value.field == "embedding" and "dimension 8" in info.value.reason


def test_metric_families_export_a_score_and_an_alarm_gauge(service):
    from prometheus_client import CollectorRegistry, generate_latest

    _, pool, _ = _digits()
    _feed(service, pool[:200])
    _feed(service, pool[200:300], ("gaussian_noise", 3))
    names = {family.name for family in service.metric_families()}
    assert {"visionroute_drift_score", "visionroute_drift_alarm"} <= names
    registry = CollectorRegistry()
    registry.register(service)
    text = generate_latest(registry).decode()
    assert 'visionroute_drift_alarm{monitor="inputs",task="digits"} 1.0' in text
    assert 'visionroute_drift_score{monitor="confidence",task="digits"}' in text
    assert 'task="other"' not in text  # untested monitors export nothing


def test_bad_config_and_disabled_monitors(monkeypatch):
    with pytest.raises(ValidationError, match="window_size"):
        DriftConfig(window_size=5)
    with pytest.raises(ValidationError, match="unexpected|extra"):
        DriftConfig(windows=5)
    with pytest.raises(ConfigError) as info:
        DriftService(DriftConfig(tasks=["nope"]), tasks=[TASK])
    assert info.value.field == "drift.tasks" and "nope" in info.value.reason
    off = DriftService(DriftConfig(enabled=False), tasks=[TASK])
    off.observe_request(*_request(_digits()[1][0]))
    off.drain()
    assert off.report().monitors == [] and off.report().enabled is False
    off.close()
    # A backlog of pixels past the bound drops the image (counted); the score is still seen.
    monkeypatch.setattr("router.drift.service.MAX_PENDING_PIXELS", 0)
    busy = DriftService(CONFIG, tasks=[TASK])
    busy.observe_request(*_request(_digits()[1][0]))
    busy.drain()
    assert busy.report().dropped_requests == 1
    assert _rows(busy)["confidence"]["observed"] == 1 and _rows(busy)["inputs"]["observed"] == 0
    busy.close()


def test_get_v1_drift_and_the_cli_report(service, monkeypatch, tmp_path, capsys):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    import router.http.deps
    from router.http.auth import required_role
    from router.http.drift import router as drift_router
    from visionroute.cli import main
    from visionroute.cli.drift import fetch_report, format_report

    _, pool, _ = _digits()
    _feed(service, pool[:200])
    _feed(service, pool[200:300], ("gaussian_noise", 3))
    assert required_role("/v1/drift") == "admin"
    app = FastAPI()
    app.include_router(drift_router)
    monkeypatch.setattr(router.http.deps._Attached, "service", SimpleNamespace(drift=service))
    report = fetch_report("http://testserver", None, client=TestClient(app))
    assert report == service.report().to_json() | {"monitors": report["monitors"]}
    assert report["monitors"] == service.report().to_json()["monitors"]
    table = format_report(report)
    header = next(line for line in table.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "monitor", "status", "score", "p_value", "alarm", "n_ref", "n_window"]
    inputs = next(line.split() for line in table.splitlines() if line.startswith("digits  inputs"))
    assert inputs[2] == "alarm" and inputs[5:] == ["ALARM", "200", "100"]
    assert any(line.split()[:3] == ["other", "embeddings", "no"] for line in table.splitlines())

    monkeypatch.setattr("visionroute.cli.drift.fetch_report", lambda url, key: report)
    plot = tmp_path / "drift.png"
    assert main(["drift", "report", "--key", "k", "--plot", str(plot)]) == 1  # 1 while a monitor alarms
    assert "ALARM" in capsys.readouterr().out
    assert Image.open(plot).size[0] > 100


def test_a_candidates_scores_are_left_out_and_a_reset_starts_a_new_reference(service):
    _, pool, _ = _digits()
    for index in pool[:30]:
        service.observe_request(*_request(index), count_score=False)  # a canary's candidate answered
    service.drain()
    rows = _rows(service)
    assert rows["confidence"]["observed"] == 0 and rows["inputs"]["observed"] == 30
    _feed(service, pool[:300])
    assert _rows(service)["confidence"]["status"] == "ok"
    service.reset(TASK)  # e.g. after a promotion: the new model's scores need their own reference
    service.drain()
    rows = _rows(service)
    assert rows["confidence"]["status"] == "no data" and rows["confidence"]["n_reference"] == 0
    assert rows["inputs"]["status"] == "ok"  # the inputs do not depend on the model
    with pytest.raises(DriftInputError) as info:
        service.reset(TASK, ["confidence", "typo"])
    assert info.value.field == "monitors"
