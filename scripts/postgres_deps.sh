#!/usr/bin/env bash
# PostgreSQL's server binaries (initdb, pg_ctl, postgres) for the tests that run the state on a
# real PostgreSQL (visionroute/pg_local.py starts a throwaway one). Idempotent; needs root or
# sudo for apt-get where they are missing.
set -euo pipefail
if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
  exit 0
fi
for dir in /usr/lib/postgresql/*/bin; do
  [[ -x $dir/initdb && -x $dir/pg_ctl ]] && exit 0
done
sudo_cmd=""
[[ $(id -u) == 0 ]] || sudo_cmd="sudo"
$sudo_cmd apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq postgresql-15 >&2
for dir in /usr/lib/postgresql/*/bin; do
  [[ -x $dir/initdb && -x $dir/pg_ctl ]] && exit 0
done
echo "postgres_deps.sh: postgresql-15 installed, but initdb and pg_ctl are still missing" >&2
exit 1
