#!/usr/bin/env bash
# Browser test of the call-review page (public/): headless Chromium driven by playwright-core
# against the built Worker in `wrangler dev` (tests/ui/). Installs Debian's chromium (and a
# Japanese font) when missing; playwright-core comes from package.json (scripts/setup.sh).
# Writes a screenshot of the call page, taken of the realistic seed alone, to
# target/ui/call-page.png (CALL_PAGE_SCREENSHOT=docs/call-page.png refreshes the docs' picture).
# Run after scripts/build.sh (scripts/test.sh does both).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Chromium (/usr/bin/chromium, or the one CHROMIUM_PATH names), and a Japanese font so the
# page (and its screenshot) shows text, not boxes.
packages=(fonts-ipafont-gothic)
[[ -x "${CHROMIUM_PATH:-/usr/bin/chromium}" ]] || packages+=(chromium)
apt_install "${packages[@]}"
[[ -f node_modules/playwright-core/package.json ]] || die "playwright-core missing: run bash scripts/setup.sh"

node --test tests/ui/*.test.mjs
