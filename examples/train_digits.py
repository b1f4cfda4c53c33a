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

Two seeded stages on CPU (``examples.llava_training``, shared with the textures LLaVA; one torch
thread: reproducible, and it leaves a core to the rest):
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

import functools
import json
import os
import sys
from pathlib import Path

# Change this (or the recipe below, or llava_training.py) and ensure_digits_llava() retrains.
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


@functools.cache
def _sibling(name: str):
    """A module of this folder (``llava_training``, ``tiny_llava``), whether this file runs as a
    script (no package) or is imported."""
    if __package__:
        import importlib

        return importlib.import_module(f"{__package__}.{name}")
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs: its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def answer_json(label: str) -> str:
    """The answer exactly as vLLM's structured outputs spell it (no whitespace)."""
    return _sibling("llava_training").answer_json(label)


def inputs_sha256(images, labels, prompt: str, seed: int) -> str:
    """What the model was trained on: images, labels, prompt and seed (and the recipe's version)."""
    return _sibling("llava_training").inputs_sha256(f"{BUILD_VERSION}:seed={seed}", images, labels, prompt)


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


def recipe(*, vision_epochs: int = VISION_EPOCHS, answer_epochs: int = ANSWER_EPOCHS):
    """The digits recipe for ``llava_training``: one 28 px patch, every weight trained in both stages."""
    return _sibling("llava_training").Recipe(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        batch_size=BATCH_SIZE,
        vision_epochs=vision_epochs,
        vision_lr=VISION_LR,
        answer_epochs=answer_epochs,
        answer_lr=ANSWER_LR,
        torch_threads=TORCH_THREADS,
    )


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

    training = _sibling("llava_training")
    tiny_llava = _sibling("tiny_llava")
    images = np.asarray(images, dtype=np.float32).reshape(-1, 8, 8)
    labels = np.asarray(labels, dtype=np.int64)
    training.check_inputs(len(images), labels, len(LABELS), vision_epochs, answer_epochs)
    digits = recipe(vision_epochs=vision_epochs, answer_epochs=answer_epochs)
    with training.torch_threads(TORCH_THREADS):
        trained = training.train(
            tiny_llava,
            [render_digit(image) for image in images],
            labels,
            LABELS,
            prompt,
            out_dir,
            recipe=digits,
            augment=_Augmenter(seed),
            seed=seed,
            progress=progress,
        )
    return training.save(
        tiny_llava,
        trained,
        out_dir,
        recipe=digits,
        build_version=BUILD_VERSION,
        served_model_name=SERVED_MODEL_NAME,
        label_names=LABELS,
        seed=seed,
        n_train=len(labels),
        inputs_sha256=inputs_sha256(images, labels, prompt, seed),
        augmentation={
            "max_rotation_deg": MAX_ROTATION_DEG,
            "max_shift_px": MAX_SHIFT_PX,
            "jpeg_probability": JPEG_PROBABILITY,
        },
    )


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
