#!/usr/bin/env bash
# Creates (once) and updates the project's virtual environment at .venv with everything the
# service and its tests need, exactly as locked in requirements/ (docs/install.md, "Lock files").
# Idempotent: a second run only checks. Prints the venv path.
#
#   scripts/bootstrap.sh                          # .venv in the repo
#   VISIONROUTE_VENV=/tmp/venv scripts/bootstrap.sh
#
# Every package comes from a hash-locked file (pip --require-hashes):
#   requirements/pip.txt      pip itself, first
#   requirements/dev.txt      the dependencies of visionroute[dev] (torch 2.14.1 / torchvision
#                             0.29.1: the builds on the build machines' own disk, found through
#                             the pip config; see docs/install.md)
#   requirements/no-deps.txt  [tool.visionroute] no-deps in pyproject.toml, installed --no-deps
# then the project itself, editable, without dependencies. Use pip, not uv/poetry: they do not
# see those local files and would download ~3 GB. scripts/update_locks.sh re-resolves the locks.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VISIONROUTE_VENV:-$repo/.venv}
python=${PYTHON:-python3.11}
stamp=$venv/.visionroute-installed
locks=("$repo/requirements/pip.txt" "$repo/requirements/dev.txt" "$repo/requirements/no-deps.txt")
# What the venv was built from: this script, pyproject.toml and the locks.
want=$(cat "${BASH_SOURCE[0]}" "$repo/pyproject.toml" "${locks[@]}" | sha256sum | cut -c1-16)

if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "$venv"
  exit 0
fi
command -v "$python" >/dev/null || python=python3
echo "bootstrap: installing VisionRoute and its locked dependencies into $venv (2-3 min the first time)" >&2
rm -f "$stamp"
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes)
"${pip[@]}" --no-deps -r "$repo/requirements/pip.txt" >&2
# (Updating a venv that already holds the no-deps packages, pip lists their unmet metadata
# requirements as "dependency conflicts": expected, see below.)
"${pip[@]}" -r "$repo/requirements/dev.txt" >&2
# Packages whose metadata pins older torch/numpy (or a second cv2) but which run on ours.
"${pip[@]}" --no-deps -r "$repo/requirements/no-deps.txt" >&2
# The project itself: its dependencies are all in the lock above, and it builds with the locked
# setuptools (no isolated build environment fetched from an index).
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
  -e "$repo" >&2
echo "$want" >"$stamp"
echo "$venv"
