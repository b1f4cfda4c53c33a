"""The learned router's pixel embedding has a version in the artefact (issue 22, the router
stage's latency): version 2 (new routers) resizes the upload's bounded copy, for a grey
embedding the very copy the input block reads, so a request makes it once; the score the stage
serves is the score calibration certified; an artefact stored before the version (no key) is
served the full-upload embedding (version 1) it was fitted on; an unknown version is a
ConfigError naming the field. The stage's inline/thread choice reads the features' own CPU time."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest

import cascades.router_calibration as router_calibration
from cascades.learned_router import RouterArtefact
from cascades.pipeline import CascadeRun
from cascades.router_calibration import RouterData, calibrate_router
from cascades.router_features import (
    EMBEDDING_VERSION,
    FeatureSpec,
    bounded_copy,
    bounded_grey,
    bounded_input_statistics,
)
from cascades.router_stage import RouterScoreStage, ServedRouter, output_probabilities, pixel_embedder
from policies.certify import split_indices
from policies.risk_control import TierCosts
from policies.thresholds import ThresholdPolicy
from visionroute.errors import ConfigError
from visionroute.records import Analysis, Detections, Trace

CLASSES = ("a", "b", "c")
N_ITEMS = 90


@pytest.fixture(scope="module")
def uploads() -> list[np.ndarray]:
    """The bench's photos and crops of them, 150 to 640 px a side (the astronaut, 512 px, is
    box-averaged by the bounded copy first), as decoded uploads are (RGB uint8)."""
    from cascades.images import decode_image
    from evals.benchmarks.serve import bench_photos

    photos = [decode_image(data).rgb for data in bench_photos().values()]
    rng = np.random.default_rng(5)
    images = []
    for k in range(N_ITEMS):
        photo = photos[k % len(photos)]
        share = 1.0 if k < len(photos) else rng.uniform(0.5, 1.0)  # each photo whole once
        height, width = (int(d * share) for d in photo.shape[:2])
        images.append(np.ascontiguousarray(photo[:height, :width]))
    return images


@pytest.fixture(scope="module")
def calibrated(uploads):
    """``calibrate_router`` on the uploads with every feature block (the default spec), and the
    learned score of each certification item as the certificate was computed on it."""
    rng = np.random.default_rng(6)
    probabilities = rng.dirichlet(np.ones(3) * 0.7, N_ITEMS)
    answers = probabilities.argmax(1)
    labels = np.where(
        rng.random(N_ITEMS) < 0.05 + 0.6 * (1 - probabilities.max(1)), (answers + 1) % 3, answers
    )
    vlm_right = rng.random(N_ITEMS) < 0.9
    data = RouterData(
        CLASSES,
        probabilities,
        labels,
        np.where(vlm_right, labels, (labels + 1) % 3),
        np.where(vlm_right, 0.9, 0.4),
        uploads,
        "photo crops",
    )
    splits = split_indices(N_ITEMS, seed=0, calibration_fraction=0.8)
    certified = {}
    certify = router_calibration.certify_router_plans

    def recording(artefact, **kwargs):
        certified["scores"] = np.asarray(kwargs["learned_certification"].cheap_score)
        return certify(artefact, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(router_calibration, "certify_router_plans", recording)
        result = calibrate_router(
            data,
            splits.fit,
            splits.certify,
            splits.test,
            alpha=0.3,
            delta=0.1,
            costs=TierCosts(cheap=1, escalate=10, review=100),
        )
    return result, data, splits.certify, certified["scores"]


def served_score(router: ServedRouter, image: np.ndarray, detections: Detections) -> float:
    """The score the stage serves for one request (its ``router`` step)."""
    analysis = Analysis(image_rgb=image, image_sha256="x", task="t", trace=Trace("r"), detections=detections)
    state = CascadeRun(analysis, cheap_tier=None, thresholds=ThresholdPolicy())
    asyncio.run(RouterScoreStage({"t": router}).run(state))
    (step,) = analysis.trace.steps
    assert step.error is None and step.details["fallback"] is False and step.details["ran"] == "inline"
    return step.score


def test_the_served_score_is_the_certified_score(tmp_path, calibrated, uploads):
    result, data, certify_rows, certified_scores = calibrated
    document = json.loads(result.artefact.save(tmp_path / "router.json").read_text())
    assert document["features"]["embedding_version"] == EMBEDDING_VERSION == 2
    assert document["features"]["input_version"] == 2
    router = ServedRouter.from_artefact(RouterArtefact.load(tmp_path / "router.json", class_names=CLASSES))
    for row, certified in zip(certify_rows, certified_scores):
        image = uploads[row]
        # the answer rows as the served tier gives them: the top rows, then the tier's calibrator
        detections = result.calibrator.apply(
            Detections.from_class_probabilities(
                data.probabilities[row], list(CLASSES), width=image.shape[1], height=image.shape[0], top_k=5
            )
        )
        # one row against calibration's batch: equal up to the order of a float sum
        assert served_score(router, image, detections) == pytest.approx(certified, rel=1e-12, abs=1e-12)


def test_version_2_reads_the_input_blocks_bounded_copy(uploads):
    embed = pixel_embedder(64)  # the default: version 2
    for image in uploads[:12]:
        grey = bounded_grey(image)
        # the stage hands the copy it made for the input block: the same numbers as calibration's
        np.testing.assert_array_equal(embed(image, grey=grey), embed(image))
        np.testing.assert_array_equal(bounded_input_statistics(grey), bounded_input_statistics(image))
        assert min(grey.work.shape) <= 224 and grey.work.dtype == np.float32
    # an RGB embedding (3 s^2) resizes the RGB upload's bounded copy
    image = uploads[0]
    rgb = pixel_embedder(12)(image)
    assert rgb.shape == (1, 12)
    np.testing.assert_array_equal(rgb, pixel_embedder(12)(np.ascontiguousarray(image)))
    assert bounded_copy(image).work.shape[2] == 3


def test_an_artefact_stored_before_the_version_is_served_as_fitted(tmp_path, calibrated, uploads):
    result, data, _, _ = calibrated
    artefact = result.artefact
    # the same router as a build before embedding versions would have stored it: no key
    old = dataclasses.replace(artefact, spec=dataclasses.replace(artefact.spec, embedding_version=1))
    old_document = old.to_document()
    assert "embedding_version" not in old_document["features"]
    (tmp_path / "old.json").write_text(json.dumps({**old_document, "sha256": old.sha256}))
    loaded = RouterArtefact.load(tmp_path / "old.json", class_names=CLASSES)
    assert loaded.spec.embedding_version == 1 and loaded.sha256 == old.sha256
    served = ServedRouter.from_artefact(loaded)
    names = loaded.spec.names
    nearest = names.index("nn_distance_min")
    large = next(image for image in uploads if min(image.shape[:2]) >= 448)  # box-averaged by version 2
    for image in (large, *uploads[:4]):
        detections = Detections.from_class_probabilities(
            data.probabilities[0], list(CLASSES), width=image.shape[1], height=image.shape[0]
        )
        analysis = Analysis(image_rgb=image, image_sha256="x", task="t", detections=detections)
        offline = loaded.features(
            output=output_probabilities(detections, len(CLASSES)),  # the answer rows (float32)
            cheap_answers=np.asarray([int(detections.class_id[0])]),
            input_statistics=loaded.spec.input_statistics([image]),
            embeddings=pixel_embedder(64, version=1)(image),  # the whole upload, as before
        )
        np.testing.assert_allclose(served.features(analysis), offline, rtol=1e-12, atol=1e-12)
    # the two definitions are different numbers: the version decides which the index is searched with
    assert not np.array_equal(pixel_embedder(64, version=1)(large), pixel_embedder(64, version=2)(large))
    analysis = Analysis(image_rgb=large, image_sha256="x", task="t", detections=detections)
    v2 = ServedRouter.from_artefact(artefact).features(analysis)
    assert v2[0, nearest] != served.features(analysis)[0, nearest]


def test_an_unknown_embedding_version_is_refused_naming_the_field(tmp_path, calibrated):
    result, *_ = calibrated
    document = result.artefact.to_document()
    document["features"]["embedding_version"] = 3
    (tmp_path / "future.json").write_text(json.dumps(document))
    with pytest.raises(ConfigError) as error:
        RouterArtefact.load(tmp_path / "future.json")
    assert error.value.field == "router.features.embedding_version"
    with pytest.raises(ConfigError) as error:
        FeatureSpec(embedding_version=True)
    assert error.value.field == "features.embedding_version"


def test_the_inline_choice_reads_the_features_cpu_time(calibrated, uploads, monkeypatch):
    """A request whose thread waited for a core (wall 500 ms, CPU 0.5 ms) keeps the features on
    the event loop; features whose own work is slow (CPU 500 ms) move to a thread."""
    result, data, _, _ = calibrated
    router = ServedRouter.from_artefact(result.artefact)
    image = uploads[1]
    detections = Detections.from_class_probabilities(
        data.probabilities[1], list(CLASSES), width=image.shape[1], height=image.shape[0]
    )
    measured = ServedRouter.scored

    def ran(stage: RouterScoreStage) -> str:
        analysis = Analysis(
            image_rgb=image, image_sha256="x", task="t", trace=Trace("r"), detections=detections
        )
        asyncio.run(stage.run(CascadeRun(analysis, cheap_tier=None, thresholds=ThresholdPolicy())))
        return analysis.trace.steps[0].details["ran"]

    monkeypatch.setattr(ServedRouter, "scored", lambda self, a: (*measured(self, a)[:2], 500.0, 0.5))
    waited = RouterScoreStage({"t": router})
    assert [ran(waited) for _ in range(4)] == ["inline"] * 4
    monkeypatch.setattr(ServedRouter, "scored", lambda self, a: (*measured(self, a)[:2], 500.0, 500.0))
    slow = RouterScoreStage({"t": router})
    assert [ran(slow) for _ in range(3)] == ["inline", "inline", "thread"]
