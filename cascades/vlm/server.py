"""Moved to examples/vllm_server.py (``examples.vllm_server``): this name is removed in the next release.

Kept for its command line, ``python -m cascades.vlm.server`` (start the tiny LLaVA's vLLM server and
keep it up), which runs ``python -m examples.vllm_server``. Imported, it is the very module object of
``examples.vllm_server`` (attributes, monkeypatching and ``from ... import`` as before).
"""

import importlib
import runpy
import sys
import warnings

MOVED = "cascades.vlm.server moved to examples.vllm_server; the old name is removed in the next release"

if __name__ == "__main__":  # run with -m: a warning would be hidden, so say it on stderr
    print(MOVED, file=sys.stderr)
    runpy.run_module("examples.vllm_server", run_name="__main__", alter_sys=True)
else:
    warnings.warn(MOVED, DeprecationWarning, stacklevel=2)
    sys.modules[__name__] = importlib.import_module("examples.vllm_server")
