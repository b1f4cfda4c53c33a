#!/usr/bin/env bash
# Run the test suite: installs what it needs (project venv, the vLLM server venv, Chromium for
# the review-page test), then pytest. Extra arguments go to pytest:
#   ./scripts/test.sh                               # everything (what CI runs)
#   ./scripts/test.sh -m "not slow and not server"  # the fast part, no servers, ~1 min
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$repo/scripts/bootstrap.sh")
cd "$repo"
fast_only=0
[[ "$*" == *"not server"* ]] && fast_only=1
if [[ $fast_only == 0 ]]; then
  bash "$repo/scripts/vllm_env.sh" >/dev/null           # real vLLM server for the VLM tests
  bash "$repo/scripts/postgres_deps.sh" >/dev/null \
    || echo "test.sh: could not install PostgreSQL; the PostgreSQL tests will say so and skip" >&2
  bash "$repo/scripts/browser_deps.sh" >/dev/null \
    || echo "test.sh: could not install chromium; the review-page browser test will say so and skip" >&2
fi
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec "$venv/bin/python" -m pytest "$@"
