#!/usr/bin/env bash
# Start VisionRoute on Ray Serve with its embedded defaults (serve_config.yaml): installs what it
# needs, then `visionroute serve`: checks the config (as `visionroute check-config`), prepares the
# packaged models, runs `serve run` and prints "VisionRoute ready on http://HOST:PORT (gRPC :PORT)"
# once /readyz answers. SIGTERM or Ctrl-C shuts Serve down and exits 0.
#   ./scripts/serve.sh                       # http://127.0.0.1:8000  (docs at /docs)
#   ./scripts/serve.sh --config my.yaml      # another Ray Serve config
# What listens where (docs/operations.md): Ray's own servers on 127.0.0.1 only, with Ray's token
# authentication on (RAY_AUTH_MODE=token; the token in ~/.ray/auth_token). Set RAY_ADDRESS to
# deploy onto an existing Ray cluster instead.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$repo/scripts/bootstrap.sh")
cd "$repo"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec "$venv/bin/visionroute" serve "$@"
