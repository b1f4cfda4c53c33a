"""The commands end to end on real data: digits tiers trained here, exported to ONNX, run by
the service's ONNX runner; and a user's own folder + labels file through the ONNX stage."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cascades.calibration import load_calibration
from visionroute.cli import main

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("visionroute_home")
    previous = os.environ.get("VISIONROUTE_HOME")
    os.environ["VISIONROUTE_HOME"] = str(path)
    yield path
    if previous is None:
        del os.environ["VISIONROUTE_HOME"]
    else:
        os.environ["VISIONROUTE_HOME"] = previous


def test_calibrate_eval_gate_and_bench_on_digits(home, capsys):
    artefact = home / "cal" / "digits.json"
    assert main(["calibrate", "--out", str(artefact)]) == 0
    printed = capsys.readouterr().out
    assert "VisionRoute risk certificate" in printed and "alpha" in printed
    calibrator = load_calibration(artefact)
    certificate = calibrator.certificate
    assert (
        certificate["feasible"] and certificate["alpha"] == 0.05 and certificate["risk_upper_bound"] <= 0.05
    )
    assert certificate["three_tier"]["certificate"]["feasible"]
    assert artefact.with_suffix(".certificate.txt").read_text().startswith("VisionRoute risk certificate")

    run = home / "run"
    assert main(["eval", "--calibration", str(artefact), "--out", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["calibration"]["artifact_id"] == calibrator.artifact_id
    check = report["certified_risk_check"]["accept_threshold"]
    assert not check["violated"] and check["n_accepted"] > 100
    metrics = report["metrics"]
    assert metrics["cheap_calibrated"]["all"]["ece"] < metrics["cheap_raw"]["all"]["ece"]
    assert (
        metrics["strong"]["all"]["accuracy"] > metrics["cheap_raw"]["all"]["accuracy"] + 0.05
    )  # clearly stronger
    assert {"ink=light", "digit=8"} <= set(metrics["cascade"])
    need = report["frontier"]["escalation_needed"]
    assert need["cascade"] < need["random"]
    for plot in report["plots"].values():
        assert open(plot, "rb").read(8) == PNG_MAGIC
    assert "## Risk certificate" in (run / "report.md").read_text()

    # The gate: the run passes against itself, and fails naming the slice when the baseline is better.
    assert main(["gate", str(run / "report.json"), str(run / "report.json")]) == 0
    baseline = dict(report)
    baseline["metrics"] = json.loads(json.dumps(report["metrics"]))
    baseline["metrics"]["cascade"]["ink=light"]["accuracy"] = (
        1.2 * report["metrics"]["cascade"]["ink=light"]["accuracy"]
    )
    (home / "baseline.json").write_text(json.dumps(baseline))
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--calibration",
                str(artefact),
                "--out",
                str(home / "run2"),
                "--baseline",
                str(home / "baseline.json"),
            ]
        )
        == 1
    )
    assert "'ink=light'" in capsys.readouterr().err

    assert main(["bench", "calibration", "--splits", "10", "--power-splits", "20", "--sizes", "250"]) == 0
    printed = capsys.readouterr().out
    assert (
        "1. ECE" in printed and "2. validity" in printed and "3. fraction sent to the strong tier" in printed
    )


def test_a_users_folder_with_a_labels_file(home, capsys):
    """Images on disk + labels.csv with a metadata column, classified by an ONNX model through
    the service's ONNX stage (decoder and labels from the model's sidecar)."""
    import torch
    from PIL import Image

    from cascades.digits import CLASS_NAMES, load_split, train_tier

    split = load_split(0)
    cheap = train_tier("cheap", split, epochs=20)

    class RgbInput(torch.nn.Module):  # the ONNX stage feeds RGB; the tier reads one channel
        def __init__(self):
            super().__init__()
            self.tier = cheap

        def forward(self, x):
            return self.tier(x.mean(dim=1, keepdim=True))

    model_path = home / "user_model.onnx"
    torch.onnx.export(
        RgbInput().eval(),
        (torch.zeros(1, 3, 8, 8),),
        str(model_path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}},
    )
    sidecar = {
        "decoder": "classifier",
        "labels": list(CLASS_NAMES),
        "preprocess": {"size_hw": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1]},
    }
    model_path.with_suffix(".json").write_text(json.dumps(sidecar))

    images = home / "user_images"
    images.mkdir()
    rows = ["image,label,ink"]
    for i, (image, label) in enumerate(zip(split.images_pool[:400], split.labels_pool[:400])):
        pixels = np.round(image[0] * 255).astype(np.uint8)
        Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(images / f"{i}.png")
        rows.append(f"{i}.png,{label},{'heavy' if image.mean() > 0.3 else 'light'}")
    (home / "labels.csv").write_text("\n".join(rows) + "\n")

    artefact = home / "user_cal.json"
    common = ["--images", str(images), "--labels", str(home / "labels.csv"), "--model", str(model_path)]
    assert main(["calibrate", *common, "--alpha", "0.1", "--out", str(artefact)]) == 0
    assert load_calibration(artefact).artifact.n_samples == 100  # half of the 200 calibration items fit it
    assert (
        main(
            [
                "eval",
                *common,
                "--calibration",
                str(artefact),
                "--slice-by",
                "ink",
                "--out",
                str(home / "user_run"),
            ]
        )
        == 0
    )
    report = json.loads((home / "user_run" / "report.json").read_text())
    assert report["metrics"]["cheap_raw"]["all"]["accuracy"] > 0.7
    assert {"ink=heavy", "ink=light"} <= set(report["metrics"]["cheap_raw"])
    assert "frontier" not in report  # one tier: no cascade to compare

    (home / "labels_bad.csv").write_text("image,label\n0.png,eleven\n")
    bad = ["--images", str(images), "--labels", str(home / "labels_bad.csv"), "--model", str(model_path)]
    assert main(["calibrate", *bad]) == 2
    assert "eleven" in capsys.readouterr().err
