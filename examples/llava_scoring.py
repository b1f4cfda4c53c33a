"""A trained tiny LLaVA read back from its folder to score new images in-process.

Training (``examples.llava_training.train``) returns a model that scores the images it is given
then (``probabilities.npz`` beside the textures LLaVA holds the clean patches only); this reads
a saved one (``save_for_vllm``'s files and ``visionroute_build.json``) to score others, e.g.
the corrupted patches ``bench loop --task textures`` replays. The prompt is the manifest's own
token ids (what the model was trained on and vLLM builds from the stage's request), the answers
are tokenised by the saved tokenizer, and P(label | image, prompt) is
``llava_training.label_probabilities``: the same softmax over the labels' first differing
answer token as at training, so a loaded model reproduces the training run's probabilities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from examples import llava_training

MANIFEST = "visionroute_build.json"


@dataclass(frozen=True)
class LlavaScorer:
    model: Any
    manifest: dict[str, Any]
    pixels: llava_training.Pixels
    prompt_ids: Any
    answer_inputs: Any
    answer_position: int

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.manifest["labels"])

    def label_probabilities(self, uploads: list[np.ndarray], *, batch: int = 64) -> np.ndarray:
        """(n, C) P(label | image, prompt) for RGB uint8 uploads of the trained size."""
        return llava_training.label_probabilities(
            self.model,
            self.prompt_ids,
            self.answer_inputs,
            self.answer_position,
            self.pixels(uploads),
            batch=batch,
        )


def load(model_dir: Path) -> LlavaScorer:
    """The LLaVA saved in ``model_dir`` (weights, tokenizer, processor, manifest with its labels,
    image and patch size and prompt token ids), in eval mode. Raises ``ValueError`` naming what is
    missing when the folder is not a trained LLaVA of this project."""
    import torch
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    from examples import tiny_llava

    model_dir = Path(model_dir)
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"model_dir: {model_dir} has no readable {MANIFEST} ({error})") from None
    missing = [k for k in ("labels", "image_size", "patch_size", "prompt_token_ids") if k not in manifest]
    if missing:
        raise ValueError(f"model_dir: {model_dir / MANIFEST} lacks {missing}: not a trained LLaVA")
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    processor = tiny_llava.make_processor(tokenizer, manifest["image_size"], manifest["patch_size"])
    answer_inputs, _, position = llava_training.answer_tokens(tokenizer, manifest["labels"])
    return LlavaScorer(
        model=model,
        manifest=manifest,
        pixels=llava_training.Pixels(processor),
        prompt_ids=torch.tensor(manifest["prompt_token_ids"], dtype=torch.long),
        answer_inputs=answer_inputs,
        answer_position=position,
    )
