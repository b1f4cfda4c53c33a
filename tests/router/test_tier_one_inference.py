"""The cheap tier runs one inference at a time per replica (router/tiers.py): batch requests'
``predict_many`` calls queue behind each other instead of running on the same cores at once,
and each still gets its own images' answers."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from router.tiers import BatchedOnnxTier
from tests.router.colour_model import colour_app_config


def colour_tier(tmp_path) -> BatchedOnnxTier:
    config = colour_app_config(tmp_path)
    return BatchedOnnxTier(config.cascades["colour"].tier.model_dump(), str(config.models_dir), 8, 2.0)


def test_concurrent_batch_requests_never_run_their_inferences_at_once(tmp_path):
    tier = colour_tier(tmp_path)
    predict, running, most = tier.stage.predict, [0], [0]
    guard = threading.Lock()

    def counted(images):  # the worker thread's inference, counting how many run together
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.02)  # long enough for the other calls to arrive meanwhile
            return predict(images)
        finally:
            with guard:
                running[0] -= 1

    tier.stage.predict = counted
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((32, 32, 3), np.uint8)
    blue[..., 2] = 255

    async def four_requests():
        return await asyncio.gather(
            *(tier.predict_many([red, blue] if n % 2 else [blue, red]) for n in range(4))
        )

    answers = asyncio.run(four_requests())
    assert most[0] == 1
    for n, answer in enumerate(answers):
        labels = [result.detections.class_names[int(result.detections.class_id[0])] for result in answer]
        assert labels == (["red", "blue"] if n % 2 else ["blue", "red"])
