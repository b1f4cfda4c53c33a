"""Moved to examples/train_digits.py (``examples.train_digits``): this name is removed in the next release.

Kept for its command line, ``.venv-vllm/bin/python cascades/vlm/train_digits.py OUT_DIR INPUTS.npz``
(also ``-m cascades.vlm.train_digits``), which runs the new script. Imported, it is the very module
object of ``examples.train_digits`` (attributes, monkeypatching and ``from ... import`` as before).
"""

import importlib
import runpy
import sys
import warnings
from pathlib import Path

MOVED = (
    "cascades.vlm.train_digits moved to examples.train_digits; the old name is removed in the next release"
)

if __name__ == "__main__":  # run by path or with -m: a warning would be hidden, so say it on stderr
    print(MOVED, file=sys.stderr)
    runpy.run_path(
        str(Path(__file__).resolve().parents[2] / "examples" / "train_digits.py"), run_name="__main__"
    )
else:
    warnings.warn(MOVED, DeprecationWarning, stacklevel=2)
    sys.modules[__name__] = importlib.import_module("examples.train_digits")
