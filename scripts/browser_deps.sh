#!/usr/bin/env bash
# Debian's Chromium for the headless review-page test (Playwright drives it; it cannot
# download its own browser here). Idempotent; needs root or sudo for apt-get.
set -euo pipefail
if [[ -x /usr/bin/chromium ]]; then
  exit 0
fi
sudo_cmd=""
[[ $(id -u) == 0 ]] || sudo_cmd="sudo"
$sudo_cmd apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium >&2
if [[ ! -x /usr/bin/chromium ]]; then
  echo "browser_deps.sh: chromium installed, but /usr/bin/chromium is still missing" >&2
  exit 1
fi
