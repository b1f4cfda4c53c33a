"""ImageNet-C-style corruptions (albumentations) and the robustness report.

The corruptions run on a real photo; the report runs on a small synthetic orientation task
whose two tiers are real computations on the pixels (gradient energy), so corruptions change
their answers the way they would change a model's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evals.corruptions import (
    CORRUPTIONS,
    corrupt,
    corrupt_all,
    evaluate_corruptions,
    parse_corruptions,
    parse_severities,
    robustness_plots,
)
from visionroute.errors import ConfigError, InputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    import cv2
    from skimage import data

    return cv2.resize(data.astronaut(), (224, 224), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_is_seeded_and_worsens_with_severity(photo, name):
    from skimage.metrics import peak_signal_noise_ratio

    corrupted = [corrupt(photo, name, severity, seed=3, index=7) for severity in range(1, 6)]
    again = corrupt(photo, name, 4, seed=3, index=7)
    assert np.array_equal(again, corrupted[3])  # same seed, item and severity: same pixels
    for image in corrupted:
        assert image.shape == photo.shape and image.dtype == np.uint8
    psnr = [peak_signal_noise_ratio(photo, image) for image in corrupted]
    assert all(a > b for a, b in zip(psnr, psnr[1:])), f"{name}: PSNR by severity {np.round(psnr, 2)}"
    assert psnr[0] < 40  # severity 1 already changes the image


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "occlusion", "motion_blur"])
def test_random_corruptions_depend_on_the_seed_and_the_item(photo, name):
    base = corrupt(photo, name, 3, seed=0, index=0)
    assert not np.array_equal(base, corrupt(photo, name, 3, seed=1, index=0))
    assert not np.array_equal(base, corrupt(photo, name, 3, seed=0, index=1))
    # an item's corruption does not depend on which other items are corrupted with it
    batch = corrupt_all([photo, photo], name, 3, seed=0, indices=[5, 0])
    assert np.array_equal(batch[1], base)


def test_grey_and_tiny_images_keep_their_shape():
    rng = np.random.default_rng(0)
    for shape in [(8, 8), (8, 8, 1), (25, 25, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        for name in CORRUPTIONS:
            out = corrupt(image, name, 5, seed=0)
            assert out.shape == image.shape and out.dtype == np.uint8


def test_bad_corruption_input_names_the_field(photo):
    with pytest.raises(ConfigError) as info:
        corrupt(photo, "fog", 1)
    assert info.value.field == "corruptions" and "gaussian_noise" in info.value.reason
    for severity in (0, 6):
        with pytest.raises(ConfigError) as info:
            corrupt(photo, "jpeg", severity)
        assert info.value.field == "severities"
    with pytest.raises(InputError) as info:
        corrupt(photo.astype(np.float32) / 255, "jpeg", 1)
    assert info.value.field == "image"
    assert parse_corruptions(None) == tuple(CORRUPTIONS) == parse_corruptions("all")
    assert parse_corruptions("jpeg, contrast,jpeg") == ("jpeg", "contrast")
    assert parse_severities("5,1") == (1, 5)
    for bad, field in [("jpeg,snow", "corruptions"), (",", "corruptions")]:
        with pytest.raises(ConfigError) as info:
            parse_corruptions(bad)
        assert info.value.field == field
    for bad in ("0,1", "x", "7"):
        with pytest.raises(ConfigError) as info:
            parse_severities(bad)
        assert info.value.field == "severities"


# --------------------------------------------------------------------------- the report


def _stripes(rng: np.random.Generator, n: int, side: int = 32):
    """Horizontal (label 0) or vertical (label 1) stripes, some faint and mixed with the other
    orientation so that the tiers make mistakes."""
    y, x = np.mgrid[0:side, 0:side]
    images, labels = [], []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        period, phase = rng.uniform(4, 9), rng.uniform(0, 2 * np.pi)
        main = np.sin(2 * np.pi * (x if label else y) / period + phase)
        other = np.sin(2 * np.pi * (y if label else x) / rng.uniform(4, 9))
        mix = rng.uniform(0.0, 0.9)
        image = 128 + 60 * (main + mix * other) / (1 + mix) + rng.normal(0, 6, (side, side))
        images.append(np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
        labels.append(label)
    return images, np.array(labels, np.int64)


def _orientation_tiers(images):
    """Cheap tier: vertical vs horizontal gradient energy, soft; strong tier: the same, sharper."""
    scores = []
    for image in images:
        grey = image[..., 0].astype(np.float64)
        dx = np.abs(np.diff(grey, axis=1)).mean() + 1.0
        dy = np.abs(np.diff(grey, axis=0)).mean() + 1.0
        scores.append(np.log(dx / dy))
    scores = np.array(scores)

    def probabilities(sharpness):
        p = 1.0 / (1.0 + np.exp(-sharpness * scores))
        return np.stack([1 - p, p], axis=1)

    return probabilities(2.0), probabilities(8.0)


@pytest.fixture(scope="module")
def robustness(tmp_path_factory):
    from evals.harness import evaluate
    from evals.report import write_report
    from evals.robustness_sets import ImageSet

    images, labels = _stripes(np.random.default_rng(0), 600)
    image_set = ImageSet("stripes", images, labels, ("horizontal", "vertical"), _orientation_tiers)
    result, context = evaluate_corruptions(
        image_set,
        corruptions=["gaussian_noise", "defocus_blur", "contrast"],
        severities=[1, 3, 5],
        seed=0,
        alpha=0.1,
        false_alarm_rate=0.02,
        guard_window=50,
    )
    out = tmp_path_factory.mktemp("robustness")
    report = evaluate(context["clean"], context["calibration"], context["test_rows"], out_dir=out)
    report["robustness"] = result
    report["plots"].update(robustness_plots(result, out))
    written = write_report(report, out)
    return result, context, written


def test_the_report_has_the_robustness_table_and_figures(robustness):
    result, _, written = robustness
    rows = result["rows"]
    assert [(r["corruption"], r["severity"]) for r in rows] == [("clean", 0)] + [
        (c, s) for c in ("gaussian_noise", "defocus_blur", "contrast") for s in (1, 3, 5)
    ]
    markdown = written["markdown"].read_text()
    assert "## Robustness: corruptions and the guarantee under shift" in markdown
    assert "| corruption | sev | accuracy | ECE | coverage | accepted error | bound |" in markdown
    assert "| contrast | 5 |" in markdown and "| clean | 0 |" in markdown
    stored = json.loads(written["json"].read_text())
    assert stored["robustness"]["rows"][0]["corruption"] == "clean"
    for name in ("robustness_metrics", "robustness_guarantee", "robustness_routing"):
        with open(stored["plots"][name], "rb") as handle:
            assert handle.read(8) == PNG_MAGIC
        assert f"![{name}]" in markdown
    for row in rows:
        rates = row["no_guard"]["routing"]["rates"]
        assert sum(rates.values()) == pytest.approx(1.0)
        assert 0.0 <= row["no_guard"]["accepted_error"] <= 1.0


def test_corruptions_hurt_and_the_guard_stops_accepting_them(robustness):
    result, _, _ = robustness
    by = {(r["corruption"], r["severity"]): r for r in result["rows"]}
    clean = by["clean", 0]
    assert clean["accuracy"] > 0.85
    assert clean["guard_fired"]["shifted"] <= 0.05  # false alarms on clean inputs stay rare
    assert clean["guard"]["coverage"] == pytest.approx(clean["no_guard"]["coverage"], abs=0.05)
    noisy = [by["gaussian_noise", s]["accuracy"] for s in (1, 3, 5)]
    assert noisy[2] < noisy[1] < noisy[0] <= clean["accuracy"] + 0.02  # noise hurts the tiers
    for name in ("contrast", "defocus_blur"):
        assert by[name, 5]["guard_fired"]["shifted"] > 0.9
        assert by[name, 5]["guard"]["coverage"] < 0.05 < by[name, 5]["no_guard"]["coverage"]
        assert by[name, 5]["guard"]["n_errors"] <= by[name, 5]["no_guard"]["n_errors"]
    # a guarded cheap accept becomes an escalation (there is a strong tier): cost goes up
    heavy = by["defocus_blur", 5]
    assert heavy["guard"]["routing"]["cost_per_1000"] > heavy["no_guard"]["routing"]["cost_per_1000"]


def test_the_calibration_artefact_carries_the_guard_reference(robustness, tmp_path):
    from cascades.calibration import load_calibration
    from policies.shift_guard import ShiftGuard, reference_from_artefact

    _, context, _ = robustness
    path = context["calibration"].calibrator.save(tmp_path / "calibration.json")
    assert load_calibration(path).certificate["split"]["seed"] == 0
    reference = reference_from_artefact(str(path))
    assert reference.n_fit == len(reference.holdout) == 150  # the fit and certify quarters of 600
    guard = ShiftGuard(reference, false_alarm_rate=0.02)
    images, _ = _stripes(np.random.default_rng(1), 3)
    assert not guard.check(images[0]).shifted
    assert guard.check(corrupt(images[0], "contrast", 5)).shifted


def test_the_eval_command_refuses_flags_it_cannot_use(tmp_path, capsys):
    from visionroute.cli import main

    for flags, field in [
        (["--predictions", str(tmp_path / "p.npz")], "predictions"),
        (["--calibration", str(tmp_path / "c.json")], "calibration"),
        (["--dataset", "cifar"], "dataset"),
        (["--corruptions", "snow"], "corruptions"),
        (["--severities", "0"], "severities"),
    ]:
        assert main(["eval", "--corruptions", *flags, "--out", str(tmp_path / "r")]) == 2, flags
        assert f"error ({field}):" in capsys.readouterr().err, flags
