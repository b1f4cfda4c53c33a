"""Moved to examples/vllm_server.py (``examples.vllm_server``): this name is removed in the next release.

A shim for code that still imports ``cascades.vlm.server``: it is the very module object of
``examples.vllm_server`` (so attributes, monkeypatching and ``from ... import`` all behave as before).
"""

import importlib
import sys
import warnings

warnings.warn(
    "cascades.vlm.server moved to examples.vllm_server; the old name is removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("examples.vllm_server")
