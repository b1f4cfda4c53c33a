"""Recalibration of a task served by a learned router, through the service core (no Ray): the
router's traces and the stored images -> the router refit from production labels, its reference
index extended with the fit share, both plans certified on the rest -> a stored artefact.

The incumbent router's learned plan accepts nothing (accept threshold 0.9999), so every request
is reviewed (inclusion probability 1). The reviewer's truth disagrees with the colour model on
half of its unsure answers (top-1 below 0.8), so the learner sees both outcomes.
"""

from __future__ import annotations

import asyncio
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from router.services import ImageRequest
from router.services.recalibration import (
    RecalibrationRequest,
    Refused,
    build_router_artefact,
)
from tests.router.colour_model import LABELS
from tests.router.test_rollouts import review_everything
from tests.router.test_router_stage import colour_config, fitted_artefact, service_for


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


async def labelled_traffic(service, n: int) -> dict[str, str]:
    rng = np.random.default_rng(11)
    truth_of = {}
    for i in range(n):
        image = np.clip(rng.integers(0, 256, 3)[None, None, :] + rng.normal(0, 8, (48, 48, 3)), 0, 255)
        analysis = await service.analyze.analyze(ImageRequest(png(image.astype(np.uint8)), f"r-{i}"), None)
        answer = analysis.detections.labels[0] if len(analysis.detections) else LABELS[0]
        confidence = float(analysis.detections.confidence[0]) if len(analysis.detections) else 0.0
        # the model is wrong on half of its unsure answers: something a router can learn
        flip = confidence < 0.8 and hashlib.sha256(f"r-{i}".encode()).digest()[0] < 128
        truth_of[analysis.trace.request_id] = LABELS[(LABELS.index(answer) + 1) % 3] if flip else answer
    await review_everything(service, truth_of)
    return truth_of


# The refit router certified on items it never saw, proposed, shadowed, promoted and served:
# tests/router/test_rollout_router.py (one run of 260 labelled requests for both).


def test_a_routed_task_without_its_feature_vectors_is_refused_saying_what_is_missing(tmp_path):
    incumbent = fitted_artefact(learned=(0.9999, 0.0))
    service = service_for(colour_config(tmp_path, incumbent.save(tmp_path / "router.json")))
    asyncio.run(labelled_traffic(service, 12))
    items = list(service.review.queue.iter_all())
    options = dict(
        request=RecalibrationRequest(task="colour", alpha=0.3, delta=0.2),
        incumbent=service.config.cascades["colour"].policy,
        has_vlm=False,
        embed=lambda item: None,
    )
    other = fitted_artefact(learned=(0.5, 0.0))  # another router version: its traces are not these
    with pytest.raises(Refused) as caught:
        build_router_artefact(items, router=other, erased=set(), **options)
    assert "feature vector" in caught.value.reason and incumbent.sha256[:12] in caught.value.reason
    assert "the running version stays" in caught.value.reason
    with pytest.raises(Refused, match="no review items"):  # erased items never enter
        build_router_artefact(items, router=incumbent, erased={i.id for i in items}, **options)
