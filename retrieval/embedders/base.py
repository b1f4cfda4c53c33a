"""The embedder interface: images and texts into one L2-normalised space."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Embedder(Protocol):
    #: Names the embedding space; vectors from different spaces are never compared. A saved
    #: index remembers it, and opening it with another embedder is a config error.
    space: str
    dim: int

    def embed_images(self, images_rgb: Sequence[np.ndarray]) -> np.ndarray:
        """(n, dim) float32 unit rows for (h, w, 3) uint8 RGB images."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 unit rows."""


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Normalise once, where embeddings are made (the index only checks)."""
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("cannot normalise a zero embedding")
    return np.ascontiguousarray(vectors / norms, np.float32)


def check_rgb(image: np.ndarray, index: int = 0) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise ValueError(
            f"image {index} must be (h, w, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}"
        )
    return image
