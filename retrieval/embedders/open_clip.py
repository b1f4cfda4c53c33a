"""open_clip models: any model name, weights from a local checkpoint or a hub tag.

Batched; fp16 on a GPU, fp32 on a CPU. ``export_image_onnx`` writes the image tower to ONNX,
and with ``image_onnx_path`` set the images are embedded by ONNX Runtime (the CPU path) while
texts still go through the PyTorch text tower.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cascades.onnx_runner import OnnxModel
from retrieval.config import OpenClipConfig
from retrieval.embedders.base import check_rgb, l2_normalise
from visionroute.errors import ConfigError

log = logging.getLogger(__name__)


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _resolve_pretrained(pretrained: str | None) -> str | None:
    """A local checkpoint file (absolute path), or a pretrained tag passed through."""
    if not pretrained:
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path.resolve())
    if os.sep in pretrained or path.suffix in CHECKPOINT_SUFFIXES:
        raise ConfigError(
            f"checkpoint file {pretrained!r} does not exist", field="retrieval.embedder.pretrained"
        )
    return pretrained  # a tag such as "laion2b_s34b_b79k": open_clip fetches it from the hub


class OpenClipEmbedder:
    def __init__(self, config: OpenClipConfig | None = None) -> None:
        try:
            import open_clip
        except ImportError as exc:
            raise ConfigError(
                f"retrieval.embedder.kind 'open_clip' needs open_clip ({exc}): pip install 'visionroute[openclip]'",
                field="retrieval.embedder.kind",
            ) from None
        import torch

        self.config = config or OpenClipConfig()
        self.torch = torch
        if self.config.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = self.config.device
        precision = self.config.precision
        if precision == "auto":
            precision = "fp16" if self.device.startswith("cuda") else "fp32"
        self.precision = precision
        pretrained = _resolve_pretrained(self.config.pretrained)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.config.model_name, pretrained=pretrained, precision=precision, device=self.device
            )
            self.tokenizer = open_clip.get_tokenizer(self.config.model_name)
        except RuntimeError as exc:  # open_clip raises RuntimeError for unknown models / tags
            raise ConfigError(
                f"cannot build open_clip model {self.config.model_name!r} with pretrained={pretrained!r}: {exc}",
                field="retrieval.embedder",
            ) from exc
        model.eval()
        self.model = model
        self.preprocess_one = preprocess
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.dim = int(self._embed_dim())
        self.image_size = self._image_size()
        # The checkpoint's file name, not its path: moving the file keeps the index usable.
        weights = (
            Path(pretrained).name if pretrained and Path(pretrained).is_file() else (pretrained or "random")
        )
        self.space = f"open_clip:{self.config.model_name}:{weights}"
        self.onnx_image = OnnxModel(self.config.image_onnx_path) if self.config.image_onnx_path else None

    def _embed_dim(self) -> int:
        with self.torch.no_grad():
            tokens = self.tokenizer(["probe"]).to(self.device)
            return self.model.encode_text(tokens).shape[-1]

    def _image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def preprocess(self, images_rgb: Sequence[np.ndarray]):
        return self.torch.stack(
            [self.preprocess_one(Image.fromarray(check_rgb(im, i))) for i, im in enumerate(images_rgb)]
        )

    def embed_images(self, images_rgb: Sequence[np.ndarray]) -> np.ndarray:
        if len(images_rgb) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for start in range(0, len(images_rgb), self.config.batch_size):
            batch = self.preprocess(images_rgb[start : start + self.config.batch_size])
            if self.onnx_image is not None:
                out.append(self.onnx_image.run(batch.numpy())[0])
                continue
            with self.torch.no_grad():
                features = self.model.encode_image(batch.to(self.device, self.dtype))
            out.append(features.float().cpu().numpy())
        return l2_normalise(np.concatenate(out))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for start in range(0, len(texts), self.config.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.config.batch_size])).to(self.device)
            with self.torch.no_grad():
                out.append(self.model.encode_text(tokens).float().cpu().numpy())
        return l2_normalise(np.concatenate(out))

    def export_image_onnx(self, path: str | Path, opset: int = 17) -> Path:
        """Write the image tower (fp32, dynamic batch) to ``path`` atomically."""
        torch = self.torch
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        visual = self.model.visual.float().cpu().eval()

        class ImageTower(torch.nn.Module):
            def __init__(self, tower):
                super().__init__()
                self.tower = tower

            def forward(self, images):
                return self.tower(images)

        height, width = self.image_size
        try:
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp_dir, warnings.catch_warnings():
                # Shape checks inside attention are traced as constants: expected, not a problem.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                tmp = Path(tmp_dir) / path.name
                torch.onnx.export(
                    ImageTower(visual),
                    torch.zeros(1, 3, height, width),
                    str(tmp),
                    dynamo=False,  # a single opset-17 file (the dynamo exporter writes .onnx.data)
                    opset_version=opset,
                    input_names=["images"],
                    output_names=["embeddings"],
                    dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                )
                os.replace(tmp, path)
        finally:
            # Put the tower back where the model runs (export needs fp32 on the CPU).
            self.model.visual.to(self.device, self.dtype)
        log.info("exported %s image tower to %s", self.config.model_name, path)
        return path
