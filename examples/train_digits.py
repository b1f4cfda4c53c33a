"""Train the tiny LLaVA on scikit-learn's digits to answer the VLM tier's classify prompt.

The random-weight tiny LLaVA (``tiny_llava.py``) writes noise; this one reads digits. Same
architecture (CLIP vision tower, MLP projector, 2-layer Llama, the same byte-level BPE and chat
template), with one change of sizes: the 8x8 digit is upsampled to a single 28 px patch, so the
vision tower sees the whole digit in one token. With 16 patches each token holds a 2x2 corner of
the digit and, on 718 training images, the model could not learn in minutes where each piece sat.

It is trained on the exact request the VLM stage sends (``cascades.vlm.prompts``: the classify
prompt with labels "0".."9", the image part before the text) to answer the exact JSON vLLM's
structured outputs produce with whitespace disabled, ``{"label":"7"}``, then end of sequence.
The caller passes the prompt, so the model and the stage cannot drift apart unnoticed: the
prompt is part of ``inputs_sha256`` in the manifest.

Two seeded stages on CPU (one torch thread: reproducible, and it leaves a core to the rest):
1. the vision tower and projector, with a throw-away linear head on the image token, learn
   the digits (about 10 CPU-seconds: 2 tokens per image);
2. the whole model learns to answer the prompt (cross-entropy on the answer tokens only).
Augmentation: small rotations and shifts, and a JPEG round trip half the time (the stage sends
JPEG by default). Training images are those ``cascades.digits.load_split`` reserves for training.

Run it with the vLLM venv's Python (its transformers writes files vLLM loads)::

    .venv-vllm/bin/python examples/train_digits.py OUT_DIR INPUTS.npz

where INPUTS.npz holds ``images`` (n, 8, 8) in [0, 1], ``labels`` (n,) and ``prompt`` (the
user text). ``examples.vllm_server.ensure_digits_llava()`` writes that file and runs this for
you. Only the standard library is imported at module level.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

# Change this (or the training recipe below) and ensure_digits_llava() retrains.
BUILD_VERSION = "digits-llava-1"
SERVED_MODEL_NAME = "digits-llava"
LABELS = tuple(str(d) for d in range(10))
IMAGE_SIZE = 28  # the vision tower's input: the 8x8 digit upsampled (bicubic)
PATCH_SIZE = 28  # one patch: one image token holding the whole digit
SEED = 0
TORCH_THREADS = 1
BATCH_SIZE = 32
VISION_EPOCHS = 30
VISION_LR = 3e-3
ANSWER_EPOCHS = 12
ANSWER_LR = 3e-3
MAX_ROTATION_DEG = 10.0
MAX_SHIFT_PX = 2  # at 28 px, about half an original pixel
JPEG_PROBABILITY = 0.5


def answer_json(label: str) -> str:
    """The answer exactly as vLLM's structured outputs spell it (no whitespace)."""
    return json.dumps({"label": label}, separators=(",", ":"))


def render_digit(image):
    """An 8x8 digit in [0, 1] (sklearn's layout: white ink on black, (8, 8) or (1, 8, 8)) as the
    RGB uint8 image the VLM receives, upsampled to ``IMAGE_SIZE`` so the server's resize is a no-op.
    """
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float32)
    if pixels.shape == (1, 8, 8):
        pixels = pixels[0]
    if pixels.shape != (8, 8):
        raise ValueError(f"image: expected an 8x8 digit (or 1x8x8), got shape {pixels.shape}")
    if not np.isfinite(pixels).all() or pixels.min() < 0.0 or pixels.max() > 1.0:
        raise ValueError("image: expected finite values in [0, 1] (sklearn's digits / 16)")
    grey = Image.fromarray(np.round(pixels * 255.0).astype(np.uint8), "L")
    grey = grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return np.array(grey.convert("RGB"))  # a writable copy (torch warns on read-only arrays)


def _tiny_llava():
    """tiny_llava, whether this file runs as a script (no package) or is imported."""
    if __package__:
        from examples import tiny_llava
    else:
        import importlib.util

        spec = importlib.util.spec_from_file_location("tiny_llava", Path(__file__).with_name("tiny_llava.py"))
        tiny_llava = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tiny_llava)
    return tiny_llava


def inputs_sha256(images, labels, prompt: str, seed: int) -> str:
    """What the model was trained on: images, labels, prompt and seed (and the recipe's version)."""
    import numpy as np

    digest = hashlib.sha256(f"{BUILD_VERSION}:seed={seed}".encode())
    digest.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    digest.update(prompt.encode("utf-8"))
    return digest.hexdigest()


class _Augmenter:
    """Seeded rotation, shift and JPEG round trip on rendered digits."""

    def __init__(self, seed: int) -> None:
        import numpy as np

        self.rng = np.random.default_rng(seed)

    def __call__(self, rgb):
        import io

        import numpy as np
        from PIL import Image

        image = Image.fromarray(rgb)
        angle = float(self.rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
        dx, dy = (int(v) for v in self.rng.integers(-MAX_SHIFT_PX, MAX_SHIFT_PX + 1, size=2))
        image = image.rotate(
            angle, resample=Image.Resampling.BICUBIC, translate=(dx, dy), fillcolor=(0, 0, 0)
        )
        if self.rng.random() < JPEG_PROBABILITY:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            image = Image.open(buffer).convert("RGB")
        return np.array(image)


class _Pixels:
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


def _prompt_ids(processor, prompt: str, example_rgb):
    """Token ids of the chat prompt as vLLM builds it (image placeholder expanded), and a check
    that our pixel path equals the processor's."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "-"}}, {"type": "text", "text": prompt}],
        }
    ]
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    encoded = processor(text=text, images=[example_rgb], return_tensors="pt")
    return text, encoded["input_ids"][0], encoded["pixel_values"]


def train(
    images,
    labels,
    prompt: str,
    out_dir: Path,
    *,
    seed: int = SEED,
    vision_epochs: int = VISION_EPOCHS,
    answer_epochs: int = ANSWER_EPOCHS,
    progress=None,
) -> dict:
    """Train, save for vLLM into ``out_dir``, write ``visionroute_build.json``; returns it.

    The epoch counts are parameters only so tests can check determinism quickly; the served
    model always uses the defaults (the manifest records what was used).
    """
    import numpy as np
    import torch
    import transformers
    from torch.nn import functional
    from transformers import LlavaForConditionalGeneration

    started, cpu_started = time.monotonic(), time.process_time()
    images = np.asarray(images, dtype=np.float32).reshape(-1, 8, 8)
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError(
            f"images and labels: expected equal, non-zero lengths, got {len(images)} and {len(labels)}"
        )
    if labels.min() < 0 or labels.max() >= len(LABELS):
        raise ValueError(f"labels: expected values in 0..{len(LABELS) - 1}")
    if vision_epochs < 1 or answer_epochs < 1:
        raise ValueError(f"epochs: expected at least 1 of each, got {vision_epochs} and {answer_epochs}")
    say = progress or (lambda message: None)
    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(seed)
    tiny = _tiny_llava()
    tokenizer = tiny.build_tokenizer(out_dir)
    config = tiny.llava_config(tokenizer, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    model = LlavaForConditionalGeneration(config)
    processor = tiny.make_processor(tokenizer, IMAGE_SIZE, PATCH_SIZE)

    rendered = [render_digit(image) for image in images]
    pixels = _Pixels(processor)
    prompt_text, prompt_ids, processor_pixels = _prompt_ids(processor, prompt, rendered[0])
    if not torch.allclose(pixels([rendered[0]]), processor_pixels, atol=1e-5):
        raise RuntimeError("the trainer's pixel normalisation differs from the processor's; fix _Pixels")
    answers = torch.tensor(
        [
            tokenizer(answer_json(label), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for label in LABELS
        ]
    )
    if len({tuple(row.tolist()) for row in answers}) != len(LABELS):
        raise RuntimeError("the answers must tokenise to distinct sequences")
    augment = _Augmenter(seed)
    order = torch.Generator().manual_seed(seed)
    y = torch.from_numpy(labels)

    # Stage 1: the vision tower and projector learn the digits (the LM is not run).
    head = torch.nn.Linear(config.text_config.hidden_size, len(LABELS))
    vision_params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    optimiser = torch.optim.AdamW([*vision_params, *head.parameters()], lr=VISION_LR, weight_decay=0.01)
    steps = vision_epochs * -(-len(y) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=VISION_LR, total_steps=steps, pct_start=0.15
    )
    model.train()
    for epoch in range(vision_epochs):
        total = 0.0
        for batch in torch.randperm(len(y), generator=order).split(BATCH_SIZE):
            features = model.model.get_image_features(
                pixel_values=pixels([augment(rendered[i]) for i in batch.tolist()]),
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            ).pooler_output
            loss = functional.cross_entropy(head(torch.stack(list(features)).mean(1)), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(batch)
        say(f"vision epoch {epoch + 1}/{vision_epochs}: loss {total / len(y):.4f}")
    vision_loss = total / len(y)

    # Stage 2: the whole model answers the prompt; loss on the answer tokens only.
    optimiser = torch.optim.AdamW(model.parameters(), lr=ANSWER_LR, weight_decay=0.01)
    steps = answer_epochs * -(-len(y) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=ANSWER_LR, total_steps=steps, pct_start=0.15
    )
    answer_length = answers.shape[1]
    for epoch in range(answer_epochs):
        total = 0.0
        for batch in torch.randperm(len(y), generator=order).split(BATCH_SIZE):
            target = answers[y[batch]]
            input_ids = torch.cat([prompt_ids.expand(len(batch), -1), target], dim=1)
            # logits at the last prompt position and the answer's: each predicts the next token
            logits = model(
                input_ids=input_ids,
                pixel_values=pixels([augment(rendered[i]) for i in batch.tolist()]),
                logits_to_keep=answer_length + 1,
            ).logits[:, :-1]
            loss = functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            total += loss.item() * len(batch)
        say(f"answer epoch {epoch + 1}/{answer_epochs}: loss {total / len(y):.4f}")
    answer_loss = total / len(y)
    model.eval()
    train_accuracy = float(
        (digit_probabilities(model, prompt_ids, answers, pixels(rendered)).argmax(1) == y).float().mean()
    )
    train_s, train_cpu_s = time.monotonic() - started, time.process_time() - cpu_started

    renamed = tiny.save_for_vllm(model, tokenizer, out_dir)
    manifest = {
        "build_version": BUILD_VERSION,
        "served_model_name": SERVED_MODEL_NAME,
        "labels": list(LABELS),
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "image_token_id": config.image_token_id,
        "renamed_vision_keys": renamed,
        "seed": seed,
        "n_train": len(labels),
        "prompt_text": prompt_text,
        "prompt_token_ids": prompt_ids.tolist(),  # what vLLM must build from the stage's request
        "inputs_sha256": inputs_sha256(images, labels, prompt, seed),
        "recipe": {
            "torch_threads": TORCH_THREADS,
            "batch_size": BATCH_SIZE,
            "vision_epochs": vision_epochs,
            "vision_lr": VISION_LR,
            "answer_epochs": answer_epochs,
            "answer_lr": ANSWER_LR,
            "augmentation": {
                "max_rotation_deg": MAX_ROTATION_DEG,
                "max_shift_px": MAX_SHIFT_PX,
                "jpeg_probability": JPEG_PROBABILITY,
            },
        },
        "final_vision_loss": round(vision_loss, 5),
        "final_answer_loss": round(answer_loss, 5),
        "train_accuracy": round(train_accuracy, 5),
        "train_seconds": round(train_s, 2),
        "train_cpu_seconds": round(train_cpu_s, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "weights_sha256": tiny.weights_sha256(out_dir),
    }
    (out_dir / "visionroute_build.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def digit_probabilities(model, prompt_ids, answers, pixel_values):
    """P(digit | image, prompt) at the answer's digit position, renormalised over the 10 digits
    (what vLLM reports when its logprobs come after the grammar's mask)."""
    import torch

    # The answer tokens differ only at one position: the digit.
    position = int((answers != answers[0]).any(0).nonzero()[0])
    prefix = answers[0, :position].expand(len(pixel_values), -1)
    with torch.no_grad():
        input_ids = torch.cat([prompt_ids.expand(len(pixel_values), -1), prefix], dim=1)
        logits = model(input_ids=input_ids, pixel_values=pixel_values, logits_to_keep=1).logits[:, -1]
    return logits[:, answers[:, position]].softmax(-1)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.exit("usage: python examples/train_digits.py OUT_DIR INPUTS.npz")
    import numpy as np

    out_dir, inputs = Path(argv[0]), np.load(argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    verbose = os.environ.get("VISIONROUTE_TRAIN_VERBOSE") == "1"
    manifest = train(
        inputs["images"],
        inputs["labels"],
        str(inputs["prompt"]),
        out_dir,
        seed=int(inputs["seed"]) if "seed" in inputs else SEED,
        progress=(lambda message: print(message, file=sys.stderr, flush=True)) if verbose else None,
    )
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    sys.path.pop(0)  # run by path: keep this folder's modules (config.py, ...) from shadowing others
    sys.exit(main(sys.argv[1:]))
