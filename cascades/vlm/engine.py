"""The same ``VlmBackend`` interface over vLLM's engine in this process (GPU deployments).

Needs the ``vlm-server`` extra (``vllm``, CUDA build); CI never imports this module. Select it with
``VlmConfig(backend="in_process", in_process={"model_path": ...})``; see docs/vlm.md.
``LLM.chat`` takes the same OpenAI-style messages (image as a data URL) as the server, and
``StructuredOutputsParams(json=schema)`` is what ``response_format`` becomes inside vLLM, so the
stage, prompts, confidence and policy are shared with the server path unchanged.

The offline ``LLM`` object is not thread-safe: calls are serialised by a lock, and each call
is one request. For throughput on a GPU, prefer the server path (continuous batching across
callers) or ``ray.serve.llm``; see docs/vlm.md.
"""

from __future__ import annotations

import threading
import time

from cascades.vlm.client import VlmBackendError, VlmCompletion, VlmRequest
from cascades.vlm.confidence import TokenLogprob
from cascades.vlm.config import VlmConfig
from visionroute.errors import ConfigError


class InProcessVllmBackend:
    def __init__(self, config: VlmConfig) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ConfigError(
                "backend 'in_process' needs vLLM in this environment: pip install 'visionroute[vlm-server]' "
                f"({exc})",
                field="backend",
            ) from exc
        engine = config.in_process
        assert engine is not None  # VlmConfig's validator guarantees it for this backend
        self.config = config
        self._lock = threading.Lock()
        self._llm = LLM(
            model=engine.model_path,
            served_model_name=config.model,
            max_model_len=engine.max_model_len,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            max_num_seqs=engine.max_num_seqs,
            tensor_parallel_size=engine.tensor_parallel_size,
            limit_mm_per_prompt={"image": engine.limit_images_per_prompt},
            enforce_eager=engine.enforce_eager,
            # Engine-wide, as for the server: compact JSON, or a weak model pads it with spaces.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
        )

    def complete(self, request: VlmRequest) -> VlmCompletion:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        schema = request.response_format["json_schema"]["schema"]
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            logprobs=1,
            structured_outputs=StructuredOutputsParams(json=schema),
        )
        started = time.monotonic()
        try:
            with self._lock:
                (result,) = self._llm.chat(request.messages, params, use_tqdm=False)
        except Exception as exc:  # engine errors (OOM, dead worker) are backend faults
            raise VlmBackendError(
                f"in-process vLLM failed: {type(exc).__name__}: {exc}", kind="server_error"
            ) from exc
        output = result.outputs[0]
        tokens = []
        for token_id, candidates in zip(output.token_ids, output.logprobs or []):
            chosen = candidates[token_id]
            text = chosen.decoded_token or ""
            tokens.append(TokenLogprob(token=text, logprob=float(chosen.logprob), utf8=text.encode("utf-8")))
        return VlmCompletion(
            content=output.text,
            finish_reason=output.finish_reason,
            tokens=tuple(tokens),
            prompt_tokens=len(result.prompt_token_ids or []),
            completion_tokens=len(output.token_ids),
            model=self.config.model,
            attempts=1,
            latency_ms=(time.monotonic() - started) * 1000.0,
        )
