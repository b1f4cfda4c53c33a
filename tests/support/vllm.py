"""The real vLLM server in tests: started, then warmed up before any test talks to it.

The suite starts one: the LLaVA trained on the digits (``start_warm_digits_vllm_server``). The
tests that assert only the protocol, schema and routing (test_vlm_server.py, the photo tasks of
test_three_tier_digits.py) use it too: structured outputs make any model's answer schema-valid, and a vLLM start costs
~40-80 CPU-seconds on 2 cores. The tiny random-weight LLaVA stays what ``visionroute vlm
serve-tiny``, the docs and the soak serve (examples/vllm_server.py ``start_tiny_vllm_server``).

A freshly started vLLM server answers its first request much more slowly than the rest: the
first multimodal forward pass and the structured-output (xgrammar) machinery are set up lazily,
and on a loaded 2-core machine that took longer than a test's 20 s request timeout. So every
server a test starts gets one real chat completion with an image and a JSON schema first, with
a generous timeout, retried until it answers or a clear deadline passes.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from examples import vllm_server
from examples.vllm_server import VllmServer

log = logging.getLogger(__name__)

WARM_UP_LABELS = ("cat", "dog", "coffee cup", "rocket")


def model_version(model_dir: Path) -> str | None:
    """The built model's weights checksum (what a step's model_version should say), if known."""
    manifest = Path(model_dir) / "visionroute_build.json"
    if not manifest.exists():
        return None
    return "sha256:" + json.loads(manifest.read_text())["weights_sha256"][:16]


def _image_data_url(size: int = 64) -> str:
    pixels = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def warm_up_request(model: str, labels: tuple[str, ...] = WARM_UP_LABELS) -> dict:
    """A chat completion shaped like the VLM tier's: an image, a prompt, a JSON schema, logprobs."""
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": list(labels)}},
        "required": ["label"],
        "additionalProperties": False,
    }
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _image_data_url()}},
                    {
                        "type": "text",
                        "text": f"Which one is in the image: {', '.join(labels)}? Answer in JSON.",
                    },
                ],
            }
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "warm_up", "schema": schema, "strict": True},
        },
        "max_tokens": 16,
        "temperature": 0.0,
        "logprobs": True,
    }


def warm_up(server: VllmServer, *, deadline_s: float = 300.0, request_timeout_s: float = 180.0) -> float:
    """Send one real image chat completion until it answers 200; returns the seconds it took.

    Raises RuntimeError, with the server's log tail, if the server dies or nothing answers
    within ``deadline_s``.
    """
    started = time.monotonic()
    deadline = started + deadline_s
    body = warm_up_request(server.model)
    last_error = "no attempt made"
    with httpx.Client() as client:
        while True:
            if not server.is_running():
                raise RuntimeError(
                    f"vLLM server exited (code {server.process.returncode}) during warm-up; "
                    f"log {server.log_path}:\n{server.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"vLLM server at {server.base_url} did not answer a warm-up chat completion within "
                    f"{deadline_s:.0f} s (last: {last_error}); log {server.log_path}:\n{server.log_tail()}"
                )
            try:
                response = client.post(
                    f"{server.base_url}/chat/completions",
                    json=body,
                    timeout=min(request_timeout_s, max(remaining, 1.0)),
                )
                if response.status_code == 200 and response.json()["choices"][0]["message"]["content"]:
                    took = time.monotonic() - started
                    log.info("vLLM server %s warm after %.1f s", server.base_url, took)
                    return took
                last_error = f"HTTP {response.status_code}: {response.text[:300]}"
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(1.0)


_venv_lock = threading.Lock()
_venv_python: Path | None = None


def vllm_python() -> Path:
    """The vLLM venv's python, ``scripts/vllm_env.sh`` run once per test process: its readiness
    check imports vllm and torchvision (~4 CPU-s), and the digits fixtures, the early-started
    server and the tiny LLaVA's test each asked for it."""
    global _venv_python
    with _venv_lock:  # the early start asks from a thread of its own
        if _venv_python is None:
            _venv_python = vllm_server.ensure_vllm_venv()
        return _venv_python


def start_warm_digits_vllm_server(**kwargs) -> VllmServer:
    """``start_digits_vllm_server`` (venv, trained model, server) with the venv checked once
    (``vllm_python``), then one warm-up request; stops it on failure. It counts the requests it
    holds (``GET /load``): the crash test kills it with one inside."""
    from examples.train_digits import SERVED_MODEL_NAME

    python = vllm_python()
    server = vllm_server.start_vllm_server(
        vllm_server.ensure_digits_llava(python=python),
        served_model_name=SERVED_MODEL_NAME,
        python=python,
        extra_args=("--enable-server-load-tracking",),
        **kwargs,
    )
    try:
        warm_up(server)
    except BaseException:
        server.stop()
        raise
    return server


def requests_held(server: VllmServer) -> int:
    """Requests the server's API process holds now, answered or not (``--enable-server-load-tracking``)."""
    return int(httpx.get(f"http://127.0.0.1:{server.port}/load", timeout=5).json()["server_load"])
