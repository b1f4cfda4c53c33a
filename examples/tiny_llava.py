"""Build a tiny random-weight LLaVA that a real vLLM server can load and serve, fully offline.

No VLM with real weights can be downloaded on the build machines, so tests and the benchmark run
vLLM on this stand-in: a CLIP vision tower (56 px, 16 patches of 14 px), a 2-layer Llama with
hidden size 128, and a byte-level BPE tokenizer trained here with ``tokenizers``. It writes noise,
which vLLM's structured outputs turn into well-formed JSON; tests assert protocol, schema and
routing, never what it says.

Run it with the vLLM venv's Python (its transformers is the one vLLM loads the files with)::

    .venv-vllm/bin/python examples/tiny_llava.py OUT_DIR

From the service venv, ``examples.vllm_server.ensure_tiny_llava()`` does that for you. This file
imports only the standard library at module level, so it runs without the project installed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

# Change this (or the code below) and ensure_tiny_llava() rebuilds the model.
BUILD_VERSION = "tiny-llava-1"
SERVED_MODEL_NAME = "tiny-llava"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 56
PATCH_SIZE = 14
SEED = 0

# Vicuna-style LLaVA-1.5 template. vLLM's chat path inserts the image placeholder itself when a
# template takes string content; iterating over the parts supports OpenAI-style content too.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}</s>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


def _corpus() -> list[str]:
    """Text the BPE merges are learnt from: prompts, JSON answers, common words and digits."""
    words = (
        "the a an of to in is it this that image photo picture shows contains object label "
        "answer yes no text read classify verify detection box region cat dog car person bird "
        "coffee cup rocket astronaut coin moon horse page camera unknown true false confidence "
        "which one best describes choose from list reply with json only verdict reason"
    ).split()
    lines = [" ".join(words[i : i + 9]) for i in range(0, len(words), 3)]
    lines += [json.dumps({"label": w}) for w in words] + [json.dumps({"verdict": v}) for v in ("yes", "no")]
    lines += [json.dumps({"text": " ".join(words[i : i + 4])}) for i in range(0, len(words), 4)]
    lines += ["0123456789 " * 4, "USER: <image>\nASSISTANT: ", '{ } [ ] , : " . ? !']
    return lines * 4


def build_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # The full 256-byte alphabet: any string (and so any JSON a schema allows) is spellable.
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llava_config(
    tokenizer,
    *,
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
    vision_hidden_size: int = 32,
):
    """The tiny LLaVA's config; ``examples.train_digits`` reuses it with other image sizes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: a size vLLM's CPU attention supports
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def make_processor(tokenizer, image_size: int, patch_size: int):
    """The processor vLLM builds prompts and pixels with (resize, crop, CLIP normalisation)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def save_for_vllm(model, tokenizer, out_dir: Path) -> int:
    """Write weights, processor and tokenizer the way vLLM's LLaVA loader reads them.

    Returns how many vision-tower keys were renamed (see below).
    """
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)

    # transformers 5 writes CLIP vision keys as vision_tower.embeddings...; vLLM's LLaVA loader
    # expects vision_tower.vision_model.embeddings... (transformers itself loads either form).
    renamed = 0
    for shard in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        fixed = {}
        for key, value in tensors.items():
            new_key = key
            for prefix in ("vision_tower.", "model.vision_tower."):
                if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
                    new_key = prefix + "vision_model." + key[len(prefix) :]
                    renamed += 1
            fixed[new_key] = value.contiguous()
        save_file(fixed, shard, metadata={"format": "pt"})
    index = out_dir / "model.safetensors.index.json"
    if index.exists():  # single-file models have none; keep a sharded index consistent anyway
        data = json.loads(index.read_text())
        data["weight_map"] = {
            (
                k.replace("vision_tower.", "vision_tower.vision_model.", 1)
                if "vision_tower." in k and "vision_model." not in k
                else k
            ): v
            for k, v in data["weight_map"].items()
        }
        index.write_text(json.dumps(data, indent=2))

    vision = model.config.vision_config
    make_processor(tokenizer, vision.image_size, vision.patch_size).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return renamed


def weights_sha256(out_dir: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(out_dir.glob("*.safetensors")))).hexdigest()


def build(out_dir: Path) -> Path:
    import torch
    from transformers import LlavaForConditionalGeneration

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    tokenizer = build_tokenizer(out_dir)
    model = LlavaForConditionalGeneration(llava_config(tokenizer)).eval()
    renamed = save_for_vllm(model, tokenizer, out_dir)
    manifest = {
        "build_version": BUILD_VERSION,
        "served_model_name": SERVED_MODEL_NAME,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "image_token_id": model.config.image_token_id,
        "renamed_vision_keys": renamed,
        "weights_sha256": weights_sha256(out_dir),
    }
    (out_dir / "visionroute_build.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


if __name__ == "__main__":
    sys.path.pop(0)  # run by path: keep this folder's modules (config.py, ...) from shadowing others
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/tiny_llava.py OUT_DIR")
    print(json.dumps(json.loads((build(Path(sys.argv[1])) / "visionroute_build.json").read_text())))
