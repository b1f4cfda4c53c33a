"""The two-stage training loop the example LLaVAs share (``train_digits``, ``textures_vlm``).

Each example brings its data (images rendered as the RGB uploads the VLM stage sends), its
augmentation, its prompt and its recipe; this module builds the tiny LLaVA
(``examples.tiny_llava``) and trains it in two seeded stages:
1. the vision tower and projector, with a throw-away linear head on the mean image token, learn
   the labels (the language model is not run);
2. the model learns to answer the prompt with ``{"label":"..."}`` then end of sequence
   (cross-entropy on the answer tokens only), optionally with the vision tower frozen.

A change here changes both models: bump both examples' ``BUILD_VERSION`` so their caches retrain.
Only the standard library is imported at module level (``train_digits`` runs as a script in the
vLLM venv and loads this file by path, handing it ``tiny_llava`` the same way).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Recipe:
    image_size: int
    patch_size: int
    batch_size: int
    vision_epochs: int
    vision_lr: float
    answer_epochs: int
    answer_lr: float
    torch_threads: int
    vision_hidden_size: int | None = None  # None: tiny_llava's default width
    freeze_vision_in_answer_stage: bool = False


@dataclass
class TrainedLlava:
    model: Any
    tokenizer: Any
    config: Any
    pixels: Pixels
    prompt_text: str
    prompt_ids: Any
    answer_inputs: Any
    answer_position: int
    vision_loss: float
    answer_loss: float
    train_accuracy: float
    train_seconds: float
    train_cpu_seconds: float

    def label_probabilities(self, uploads) -> Any:
        """(n, C) P(label | image, prompt) for RGB uploads."""
        return label_probabilities(
            self.model, self.prompt_ids, self.answer_inputs, self.answer_position, self.pixels(uploads)
        )


def answer_json(label: str) -> str:
    """The answer exactly as vLLM's structured outputs spell it (no whitespace)."""
    return json.dumps({"label": label}, separators=(",", ":"))


def inputs_sha256(key: str, images, labels, prompt: str) -> str:
    """What a model was trained on: ``key`` (the recipe's version, the seed, ...), images, labels
    and prompt."""
    import numpy as np

    digest = hashlib.sha256(key.encode())
    digest.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    digest.update(prompt.encode("utf-8"))
    return digest.hexdigest()


def check_inputs(n_images: int, labels, n_labels: int, vision_epochs: int, answer_epochs: int) -> None:
    if n_images != len(labels) or len(labels) == 0:
        raise ValueError(
            f"images and labels: expected equal, non-zero lengths, got {n_images} and {len(labels)}"
        )
    if labels.min() < 0 or labels.max() >= n_labels:
        raise ValueError(f"labels: expected class ids in 0..{n_labels - 1}")
    if vision_epochs < 1 or answer_epochs < 1:
        raise ValueError(f"epochs: expected at least 1 of each, got {vision_epochs} and {answer_epochs}")


@contextlib.contextmanager
def torch_threads(count: int):
    """Torch on ``count`` threads inside (reproducible, and it leaves cores to the rest)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Pixels:
    """CLIP normalisation as the processor does it; checked against the processor once."""

    def __init__(self, processor) -> None:
        import torch

        image_processor = processor.image_processor
        self.mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)

    def __call__(self, rgb_batch):
        import numpy as np
        import torch

        pixels = torch.from_numpy(np.stack(rgb_batch).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        return (pixels - self.mean) / self.std


def prompt_ids(processor, prompt: str, example_rgb):
    """The chat prompt as vLLM builds it (image part first, placeholder expanded): its text, its
    token ids and the processor's pixels for ``example_rgb`` (to check ``Pixels`` against)."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "-"}}, {"type": "text", "text": prompt}],
        }
    ]
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    encoded = processor(text=text, images=[example_rgb], return_tensors="pt")
    return text, encoded["input_ids"][0], encoded["pixel_values"]


def answer_tokens(tokenizer, label_names) -> tuple[Any, Any, int]:
    """The answers as token ids, right-padded: (inputs (C, L) padded with the pad token, targets
    (C, L) padded with -100, the position where they first differ). Checks that each answer has
    its own token there (the in-process probabilities rely on it)."""
    import torch

    rows = [
        tokenizer(answer_json(label), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for label in label_names
    ]
    length = max(map(len, rows))
    inputs = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        inputs[i, : len(row)] = torch.tensor(row)
        targets[i, : len(row)] = torch.tensor(row)
    shortest = min(map(len, rows))
    differing = [p for p in range(shortest) if len({row[p] for row in rows}) > 1]
    if not differing or len({row[differing[0]] for row in rows}) != len(rows):
        raise RuntimeError("the labels' answers must differ first at a token of their own; rename the labels")
    return inputs, targets, differing[0]


def label_probabilities(model, prompt_ids, answer_inputs, position: int, pixel_values, *, batch: int = 64):
    """(n, C) P(label | image, prompt): the softmax over the labels' own tokens at ``position``
    after the answers' common prefix (what vLLM reports after the grammar's mask)."""
    import torch

    prefix = answer_inputs[0, :position]
    choices = answer_inputs[:, position]
    rows = []
    with torch.no_grad():
        for start in range(0, len(pixel_values), batch):
            pixels = pixel_values[start : start + batch]
            ids = torch.cat([prompt_ids, prefix]).expand(len(pixels), -1)
            logits = model(input_ids=ids, pixel_values=pixels, logits_to_keep=1).logits[:, -1]
            rows.append(logits[:, choices].softmax(-1))
    return torch.cat(rows).double().numpy()


def train(
    tiny_llava,
    uploads: list,
    labels,
    label_names: tuple[str, ...],
    prompt: str,
    out_dir: Path,
    *,
    recipe: Recipe,
    augment,
    seed: int,
    progress=None,
) -> TrainedLlava:
    """Build the tiny LLaVA (its tokenizer written into ``out_dir``) and train it on ``uploads``
    (RGB uint8) and ``labels`` (int64 ids into ``label_names``); ``augment`` maps an upload to a
    training view. Call it inside ``torch_threads(recipe.torch_threads)``; nothing is saved."""
    import numpy as np
    import torch
    from transformers import LlavaForConditionalGeneration

    started, cpu_started = time.monotonic(), time.process_time()
    say = progress or (lambda message: None)
    torch.manual_seed(seed)
    tokenizer = tiny_llava.build_tokenizer(out_dir)
    sizes = {} if recipe.vision_hidden_size is None else {"vision_hidden_size": recipe.vision_hidden_size}
    config = tiny_llava.llava_config(
        tokenizer, image_size=recipe.image_size, patch_size=recipe.patch_size, **sizes
    )
    model = LlavaForConditionalGeneration(config)
    processor = tiny_llava.make_processor(tokenizer, recipe.image_size, recipe.patch_size)
    pixels = Pixels(processor)
    prompt_text, ids, processor_pixels = prompt_ids(processor, prompt, uploads[0])
    if not torch.allclose(pixels([uploads[0]]), processor_pixels, atol=1e-5):
        raise RuntimeError("the trainer's pixel normalisation differs from the processor's; fix Pixels")
    answer_inputs, answer_targets, position = answer_tokens(tokenizer, label_names)
    y = torch.from_numpy(np.asarray(labels, np.int64))
    batches = _Batches(len(y), recipe.batch_size, torch.Generator().manual_seed(seed))

    def views(batch):
        return pixels([augment(uploads[i]) for i in batch.tolist()])

    vision_loss = _fit_vision(model, config, views, y, batches, recipe, len(label_names), say)
    answer_loss = _fit_answers(model, views, y, batches, recipe, ids, answer_inputs, answer_targets, say)
    model.eval()
    probabilities = label_probabilities(model, ids, answer_inputs, position, pixels(uploads))
    return TrainedLlava(
        model=model,
        tokenizer=tokenizer,
        config=config,
        pixels=pixels,
        prompt_text=prompt_text,
        prompt_ids=ids,
        answer_inputs=answer_inputs,
        answer_position=position,
        vision_loss=vision_loss,
        answer_loss=answer_loss,
        train_accuracy=float((probabilities.argmax(1) == y.numpy()).mean()),
        train_seconds=time.monotonic() - started,
        train_cpu_seconds=time.process_time() - cpu_started,
    )


class _Batches:
    """Seeded shuffles of the training rows, one per epoch, from one generator for both stages."""

    def __init__(self, n: int, size: int, generator) -> None:
        self.n, self.size, self.generator = n, size, generator
        self.per_epoch = -(-n // size)

    def epoch(self):
        import torch

        return torch.randperm(self.n, generator=self.generator).split(self.size)


def _one_cycle(optimiser, lr: float, epochs: int, batches: _Batches):
    import torch

    return torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=lr, total_steps=epochs * batches.per_epoch, pct_start=0.15
    )


def _step(loss, optimiser, schedule, *, clip=None) -> None:
    """One optimiser and schedule step on ``loss``; ``clip``: parameters whose gradient norm is
    clipped to 1 first."""
    import torch

    optimiser.zero_grad()
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimiser.step()
    schedule.step()


def _fit_vision(model, config, views, y, batches: _Batches, recipe: Recipe, n_labels: int, say) -> float:
    """Stage 1: the vision tower and projector learn the labels through a throw-away head."""
    import torch
    from torch.nn import functional

    head = torch.nn.Linear(config.text_config.hidden_size, n_labels)
    vision = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    optimiser = torch.optim.AdamW([*vision, *head.parameters()], lr=recipe.vision_lr, weight_decay=0.01)
    schedule = _one_cycle(optimiser, recipe.vision_lr, recipe.vision_epochs, batches)
    model.train()
    for epoch in range(recipe.vision_epochs):
        total = 0.0
        for batch in batches.epoch():
            features = model.model.get_image_features(
                pixel_values=views(batch),
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            ).pooler_output
            loss = functional.cross_entropy(head(torch.stack(list(features)).mean(1)), y[batch])
            _step(loss, optimiser, schedule)
            total += loss.item() * len(batch)
        say(f"vision epoch {epoch + 1}/{recipe.vision_epochs}: loss {total / len(y):.4f}")
    return total / len(y)


def _fit_answers(
    model, views, y, batches: _Batches, recipe: Recipe, prompt_ids, answer_inputs, answer_targets, say
) -> float:
    """Stage 2: the model answers the prompt; loss on the answer tokens only."""
    import torch
    from torch.nn import functional

    if recipe.freeze_vision_in_answer_stage:
        for parameter in model.model.vision_tower.parameters():
            parameter.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=recipe.answer_lr, weight_decay=0.01)
    schedule = _one_cycle(optimiser, recipe.answer_lr, recipe.answer_epochs, batches)
    length = answer_inputs.shape[1]
    for epoch in range(recipe.answer_epochs):
        total = 0.0
        for batch in batches.epoch():
            ids = torch.cat([prompt_ids.expand(len(batch), -1), answer_inputs[y[batch]]], dim=1)
            # logits at the last prompt position and the answer's: each predicts the next token
            logits = model(input_ids=ids, pixel_values=views(batch), logits_to_keep=length + 1).logits[:, :-1]
            target = answer_targets[y[batch]]
            loss = functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
            )
            _step(loss, optimiser, schedule, clip=model.parameters())
            total += loss.item() * len(batch)
        say(f"answer epoch {epoch + 1}/{recipe.answer_epochs}: loss {total / len(y):.4f}")
    return total / len(y)


def save(
    tiny_llava,
    trained: TrainedLlava,
    out_dir: Path,
    *,
    recipe: Recipe,
    build_version: str,
    served_model_name: str,
    label_names: tuple[str, ...],
    seed: int,
    n_train: int,
    inputs_sha256: str,
    augmentation: dict[str, Any],
) -> dict[str, Any]:
    """Save the model for vLLM into ``out_dir`` with ``visionroute_build.json``; returns it."""
    import torch
    import transformers

    renamed = tiny_llava.save_for_vllm(trained.model, trained.tokenizer, out_dir)
    sizes = {"image_size": recipe.image_size, "patch_size": recipe.patch_size}
    if recipe.vision_hidden_size is not None:
        sizes["vision_hidden_size"] = recipe.vision_hidden_size
    frozen = {"vision_frozen_in_answer_stage": True} if recipe.freeze_vision_in_answer_stage else {}
    manifest = {
        "build_version": build_version,
        "served_model_name": served_model_name,
        "labels": list(label_names),
        **sizes,
        "parameters": sum(p.numel() for p in trained.model.parameters()),
        "vocab_size": len(trained.tokenizer),
        "image_token_id": trained.config.image_token_id,
        "renamed_vision_keys": renamed,
        "seed": seed,
        "n_train": n_train,
        "prompt_text": trained.prompt_text,
        "prompt_token_ids": trained.prompt_ids.tolist(),  # what vLLM must build from the stage's request
        "inputs_sha256": inputs_sha256,
        "recipe": {
            "torch_threads": recipe.torch_threads,
            "batch_size": recipe.batch_size,
            "vision_epochs": recipe.vision_epochs,
            "vision_lr": recipe.vision_lr,
            "answer_epochs": recipe.answer_epochs,
            "answer_lr": recipe.answer_lr,
            "augmentation": augmentation,
            **frozen,
        },
        "final_vision_loss": round(trained.vision_loss, 5),
        "final_answer_loss": round(trained.answer_loss, 5),
        "train_accuracy": round(trained.train_accuracy, 5),
        "train_seconds": round(trained.train_seconds, 2),
        "train_cpu_seconds": round(trained.train_cpu_seconds, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "weights_sha256": tiny_llava.weights_sha256(out_dir),
    }
    (out_dir / "visionroute_build.json").write_text(json.dumps(manifest, indent=2))
    return manifest
