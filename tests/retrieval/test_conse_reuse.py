"""Indexing an analysed image reuses the cheap tier's class probabilities (no second classifier
run) exactly when ConSE would compute the same ones: the same model file, preprocessed the same
way. The indexed vector is then the one embedding the pixels gives; any other source is embedded
from the pixels as before."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from cascades.onnx_stage import OnnxStage, OnnxStageConfig
from retrieval.config import RetrievalConfig
from retrieval.service import SearchService
from visionroute.records import Analysis, Decision, Step

NAMES = ("coffee", "chelsea", "horse", "rocket", "astronaut", "camera")


@pytest.fixture(scope="module")
def tier(classifier_path) -> OnnxStage:
    """The classify tier as the shipped config builds it (the prepared file, its sidecar)."""
    return OnnxStage(OnnxStageConfig(model=str(classifier_path)))


@pytest.fixture(scope="module")
def tier_answers(tier, photos):
    detections, _ = tier.predict([photos[name] for name in NAMES])
    return dict(zip(NAMES, detections))


def analysed(name: str, photos, detections) -> Analysis:
    analysis = Analysis(
        image_rgb=photos[name],
        image_sha256=hashlib.sha256(name.encode()).hexdigest(),
        task="classify",
        tenant="reuse",
    )
    analysis.detections = detections
    analysis.trace.append(Step(stage="policy:thresholds", decision=Decision.ACCEPT))
    return analysis


def test_reused_embedding_equals_the_recomputed_one(conse_embedder, tier_answers, photos):
    given = [tier_answers[name].class_probabilities for name in NAMES]
    assert all(conse_embedder.reuses(p) for p in given)
    reused = conse_embedder.embed_probabilities(np.stack([p.values for p in given]))
    recomputed = conse_embedder.embed_images([photos[name] for name in NAMES])
    # Same file, same preprocessing code: equal up to ONNX Runtime's batch-size rounding.
    np.testing.assert_allclose(reused, recomputed, rtol=0, atol=1e-6)
    assert (reused @ recomputed.T).argmax(axis=1).tolist() == list(range(len(NAMES)))


def test_probabilities_are_raw_and_whole(tier_answers):
    coffee = tier_answers["coffee"]
    values = coffee.class_probabilities.values
    assert values.shape == (1000,) and abs(values.sum() - 1) < 1e-9
    assert int(values.argmax()) == int(coffee.class_id[0])  # the answer's top class is the softmax's


def test_other_model_or_preprocessing_is_not_reused(conse_embedder, classifier_path, tier_answers, photos):
    own = tier_answers["coffee"].class_probabilities
    other_file = dataclasses.replace(own, model_sha256="0" * 64)
    assert not conse_embedder.reuses(other_file)
    assert not conse_embedder.reuses(None)
    cropping = OnnxStage(
        OnnxStageConfig(model=str(classifier_path), decoder_options={"resize": "center_crop"})
    )
    cropped = cropping.predict([photos["coffee"]])[0][0].class_probabilities
    assert cropped.model_sha256 == own.model_sha256 and not conse_embedder.reuses(cropped)
    bgr = OnnxStage(OnnxStageConfig(model=str(classifier_path), channels="BGR"))
    assert not conse_embedder.reuses(bgr.predict([photos["coffee"]])[0][0].class_probabilities)


def test_index_analyses_reuses_the_tier_and_embeds_the_rest(
    tmp_path, conse_config, conse_embedder, tier_answers, photos, monkeypatch
):
    config = RetrievalConfig(index_dir=tmp_path / "index", embedder=conse_config, index_analysed=True)
    with SearchService(config, embedder=conse_embedder) as service:
        runs: list[int] = []
        run = conse_embedder.classifier.run
        monkeypatch.setattr(
            conse_embedder.classifier, "run", lambda batch: runs.append(len(batch)) or run(batch)
        )
        foreign = dataclasses.replace(
            tier_answers["horse"],
            class_probabilities=dataclasses.replace(
                tier_answers["horse"].class_probabilities, model_sha256="f" * 64
            ),
        )
        analyses = [
            analysed("coffee", photos, tier_answers["coffee"]),
            analysed("horse", photos, foreign),  # another model's probabilities: embedded from pixels
            analysed("chelsea", photos, tier_answers["chelsea"]),
        ]
        ids = service.index_analyses(analyses)
        assert runs == [1]  # one classifier run, for the horse only
        assert service.reused_embeddings == 2
        stored = np.stack([service.index.get(i)[1] for i in ids])
        recomputed = conse_embedder.embed_images([photos["coffee"], photos["horse"], photos["chelsea"]])
        np.testing.assert_allclose(stored, recomputed, rtol=0, atol=1e-6)
        hits = service.search_text("a cup of coffee", k=1, filters={"tenant": "reuse"}).hits
        assert [h.id for h in hits] == [ids[0]]


def test_the_service_indexes_from_the_tiers_probabilities(
    tmp_path, classifier_path, conse_config, conse_embedder, monkeypatch
):
    """Through the analyse pipeline (the shipped config's classify cascade, tier and search in
    process): the tier's probabilities ride on the request's answer to the index, which runs no
    classifier of its own, and the stored vector is the one the pixels give."""
    import asyncio
    import io

    from PIL import Image
    from skimage import data

    from evals.benchmarks.serve import service_args
    from router.config import parse_app_config
    from router.services import ImageRequest, VisionRouteService
    from router.services.backends import LocalOnnxTier, LocalSearch

    args = service_args(classifier_path.parent, tmp_path, "ingress", True, 8, None)
    args["cascades"] = {"classify": args["cascades"]["classify"]}
    args["retrieval"].update(embedder=conse_config.model_dump(mode="json"), index_queue={"mode": "durable"})
    config = parse_app_config(args)
    tier = LocalOnnxTier(config.cascades["classify"].tier.model_dump(), config.models_dir)
    search = SearchService(config.retrieval, embedder=conse_embedder)
    service = VisionRouteService.build(config, tiers={"classify": tier}, search=LocalSearch(search))
    runs: list[int] = []
    run = conse_embedder.classifier.run
    monkeypatch.setattr(conse_embedder.classifier, "run", lambda batch: runs.append(len(batch)) or run(batch))
    jpeg = io.BytesIO()
    Image.fromarray(data.coffee()).save(jpeg, format="JPEG", quality=90)

    analysis = asyncio.run(service.analyze.analyze(ImageRequest(jpeg.getvalue(), "reuse-1"), None))
    step = next(s for s in analysis.trace if s.stage == "retrieval:index")
    assert step.details["search_index"] == {"mode": "durable", "status": "indexed"}
    assert runs == [] and search.reused_embeddings == 1
    stored = search.index.get(step.details["search_id"])[1]
    np.testing.assert_allclose(
        stored, conse_embedder.embed_images([analysis.image_rgb])[0], rtol=0, atol=1e-6
    )
    search.close()
