"""Embedders by config ``kind``: ``conse`` (offline default) and ``open_clip``."""

from __future__ import annotations

from retrieval.config import ConseConfig, OpenClipConfig
from retrieval.embedders.base import Embedder, l2_normalise


def build_embedder(config: ConseConfig | OpenClipConfig) -> Embedder:
    if isinstance(config, ConseConfig):
        from retrieval.embedders.conse import ConseEmbedder

        return ConseEmbedder(config)
    if isinstance(config, OpenClipConfig):
        from retrieval.embedders.open_clip import OpenClipEmbedder

        return OpenClipEmbedder(config)
    raise TypeError(f"unknown embedder config {type(config).__name__}")


__all__ = ["Embedder", "build_embedder", "l2_normalise"]
