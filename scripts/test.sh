#!/usr/bin/env bash
# Run the test suite: installs what it needs (project venv, the vLLM server venv, PostgreSQL and
# Chromium for the state and review-page tests), lints (ruff check, ruff format --check), then
# pytest. Extra arguments go to pytest:
#   ./scripts/test.sh                               # everything (what CI runs)
#   ./scripts/test.sh -m "not slow and not server"  # the fast part, no servers, ~2 min
#   VISIONROUTE_TEST_WORKERS=4 ./scripts/test.sh             # pytest-xdist workers (more cores)
# The full run sets VISIONROUTE_REQUIRE_SERVERS=1: a missing PostgreSQL or Chromium is then a
# failure (of this script, or of the tests that need it), never a skip. Set it to 0 to let
# those tests skip on a machine that cannot install them.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$repo/scripts/bootstrap.sh")
cd "$repo"
fast_only=0
[[ "$*" == *"not server"* ]] && fast_only=1
require_servers=${VISIONROUTE_REQUIRE_SERVERS:-$((1 - fast_only))}
[[ $require_servers == 0 ]] || require_servers=1
export VISIONROUTE_REQUIRE_SERVERS=$require_servers

install_or_fail() {  # script, what it installs
  bash "$repo/scripts/$1" >/dev/null && return 0
  if [[ $require_servers == 1 ]]; then
    echo "test.sh: could not install $2 (scripts/$1); the full run needs it" \
      "(VISIONROUTE_REQUIRE_SERVERS=0 lets its tests skip instead)" >&2
    exit 1
  fi
  echo "test.sh: could not install $2; its tests will say so and skip" >&2
}

if [[ $fast_only == 0 ]]; then
  bash "$repo/scripts/vllm_env.sh" >/dev/null # real vLLM server for the VLM tests
  install_or_fail postgres_deps.sh PostgreSQL
  install_or_fail browser_deps.sh Chromium
fi

# Lint first: the venv's ruff (a test dependency), else one on PATH.
if [[ -x $venv/bin/ruff ]]; then
  ruff=$venv/bin/ruff
elif command -v ruff >/dev/null; then
  ruff=$(command -v ruff)
else
  echo "test.sh: ruff is missing from $venv (it is a test dependency; rerun scripts/bootstrap.sh)" >&2
  exit 1
fi
"$ruff" check --quiet . || { echo "test.sh: ruff check failed (ruff check --fix . fixes some)" >&2; exit 1; }
"$ruff" format --check --quiet . || { echo "test.sh: unformatted files (ruff format . formats them)" >&2; exit 1; }

export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# OpenMP threads (torch's intra-op pool: the MiniLM text embedder, open_clip, MTCNN, training)
# sleep when idle instead of spinning. Beside other work on 2 cores, 2 spinning torch threads took
# 236 ms of CPU per one-sentence MiniLM encode against 24 ms passive (1 thread: 20 ms), and the
# retrieval/privacy test modules 32.8-35.4 CPU-s against 19.6-21.2 (2026-12-08, load 5-15); the
# computation is the same. Children (Ray workers, the vLLM server) inherit it.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# One process by default: on 2 cores, two pytest-xdist workers ran the suite slower (31:51 against
# 23:17, 2026-12-07: the digits LLaVA training, two vLLM servers and three Ray clusters at once
# oversubscribe the CPUs) and a load-sensitive test failed. VISIONROUTE_TEST_WORKERS=N runs N
# workers, modules sharing a server on one of them, long lanes first (tests/support/lanes.py).
# Since then the suite does less CPU work: on a fresh clone of 0e4cbf3 (2026-12-08, quiet 2 cores)
# two workers took 11:00 against 15:12 for one process, all 1,776 passed. One run: kept off by
# default until repeated runs, some under load, show no load-sensitive failure.
workers=${VISIONROUTE_TEST_WORKERS:-0}
parallel=()
if [[ $workers != 0 ]]; then
  parallel=(-n "$workers" --dist loadgroup --no-loadscope-reorder)
fi
exec "$venv/bin/python" -m pytest "${parallel[@]}" "$@"
