#!/usr/bin/env bash
# Browser test of the call-review page (public/): headless Chromium driven by playwright-core
# against the built Worker in `wrangler dev` (tests/ui/). Installs Debian's chromium (and a
# Japanese font) when missing; playwright-core comes from package.json (scripts/setup.sh).
# Writes a screenshot of the call page to target/ui/call-page.png (CALL_PAGE_SCREENSHOT=docs/call-page.png
# refreshes the docs' picture). Run after scripts/build.sh (scripts/test.sh does both).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Chromium, and a Japanese font so the page (and its screenshot) shows text, not boxes.
packages=()
[[ -x /usr/bin/chromium ]] || packages+=(chromium)
dpkg -s fonts-ipafont-gothic >/dev/null 2>&1 || packages+=(fonts-ipafont-gothic)
if (( ${#packages[@]} )); then
  log "installing ${packages[*]} (Debian packages) for the browser test"
  sudo=()
  [[ "$(id -u)" == 0 ]] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${packages[@]}" >/dev/null
fi
[[ -f node_modules/playwright-core/package.json ]] || die "playwright-core missing: run bash scripts/setup.sh"

node --test tests/ui/*.test.mjs
