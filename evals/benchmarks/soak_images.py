"""The soak's images: one per seed, so every analysis is its own review item and search entry."""

from __future__ import annotations

import io

import numpy as np


def noise_png(seed: int, size: int = 64) -> bytes:
    """A unique image per seed: every analysis is its own review item and search entry."""
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
