"""Drift monitors: seeded regression checks on real photos and synthetic scores (rates: bench drift)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from router.drift.monitors import (
    ConfidenceDriftMonitor,
    DriftInputError,
    DriftMetrics,
    DriftResult,
    EmbeddingDriftMonitor,
    InputDriftMonitor,
    VerdictDriftMonitor,
    drift_metric_families,
    estimate_jpeg_quality,
    image_statistics,
)
from tests.conftest import photo_rgb

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    encoded = io.BytesIO()
    image.save(encoded, "JPEG", quality=quality)
    return Image.open(io.BytesIO(encoded.getvalue()))


def _requests(count: int, seed: int, shift=None) -> list[dict[str, float]]:
    """Statistics of ``count`` random 96-160 px crops of real photos, JPEG q85-95 like a camera's."""
    rng = np.random.default_rng(seed)
    photos = [photo_rgb(name) for name in PHOTOS]
    rows = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(96, 161))
        top, left = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        image = Image.fromarray(photo[top : top + side, left : left + side])
        if shift is not None:
            image = shift(image)
        rows.append(image_statistics(_jpeg(image, int(rng.integers(85, 96)))))
    return rows


def test_jpeg_quality_is_recovered_from_the_quantisation_tables():
    photo = Image.fromarray(photo_rgb("astronaut"))
    for quality in (20, 55, 90):
        assert estimate_jpeg_quality(_jpeg(photo, quality)) == quality
    assert math.isnan(estimate_jpeg_quality(photo))  # not decoded from a JPEG
    assert math.isnan(image_statistics(photo_rgb("coffee"))["jpeg_quality"])


def test_image_statistics_move_with_the_shift():
    photo = Image.fromarray(photo_rgb("coffee"))
    base = image_statistics(photo)
    assert base["pixels"] == 400 * 600
    assert image_statistics(photo.filter(ImageFilter.GaussianBlur(2)))["sharpness"] < 0.2 * base["sharpness"]
    assert (
        image_statistics(ImageEnhance.Brightness(photo).enhance(1.3))["brightness"] > base["brightness"] + 10
    )
    assert image_statistics(ImageEnhance.Contrast(photo).enhance(0.5))["contrast"] < 0.6 * base["contrast"]


def test_input_monitor_alarms_on_blurred_traffic_and_stays_quiet_on_unshifted():
    monitor = InputDriftMonitor(_requests(80, seed=1), task="classify", level=0.01)
    quiet = monitor.feed(_requests(40, seed=2))
    assert not quiet.alarm and quiet.p_value > 0.01
    blurred = monitor.feed(_requests(40, seed=3, shift=lambda im: im.filter(ImageFilter.GaussianBlur(1.5))))
    assert blurred.alarm and blurred.p_value < 0.01
    per_statistic = blurred.details["statistics"]
    assert min(per_statistic, key=lambda s: per_statistic[s]["p_value"]) == "sharpness"
    assert (blurred.task, blurred.monitor, blurred.n_reference, blurred.n_window) == (
        "classify",
        "inputs",
        80,
        40,
    )


def test_confidence_monitor():
    rng = np.random.default_rng(0)
    monitor = ConfidenceDriftMonitor(rng.beta(8, 2, 300), level=0.01)
    assert not monitor.feed(rng.beta(8, 2, 100)).alarm
    shifted = monitor.feed(rng.beta(5, 3, 100))  # the cheap tier grows less sure
    assert shifted.alarm and shifted.details["window_mean"] < shifted.details["reference_mean"]


def test_embedding_monitor_mmd_permutation_test():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3  # clustered embeddings

    def draw(n, weights):
        return centres[rng.choice(4, n, p=weights)] + rng.normal(size=(n, 16))

    monitor = EmbeddingDriftMonitor(
        draw(400, [0.25] * 4), level=0.01, permutations=300, max_reference=200, seed=7
    )
    assert len(monitor.reference) == 200
    window = draw(60, [0.25] * 4)
    quiet = monitor.feed(window)
    assert not quiet.alarm and quiet.p_value > 0.01
    assert quiet.details["permutations"] < 300  # the sequential p-value stopped early
    assert monitor.feed(window).p_value == quiet.p_value  # deterministic
    shifted = monitor.feed(draw(60, [0.7, 0.1, 0.1, 0.1]))  # the mix of content moved
    assert shifted.alarm and shifted.p_value == pytest.approx(1 / 301)
    assert shifted.score > quiet.score


def test_mmd_score_is_the_unbiased_estimate():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(9, 3)) + 0.3
    monitor = EmbeddingDriftMonitor(x, permutations=19)

    def k(a, b):
        return math.exp(-np.sum((a - b) ** 2) / (2 * monitor.bandwidth**2))

    xx = sum(k(x[i], x[j]) for i in range(12) for j in range(12) if i != j) / (12 * 11)
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(a, b) for a in x for b in y) / (12 * 9)
    assert monitor.feed(y).score == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


def test_verdict_monitor():
    monitor = VerdictDriftMonitor({"confirm": 170, "correct": 24, "reject": 6}, task="text", level=0.01)
    quiet = monitor.feed(["confirm"] * 42 + ["correct"] * 6 + ["reject"] * 2)
    assert not quiet.alarm
    shifted = monitor.feed({"confirm": 30, "correct": 10, "reject": 10})
    assert shifted.alarm and shifted.details["shares"]["reject"]["window"] == 0.2


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: ConfidenceDriftMonitor(np.ones(10), level=0.0), "level"),
        (lambda: ConfidenceDriftMonitor(np.ones(3)), "reference"),
        (lambda: ConfidenceDriftMonitor(np.ones(10)).feed([0.5, float("nan")] * 5), "window"),
        (lambda: ConfidenceDriftMonitor(np.ones(10)).feed(np.ones((10, 2))), "window"),
        (lambda: EmbeddingDriftMonitor(np.ones((10, 4))).feed(np.ones((10, 3))), "window"),
        (lambda: EmbeddingDriftMonitor(np.ones((10, 4)), permutations=5), "permutations"),
        (lambda: InputDriftMonitor([{"brightness": 1.0}] * 10), "reference"),
        (lambda: VerdictDriftMonitor(["confirm"] * 10).feed(["confirm"] * 9 + ["maybe"]), "window"),
        (lambda: VerdictDriftMonitor({"confirm": -1, "reject": 10}), "reference"),
        (lambda: image_statistics(np.zeros((8, 8), np.float32)), "image"),
        (lambda: image_statistics("coffee.png"), "image"),
    ],
)
def test_bad_input_names_the_argument(call, field):
    with pytest.raises(ValueError) as raised:
        call()
    assert isinstance(raised.value, DriftInputError) and raised.value.field == field
    assert field in str(raised.value)


def _result(alarm: bool) -> DriftResult:
    return DriftResult("classify", "inputs", 0.42, 0.001 if alarm else 0.5, alarm, 0.01, 80, 40)


def test_prometheus_gauges_per_task_and_monitor():
    registry = CollectorRegistry()
    DriftMetrics(registry).observe(_result(True))
    text = generate_latest(registry).decode()
    assert 'visionroute_drift_alarm{monitor="inputs",task="classify"} 1.0' in text
    assert 'visionroute_drift_score{monitor="inputs",task="classify"} 0.42' in text

    class Shared(Collector):
        def collect(self):
            yield from drift_metric_families([_result(False)])

    registry = CollectorRegistry()
    registry.register(Shared())
    text = generate_latest(registry).decode()
    assert 'visionroute_drift_alarm{monitor="inputs",task="classify"} 0.0' in text
    assert 'visionroute_drift_p_value{monitor="inputs",task="classify"} 0.5' in text


def test_bench_alarm_rates_and_requests_to_alarm():
    from evals.benchmarks.drift import Pool, alarm_rates, requests_to_alarm

    rng = np.random.default_rng(0)
    base = rng.normal(size=(400, 5)) + 10
    shifted = base.copy()
    shifted[:, 1] += 2.0  # brighter
    kwargs = dict(window=30, windows=20, references=20, reference_size=100, level=0.01, permutations=50)
    assert alarm_rates(Pool(base, None, None), Pool(shifted, None, None), seed=1, **kwargs)["inputs"] == 1.0
    assert alarm_rates(Pool(base, None, None), Pool(base, None, None), seed=2, **kwargs)["inputs"] <= 0.1
    assert requests_to_alarm(50, 1.0) == 50 and requests_to_alarm(50, 0.5) == 50
    assert requests_to_alarm(50, 0.2) == 50 * 4 and math.isinf(requests_to_alarm(50, 0.0))
