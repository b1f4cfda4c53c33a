"""How the small torch classifiers of the example tiers are trained and exported.

The digits tiers (cascades/digits.py) and the textures cheap tier (examples/textures.py) share
one recipe: Adam on seeded minibatches, plain cross-entropy (no weight decay or label smoothing:
the raw confidences are whatever training left, and calibration fixes them), then ONNX (opset
17, the TorchScript exporter, a dynamic batch axis) for ``cascades.onnx_runner.OnnxModel``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BATCH_SIZE = 64


def fit_classifier(model, images: np.ndarray, labels: np.ndarray, *, lr: float, epochs: int, seed: int):
    """Train ``model`` in place on ``images`` (n, C, H, W) and ``labels`` (n,) int64 ids; returns it
    in eval mode. Deterministic for a seed on CPU (seed torch before building the model too).

    On one torch thread: these models are tiny, so a second thread only adds synchronisation (on
    a busy 2-core machine the strong digits tier took ~50 CPU-s on two threads, ~2.5 on one), and
    the weights then do not depend on the machine's core count (the reduction order does)."""
    import torch
    from torch import nn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.from_numpy(np.ascontiguousarray(images, np.float32))
        y = torch.from_numpy(labels)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        loss_fn = nn.CrossEntropyLoss()
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(y), generator=generator).split(BATCH_SIZE):
                optimiser.zero_grad()
                loss_fn(model(x[batch]), y[batch]).backward()
                optimiser.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


def export_classifier_onnx(model, path: Path, input_shape: tuple[int, ...]) -> None:
    """``model`` as ONNX at ``path``: input ``image`` of ``input_shape`` (batch first, any batch
    size), output ``logits``."""
    import torch

    torch.onnx.export(
        model,
        (torch.zeros(*input_shape),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
