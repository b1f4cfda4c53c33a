"""SearchService end to end on the offline default (ConSE over real packaged models and photos)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from retrieval.config import RetrievalConfig
from retrieval.service import SearchService
from visionroute.errors import ConfigError, InputError, NotFound, UnsupportedMediaType
from visionroute.records import Analysis, Decision, Detections, Step

# Text query -> the bundled photo it must rank first among all of them.
QUERIES = {
    "a cup of coffee": "coffee",
    "a cat": "chelsea",
    "a horse": "horse",
    "a rocket": "rocket",
    "a man with a camera": "camera",
}


@pytest.fixture(scope="module")
def service(tmp_path_factory, conse_config, conse_embedder, photos):
    config = RetrievalConfig(
        index_dir=tmp_path_factory.mktemp("index"), embedder=conse_config, index_analysed=True
    )
    service = SearchService(config, embedder=conse_embedder)
    names = list(photos)
    ids = service.index_images(
        [photos[n] for n in names],
        [
            {"tenant": "demo", "tags": ["animal"] if n in ("chelsea", "horse") else [], "extra": {"name": n}}
            for n in names
        ],
    )
    service.ids = dict(zip(names, ids))
    yield service
    service.close()


def top_name(response) -> str:
    return response.hits[0].metadata.extra["name"]


@pytest.mark.parametrize("query, expected", QUERIES.items())
def test_text_query_ranks_the_right_photo_first(service, query, expected):
    response = service.search_text(query, k=3)
    assert top_name(response) == expected, [
        (h.metadata.extra["name"], round(h.score, 3)) for h in response.hits
    ]


def test_conse_embeddings_are_unit_and_discriminative(conse_embedder, photos):
    vectors = conse_embedder.embed_images([photos["coffee"], photos["chelsea"]])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    texts = conse_embedder.embed_texts(["a cup of coffee", "a cat"])
    similarity = texts @ vectors.T
    assert similarity[0, 0] > similarity[0, 1] and similarity[1, 1] > similarity[1, 0]


def test_search_by_image_bytes_and_by_id(service, photos):
    buffer = io.BytesIO()
    Image.fromarray(photos["chelsea"]).resize((200, 150)).save(buffer, format="JPEG")
    response = service.search_image(buffer.getvalue(), k=2)
    assert top_name(response) == "chelsea"
    by_id = service.search_by_id(service.ids["coffee"], k=3)
    assert service.ids["coffee"] not in [h.id for h in by_id.hits]  # the item itself is excluded
    assert by_id.query_id == service.ids["coffee"] and len(by_id.hits) == 3
    as_dict = response.model_dump()
    assert set(as_dict["hits"][0]) == {"id", "score", "metadata"}


def test_filters_restrict_results(service):
    response = service.search_text("a cup of coffee", k=5, filters={"tags_any": ["animal"]})
    assert {h.metadata.extra["name"] for h in response.hits} == {"chelsea", "horse"}
    assert service.search_text("a cat", k=5, filters={"tenant": "nobody"}).hits == []


def test_bad_input_is_a_clear_error_and_index_intact(service, photos):
    count = service.stats()["items"]
    for query in ("", "   ", None):
        with pytest.raises(InputError) as error:
            service.search_text(query)
        assert error.value.field == "query"
    with pytest.raises(InputError) as error:
        service.search_text("a cat", k=0)
    assert error.value.field == "k"
    with pytest.raises(InputError) as error:
        service.search_text("a cat", filters={"colour": "red"})
    assert error.value.field == "filters.colour" and "tenant" in error.value.reason
    with pytest.raises(InputError) as error:
        service.search_text("a cat", params={"nprobe": 0})
    assert error.value.field == "params.nprobe"
    with pytest.raises(NotFound):
        service.delete(10**9)
    with pytest.raises(NotFound):
        service.search_by_id(10**9)
    with pytest.raises(UnsupportedMediaType):
        service.index_image(b"not an image")
    with pytest.raises(InputError, match="uint8"):
        service.index_image(np.zeros((4, 4), np.float32))
    with pytest.raises(InputError) as error:
        service.index_image(photos["coffee"], {"tenant": "x", "colour": "red"})
    assert error.value.field == "metadata.colour"
    assert service.stats()["items"] == count


def test_index_delete_and_cascade_integration(service, photos):
    item_id = service.index_image(photos["coffee"][::2, ::2].copy(), {"tenant": "other"})
    assert service.get(item_id)["metadata"]["tenant"] == "other"
    service.delete(item_id)
    with pytest.raises(NotFound):
        service.get(item_id)

    analysis = Analysis(
        image_rgb=photos["chelsea"],
        image_sha256="c" * 64,
        task="classify",
        tenant="demo",
        review_item_id="rq-1",
    )
    analysis.detections = Detections.from_class_probabilities(
        np.eye(3)[1], ["dog", "cat", "cup"], width=10, height=10, top_k=1
    )
    analysis.trace.append(Step(stage="policy:thresholds", decision=Decision.REVIEW))
    first = service.index_analysis(analysis)
    assert service.index_analysis(analysis) == first  # same image, same tenant: replaced, not doubled
    metadata = service.get(first)["metadata"]
    assert set(metadata["tags"]) == {"task:classify", "decision:review", "label:cat"}
    in_review = service.search_text("a cat", k=5, filters={"in_review": True})
    assert [h.id for h in in_review.hits] == [first]
    service.delete(first)


def test_mismatched_embedder_at_start_names_both(service, tmp_path):
    class Other:
        space, dim = "open_clip:ViT-B-32:random", 512

        def embed_images(self, images):  # pragma: no cover - never called
            raise AssertionError

        embed_texts = embed_images

    config = RetrievalConfig(index_dir=tmp_path, embedder=service.config.embedder)
    SearchService(config, embedder=service.embedder).close()
    with pytest.raises(ConfigError) as error:
        SearchService(config, embedder=Other())
    assert "384-d" in error.value.reason and "512-d" in error.value.reason
    assert "open_clip:ViT-B-32:random" in error.value.reason and "conse:" in error.value.reason


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="extra"):
        RetrievalConfig.model_validate({"index": {"kind": "exact", "colour": 1}})
    with pytest.raises(ValueError):
        RetrievalConfig.model_validate({"embedder": {"kind": "nope"}})
    assert (
        RetrievalConfig.model_validate(
            {"embedder": {"kind": "open_clip", "model_name": "ViT-B-16"}}
        ).embedder.model_name
        == "ViT-B-16"
    )
