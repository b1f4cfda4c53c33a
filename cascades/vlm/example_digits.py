"""Moved to examples/digits.py (``examples.digits``): this name is removed in the next release.

A shim for code that still imports ``cascades.vlm.example_digits``: it is the very module object of
``examples.digits`` (so attributes, monkeypatching and ``from ... import`` all behave as before).
"""

import importlib
import sys
import warnings

warnings.warn(
    "cascades.vlm.example_digits moved to examples.digits; the old name is removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("examples.digits")
