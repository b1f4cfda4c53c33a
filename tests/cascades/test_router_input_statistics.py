"""The learned router's input block (cascades/router_features.py, issue 22): version 2 computes
the shift guard's five statistics on a bounded copy of the upload and still reads what they mean
(size, light, contrast, blur, JPEG blocks) on real photos; the version is stored in the artefact,
an artefact stored before it (version 1) is served with the guard's full-resolution statistics it
was fitted on, an unknown one is a ConfigError naming the field; the served stage and calibration
compute the block with the same function; features run on the event loop only while cheap."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from cascades.learned_router import CertifiedThresholds, RouterArtefact, RouterPlans, fit_router
from cascades.pipeline import CascadeRun
from cascades.router_features import (
    INPUT_VERSION,
    FeatureSpec,
    ReferenceIndex,
    bounded_input_statistics,
    classifier_features,
    input_features,
    input_statistics,
    window_blockiness,
)
from cascades.router_stage import (
    INLINE_BELOW_MS,
    RouterScoreStage,
    ServedRouter,
    output_probabilities,
    pixel_embedder,
)
from policies.shift_guard import _blockiness
from policies.shift_guard import input_statistics as guard_statistics
from policies.thresholds import ThresholdPolicy
from visionroute.errors import ConfigError, InputError
from visionroute.records import Analysis, Detections, Trace

CLASSES = ("a", "b", "c")


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """The bench's skimage photos, JPEG-decoded as an upload is (300x451 to 512x640)."""
    from cascades.images import decode_image
    from evals.benchmarks.serve import bench_photos

    return {name: decode_image(data).rgb for name, data in bench_photos().items()}


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


# -- what version 2 measures --------------------------------------------------------------------


def test_version_2_reads_size_light_and_contrast_as_the_guard_does(photos):
    for name, image in photos.items():
        full, bounded = guard_statistics(image), bounded_input_statistics(image)
        assert min(image.shape[:2]) > 224  # every photo takes the bounded path
        assert bounded[0] == full[0], name  # log2 pixels of the whole upload
        np.testing.assert_allclose(bounded[1:3], full[1:3], atol=0.01, err_msg=name)
        # sharpness on a differently shrunk copy: the same scale, not the same number
        assert abs(bounded[3] - full[3]) < 0.5, name


def test_version_2_sees_blur_and_heavy_jpeg(photos):
    for name, image in photos.items():
        sharp = bounded_input_statistics(image)
        blurred = bounded_input_statistics(cv2.GaussianBlur(image, (0, 0), 2.0))
        assert blurred[3] < sharp[3] - 0.5, name
        assert (
            bounded_input_statistics(jpeg(image, 10))[4] > bounded_input_statistics(jpeg(image, 95))[4] + 0.3
        )


def test_the_blockiness_window_is_the_guards_formula(photos):
    grey = cv2.cvtColor(photos["astronaut"], cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    grey8 = cv2.cvtColor(photos["astronaut"], cv2.COLOR_RGB2GRAY)
    for height, width in ((128, 128), (40, 17), (16, 16), (15, 15), (128, 100)):
        window = grey[:height, :width]
        assert window_blockiness(window) == pytest.approx(_blockiness(window), abs=1e-5)
        window8 = grey8[:height, :width]  # uint8 steps, on grey levels / 255
        expected = _blockiness(window8.astype(np.float32) / 255.0)
        assert window_blockiness(window8, 1 / 255) == pytest.approx(expected, abs=1e-5)


def test_grey_uploads_small_images_and_floats(photos):
    grey = cv2.cvtColor(photos["camera"], cv2.COLOR_RGB2GRAY)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)  # how calibration hands a grey item to the router
    np.testing.assert_array_equal(bounded_input_statistics(grey), bounded_input_statistics(rgb))
    as_float = bounded_input_statistics(rgb.astype(np.float32) / 255.0)
    np.testing.assert_allclose(as_float, bounded_input_statistics(rgb), atol=0.05)
    digit = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    assert np.isfinite(bounded_input_statistics(digit)).all()
    assert bounded_input_statistics(digit)[0] == pytest.approx(np.log2(28 * 28))


@pytest.mark.parametrize(
    "image",
    [np.zeros((4, 4, 3), np.int32), np.zeros((2, 3, 4, 5), np.uint8), np.zeros((0, 5, 3), np.uint8)],
    ids=["int32", "4-d", "empty"],
)
def test_bad_images_are_input_errors(image):
    with pytest.raises(InputError) as error:
        input_statistics(image)
    assert error.value.field == "image"


# -- the version in the artefact ----------------------------------------------------------------


def test_the_spec_stores_its_input_version():
    spec = FeatureSpec()
    assert spec.input_version == INPUT_VERSION == 2
    assert spec.to_document()["input_version"] == 2
    assert FeatureSpec.from_document(spec.to_document()) == spec
    no_input = FeatureSpec(use_input=False)
    assert "input_version" not in no_input.to_document()
    assert FeatureSpec.from_document(no_input.to_document()) == no_input
    stored_before = {"output": "classifier", "top_k": 3, "use_input": True, "neighbours_k": 0}
    assert FeatureSpec.from_document(stored_before).input_version == 1
    assert FeatureSpec.from_document(stored_before).to_document() == stored_before  # its sha256 holds
    with pytest.raises(ConfigError) as error:
        FeatureSpec(input_version=7)
    assert error.value.field == "features.input_version"


def router_artefact(spec: FeatureSpec) -> RouterArtefact:
    """A served router on output, input and (with ``spec.neighbours_k``) 8x8 grey pixel
    neighbour features, fitted on noisy 32 px colours."""
    rng = np.random.default_rng(3)
    n = 60
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
    embed = pixel_embedder(64)
    probabilities = rng.dirichlet(np.ones(3), n)
    answers = probabilities.argmax(1)
    labels = np.where(rng.random(n) < 0.3, (answers + 1) % 3, answers)
    fitted = fit_router(
        class_names=CLASSES,
        spec=spec,
        output=probabilities,
        cheap_answers=answers,
        labels=labels,
        input_statistics=spec.input_statistics(images),
        embeddings=np.vstack([embed(image) for image in images]) if spec.neighbours_k else None,
    )

    def plan(score, accept, escalate):
        document = {"accept_threshold": accept, "review_threshold": escalate, "certificate": {"n": 0}}
        return CertifiedThresholds.from_document(document, score=score, field="router.plans")

    plans = RouterPlans(plan("learned", 0.6, 0.2), plan("top1", 0.9, 0.5), 0.1, 0.1)
    return dataclasses.replace(fitted.artefact, plans=plans)


def analysis_of(image: np.ndarray, task: str = "t") -> Analysis:
    analysis = Analysis(image_rgb=image, image_sha256="x", task=task, trace=Trace("r"))
    analysis.detections = Detections.from_class_probabilities(
        np.array([0.7, 0.2, 0.1], np.float32), list(CLASSES), width=image.shape[1], height=image.shape[0]
    )
    return analysis


def input_block(router: ServedRouter, image: np.ndarray) -> np.ndarray:
    names = router.artefact.spec.names
    features = router.features(analysis_of(image))[0]
    return features[
        [names.index(n) for n in ("log2_pixels", "brightness", "contrast", "sharpness", "blockiness")]
    ]


def test_each_artefact_is_served_the_input_block_it_was_fitted_on(tmp_path, photos):
    photo = photos["coffee"]
    new = router_artefact(FeatureSpec(neighbours_k=0))
    document = json.loads(new.save(tmp_path / "router.json").read_text())
    assert document["features"]["input_version"] == 2
    served = ServedRouter.from_artefact(RouterArtefact.load(tmp_path / "router.json"))
    np.testing.assert_array_equal(input_block(served, photo), bounded_input_statistics(photo))
    # calibration's function (FeatureSpec.input_statistics) gives the served numbers
    np.testing.assert_array_equal(
        input_block(served, photo), served.artefact.spec.input_statistics([photo])[0]
    )

    # with grey pixel neighbours too (the stage converts the upload to grey once for both)
    with_neighbours = ServedRouter.from_artefact(router_artefact(FeatureSpec(neighbours_k=3)))
    analysis = analysis_of(photo)
    offline = with_neighbours.artefact.features(
        output=output_probabilities(analysis.detections, len(CLASSES)),
        cheap_answers=np.asarray(analysis.detections.class_id[:1], np.int64),
        input_statistics=with_neighbours.artefact.spec.input_statistics([photo]),
        embeddings=pixel_embedder(64)(photo),
    )
    np.testing.assert_array_equal(with_neighbours.features(analysis), offline)

    # a router stored before the version existed: fitted on the guard's full-resolution block
    old = router_artefact(FeatureSpec(neighbours_k=0, input_version=1))
    old_document = old.to_document()
    assert "input_version" not in old_document["features"]
    (tmp_path / "old.json").write_text(json.dumps(old_document))
    served_old = ServedRouter.from_artefact(RouterArtefact.load(tmp_path / "old.json"))
    assert served_old.artefact.spec.input_version == 1
    np.testing.assert_array_equal(input_block(served_old, photo), guard_statistics(photo))
    np.testing.assert_array_equal(input_features([photo], 1)[0], guard_statistics(photo))

    # a version this build does not know: refused at load, naming the field
    document["features"]["input_version"] = 3
    del document["sha256"]
    (tmp_path / "future.json").write_text(json.dumps(document))
    with pytest.raises(ConfigError) as error:
        RouterArtefact.load(tmp_path / "future.json")
    assert error.value.field == "router.features.input_version"


# -- where the stage runs the features ------------------------------------------------------------


def test_the_features_run_on_the_event_loop_only_while_cheap_and_unbounded(photos, monkeypatch):
    router = ServedRouter.from_artefact(router_artefact(FeatureSpec(neighbours_k=0)))
    stage = RouterScoreStage({"t": router})

    def ran(stage, router, task="t") -> str:
        state = CascadeRun(
            analysis_of(photos["chelsea"], task), cheap_tier=None, thresholds=ThresholdPolicy()
        )
        stage.routers[task] = router
        asyncio.run(stage.run(state))
        (step,) = state.analysis.trace.steps
        assert step.error is None and step.details["fallback"] is False
        return step.details["ran"]

    assert ran(stage, router) == "inline"  # nothing measured yet
    stage._typical_ms["t"] = 10 * INLINE_BELOW_MS  # features that typically take long: a thread
    assert ran(stage, router) == "thread"
    # each request moves the estimate: it never sticks above the limit once the features are cheap
    assert stage._typical_ms["t"] < 10 * INLINE_BELOW_MS
    limited = dataclasses.replace(router, timeout_s=30.0)  # a time limit is enforced from a thread
    assert ran(RouterScoreStage({}), limited, task="u") == "thread"

    # features that always take 500 ms: one such request (a cold start) keeps the loop, two do not
    measured = ServedRouter.scored
    monkeypatch.setattr(ServedRouter, "scored", lambda self, a: (*measured(self, a)[:2], 500.0, 500.0))
    slow = RouterScoreStage({})
    assert [ran(slow, router) for _ in range(4)] == ["inline", "inline", "thread", "thread"]


def test_a_single_row_over_many_classes_equals_its_batch_row():
    rng = np.random.default_rng(1)
    for classes in (10, 1000):
        p = rng.dirichlet(np.full(classes, 0.1), 4)
        for row in range(4):
            np.testing.assert_allclose(
                classifier_features(p[row : row + 1])[0], classifier_features(p)[row], rtol=1e-12, atol=1e-15
            )
    index = ReferenceIndex.from_items(rng.random((50, 16)), rng.integers(0, 200, 50), 200)
    p = rng.dirichlet(np.full(200, 0.1), 3)
    queries, answers = rng.random((3, 16)), p.argmax(1)
    batch = index.neighbour_features(queries, answers, 5, probabilities=p)
    for row in range(3):
        one = index.neighbour_features(
            queries[row : row + 1], answers[row : row + 1], 5, probabilities=p[row : row + 1]
        )
        np.testing.assert_allclose(one[0], batch[row], rtol=1e-12, atol=1e-12)
