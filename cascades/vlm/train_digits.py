"""Moved to examples/train_digits.py (``examples.train_digits``): this name is removed in the next release.

A shim for code that still imports ``cascades.vlm.train_digits``: it is the very module object of
``examples.train_digits`` (so attributes, monkeypatching and ``from ... import`` all behave as before).
"""

import importlib
import sys
import warnings

warnings.warn(
    "cascades.vlm.train_digits moved to examples.train_digits; the old name is removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("examples.train_digits")
