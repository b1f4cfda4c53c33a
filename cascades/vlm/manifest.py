"""A locally built VLM's build manifest, ``visionroute_build.json`` beside its weights.

The builders (examples/tiny_llava.py, examples/train_digits.py) write it; the model cards
(router/services/model_card_facts.py) and the vLLM launcher (examples/vllm_server.py) read it:
the build version and the weights' sha256 that ``VlmConfig.model_version`` stamps on each step.
"""

from __future__ import annotations

import json
from pathlib import Path

from visionroute.errors import ConfigError

MANIFEST = "visionroute_build.json"


def read_manifest(model_dir: Path) -> dict | None:
    """A built model's ``visionroute_build.json`` (version, sha256, ...), or None if missing."""
    path = Path(model_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_version(model_dir: Path) -> str:
    """``<build_version>@sha256:<16 hex>``: what ``VlmConfig.model_version`` stamps on each step."""
    manifest = read_manifest(model_dir)
    if manifest is None:
        raise ConfigError(f"{Path(model_dir) / MANIFEST} is missing or unreadable", field="model")
    return f"{manifest['build_version']}@sha256:{manifest['weights_sha256'][:16]}"
