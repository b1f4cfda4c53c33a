"""A stored router document of a hostile shape (an uploaded artefact, a file edited by hand) is a
ConfigError naming the field, never a crash or an allocation sized by the document."""

from __future__ import annotations

import copy

import pytest

from cascades.learned_router import RouterArtefact
from tests.router.test_router_stage import fitted_artefact
from visionroute.errors import ConfigError


@pytest.fixture(scope="module")
def document() -> dict:
    return fitted_artefact().to_document()


def nested(depth: int):
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("features", "top_k"), 2**70, "router.features.top_k"),  # would ask for 2**70 feature names
        (("features", "top_k"), "3", "router.features.top_k"),
        (("features", "top_k"), True, "router.features.top_k"),
        (("features", "neighbours_k"), -1, "router.features.neighbours_k"),
        (("features", "use_input"), "yes", "router.features.use_input"),
        (("features", "output"), ["classifier"], "router.features.output"),
        (("class_names",), 7, "router.class_names"),
        (("class_names",), [1, 2, 3], "router.class_names"),
        (("embedding",), nested(5000), "router"),
        (("learner_sha256",), nested(5000), "router"),
    ],
)
def test_a_hostile_field_is_a_config_error_naming_it(document, path, value, field):
    hostile = copy.deepcopy(document)
    target = hostile
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ConfigError) as refused:
        RouterArtefact.from_document(hostile)
    assert refused.value.field == field


def test_the_untouched_document_still_loads(document):
    assert RouterArtefact.from_document(copy.deepcopy(document)).sha256 == fitted_artefact().sha256
