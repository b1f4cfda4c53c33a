#!/usr/bin/env bash
# Creates (once) and updates the project's virtual environment at .venv with everything the
# service and its tests need. Idempotent: a second run only checks. Prints the venv path.
#
# torch/torchvision are pinned to the builds pip finds on the build machines' own disk
# (torch 2.14.1 + torchvision 0.29.1); see docs/install.md. Use pip, not uv/poetry: they do
# not see those local files and would download ~3 GB.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VISIONROUTE_VENV:-$repo/.venv}
python=${PYTHON:-python3.11}
stamp=$venv/.visionroute-installed
want=$(sha256sum "$repo/pyproject.toml" | cut -c1-16)

if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "$venv"
  exit 0
fi
command -v "$python" >/dev/null || python=python3
echo "bootstrap: installing VisionRoute and its dependencies into $venv (2-3 min the first time)" >&2
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$repo[dev]" >&2
# Packages whose metadata pins older torch/numpy but which run on ours (pyproject [tool.visionroute]).
mapfile -t no_deps < <("$venv/bin/python" -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["tool"]["visionroute"]["no-deps"]))' "$repo/pyproject.toml")
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${no_deps[@]}" >&2
echo "$want" >"$stamp"
echo "$venv"
