"""The VLM tier: a client for vLLM's OpenAI-compatible server (or vLLM in-process on a GPU),
per-task prompts with JSON-schema-constrained answers, confidence from token logprobs, and
``VlmStage``, which appends one ``vlm`` step and never raises for a backend fault.

The small LLaVA models and the launcher that serves them with a real vLLM server on CPU (for
tests, examples and benchmarks) live in examples/; see docs/vlm.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cascades.vlm.config import InProcessEngineConfig, VlmConfig

if TYPE_CHECKING:
    from cascades.vlm.stage import VlmStage

__all__ = ["InProcessEngineConfig", "VlmConfig", "VlmStage"]


def __getattr__(name: str):
    # The stage pulls in the openai client (~0.5-0.9 s); config readers and the CLI do not need it.
    if name == "VlmStage":
        from cascades.vlm.stage import VlmStage

        return VlmStage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
