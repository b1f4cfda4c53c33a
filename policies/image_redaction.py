"""Moved to cascades/image_redaction.py (``cascades.image_redaction``): this name is removed in the
next release.

Redaction runs detectors on pixels, so it is a stage (cascades/), not a decision; the privacy
policy it applies stays in policies/privacy.py. A shim for code that still imports
``policies.image_redaction``: it is the very module object of ``cascades.image_redaction``.
"""

import importlib
import sys
import warnings

warnings.warn(
    "policies.image_redaction moved to cascades.image_redaction; the old name is removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = importlib.import_module("cascades.image_redaction")
