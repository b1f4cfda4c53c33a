"""The VLM tier: a client for vLLM's OpenAI-compatible server (or vLLM in-process on a GPU),
per-task prompts with JSON-schema-constrained answers, confidence from token logprobs, and
``VlmStage``, which appends one ``vlm`` step and never raises for a backend fault.

``tiny_llava.py`` and ``server.py`` build and start a real vLLM server on CPU for tests and the
benchmark; see docs/vlm.md.
"""

from cascades.vlm.config import InProcessEngineConfig, VlmConfig
from cascades.vlm.stage import VlmStage

__all__ = ["InProcessEngineConfig", "VlmConfig", "VlmStage"]
